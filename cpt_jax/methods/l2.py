"""L2 toward fixed weights: the weights the run started from (``anchor="init"``, the
pull toward the pre-trained model that mix-review pairs with replay, He et al. 2021) or the
weights at the start of each task (``anchor="task_start"``).

Keys: ``method.l2.weight`` (> 0), ``method.l2.anchor``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cpt_jax.methods.base import Method
from cpt_jax.optim.transforms import replace_states


class AnchorState(NamedTuple):
    anchor: Any  # parameter-shaped


def l2_anchor(weight: float) -> optax.GradientTransformation:
    """Add the gradient of weight/2 * ||theta - anchor||^2 (L2 toward fixed weights).

    The anchor starts as the parameters the run starts from (the pre-trained weights);
    the loop may move it to the weights at the start of each task (``set_anchor``).
    Mix-review (He et al. 2021) optionally pairs replay with this pull toward the
    pre-trained model.
    """

    def init(params):
        return AnchorState(jax.tree.map(jnp.asarray, params))

    def update(updates, state: AnchorState, params=None):
        updates = jax.tree.map(lambda u, p, a: u + weight * (p - a), updates, params,
                               state.anchor)
        return updates, state

    return optax.GradientTransformation(init, update)


def set_anchor(opt_state, params):
    """Move every l2_anchor anchor to `params` (e.g. at the start of a task)."""
    return replace_states(opt_state, AnchorState, lambda s: AnchorState(params))


def _check(config):
    if config.method.l2.anchor not in ("init", "task_start"):
        raise ValueError(f"method.l2.anchor={config.method.l2.anchor!r}: use 'init' (the "
                         "weights the run starts from) or 'task_start'")


def _boundary(config, mcfg):
    del mcfg
    if config.method.l2.anchor != "task_start":
        return None
    return lambda state, rows: state.replace(
        opt_state=set_anchor(state.opt_state, state.params))


METHOD = Method(name="l2", defaults={"weight": 0.0, "anchor": "init"},
                regularize=lambda c: l2_anchor(c.method.l2.weight), boundary=_boundary,
                active=lambda c: c.method.l2.weight > 0, check=_check)
