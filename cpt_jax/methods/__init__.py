"""Continual-learning methods, one file each, and the registry that composes them.

``method.name`` selects methods by name, joined with "+": ``"replay"`` (the default),
``"replay+reptile"`` (MER), ``"agem"``, ``"replay+ewc"``, ``"replay+l2+distill"``...
``replay`` combines the step's two gradients unless another selected method does
(``agem``). Each method's strength lives under ``config.method.<name>``; a method whose
strength is set but which is not selected is an error, not a silent no-op.

Adding a method: a file with its pieces (``cpt_jax.methods.base.Method``, its loss terms
and, if it remembers something between steps, a ``MethodMemory``) and one line in
``REGISTRY`` (``registry.py``). A run composes the selected methods once, at setup
(``compose``): the loop and the checkpointer name no method.
"""

from cpt_jax.methods.base import Method, MethodMemory
from cpt_jax.methods.compose import Composition, compose, make_loss_fn, make_optimizer
from cpt_jax.methods.registry import REGISTRY, check, default_config, selected

__all__ = ["REGISTRY", "Composition", "Method", "MethodMemory", "check", "compose",
           "default_config", "make_loss_fn", "make_optimizer", "selected"]
