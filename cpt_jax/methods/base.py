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
  -> (sum over tokens, name, raw sum)``, given those rows only (their logits, batch
  arrays and mask), in the split pass and in the one pass over the whole batch alike;
- ``teacher``: the method needs a frozen parameter snapshot in the train state;
- ``boundary(config, model config)``: ``fn(state, rows) -> state`` (or None) run at
  each task boundary, inside one jitted update; ``boundary_rows`` says how many rows of
  the finished task it needs;
- ``memory(config, placement, sources)``: the method's memory (a ``MethodMemory``), host
  state the run keeps across steps and checkpoints under the method's name (DER's stored
  logits); the loop and the checkpointer know it only through that interface;
- ``split_grads``: whether the method needs the current-task and replay gradients
  separately at every step (A-GEM's projection does; a loss term on replayed rows only,
  distillation's and DER's, does not: the one pass takes it on the replayed rows of the
  whole batch). Without it a step takes one forward/backward pass over the whole batch,
  like plain training, and the split pass runs only at log steps, for the gradient
  statistics (``cpt_jax.train.step``);
- ``active``: whether the config asks for the method's effect (a weight > 0): a method
  configured but not selected is an error, never a silent no-op;
- ``check``: raises ValueError naming a bad key of the method.

``defaults`` are the method's config keys, under ``config.method.<name>``.

A method's file holds its pieces and its own loss terms; one line in
``cpt_jax.methods.REGISTRY`` makes it selectable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


class MethodMemory:
    """What a method remembers between steps, on the host, e.g. DER's stored logits.

    The run calls it at two events and saves it with every run checkpoint (``to_arrays``,
    item ``methods/<name>``); a resumed run gets it back with ``load_arrays`` before its
    first step. Between a task boundary and the next checkpoint a kill loses nothing: the
    run resumes from the checkpoint before the boundary, whose memory is restored, and
    replays the boundary. Every method is a no-op by default."""

    def task_start(self, params, task: int, pool, starts) -> None:
        """Task ``task`` starts (its boundary actions and replay pool done): ``pool`` is
        the task's replay pool (None for uniform replay or the first task), ``starts``
        [slots + 1] the first global row id of each training slot."""

    def before_step(self, params, task: int, idx) -> None:
        """Right before the step that trains on ``idx`` (the sampler's ``BatchIndex``)."""

    def extras(self, task: int, step: int, idx) -> dict:
        """Per-row arrays [rows of ``idx``, ...] that ride along in the batch (read by the
        method's loss term)."""
        del task, step, idx
        return {}

    def to_arrays(self) -> dict:
        """The memory as named numpy arrays (a checkpoint item), at least one even when
        nothing is remembered yet (e.g. a count of 0): a resumed run whose checkpoint
        holds no memory of a method is refused."""
        raise NotImplementedError

    def load_arrays(self, arrays: dict) -> None:
        """Restore what ``to_arrays`` gave."""
        raise NotImplementedError


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
