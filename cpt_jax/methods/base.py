"""What a continual-learning method is to the run: a ``Method`` names the pieces it adds.

A run composes the methods ``method.name`` selects (``"replay+ewc"``). Each piece is
optional and is called with the run config:

- ``combine``: the chain's first transform, turning the step's per-source gradients
  (``PerSourceGrads``: current-task and replay means) into one; exactly one selected
  method has it (``replay`` unless another, e.g. ``agem``, is selected);
- ``regularize``: a transform that adds the method's penalty gradient before clipping;
- ``wrap_base``: wraps the base optimizer (e.g. resetting Adam's moments);
- ``outer``: transforms after the base optimizer (Reptile's meta-update);
- ``replay_loss``: a loss term on replayed rows, ``fn(logits, batch, mask, teacher_logits)
  -> (sum over tokens, name)``;
- ``teacher``: the method needs a frozen parameter snapshot in the train state;
- ``boundary(config, model config)``: ``fn(state, rows) -> state`` (or None) run at
  each task boundary, inside one jitted update; ``boundary_rows`` says how many rows of
  the finished task it needs;
- ``memory``: a host-side recorder the loop feeds (DER's stored logits);
- ``split_grads``: whether the method needs the current-task and replay gradients
  separately at every step (A-GEM's projection does; a loss term on replayed rows only,
  distillation's and DER's, is taken on those rows' own pass). Without it a step takes
  one forward/backward pass over the whole batch, like plain training, and the split
  pass runs only at log steps, for the gradient statistics (``cpt_jax.train.step``);
- ``active``: whether the config asks for the method's effect (a weight > 0): a method
  configured but not selected is an error, never a silent no-op;
- ``check``: raises ValueError naming a bad key of the method.

``defaults`` are the method's config keys, under ``config.method.<name>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    defaults: dict = dataclasses.field(default_factory=dict)
    combine: Callable | None = None
    regularize: Callable | None = None
    wrap_base: Callable | None = None
    outer: Callable | None = None
    replay_loss: Callable | None = None
    teacher: bool = False
    boundary: Callable | None = None
    boundary_rows: Callable[[Any], int] = lambda config: 0
    memory: Callable | None = None
    split_grads: Callable[[Any], bool] = lambda config: False
    active: Callable[[Any], bool] = lambda config: False
    check: Callable[[Any], None] = lambda config: None
