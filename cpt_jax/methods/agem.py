"""A-GEM (Chaudhry et al. 2019): replayed rows give a reference gradient that the
current-task gradient must not conflict with.

Keys: ``method.agem.add_replay`` (mix the replay gradient back in, as ``replay`` does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cpt_jax.methods.base import Method
from cpt_jax.methods.replay import mix_weights
from cpt_jax.optim.transforms import PerSourceGrads, mix_sources, tree_dot


def agem(add_replay: bool = False, weights=None) -> optax.GradientTransformation:
    """Averaged GEM (Chaudhry et al. 2019, "Efficient Lifelong Learning with A-GEM").

    When the current-task gradient g conflicts with the replay (reference) gradient g_ref,
    i.e. g . g_ref < 0, it is projected onto the half-space where it does not:
    g <- g - (g . g_ref / g_ref . g_ref) g_ref. A-GEM proper then steps along the projected
    g alone (``add_replay=False``); with ``add_replay=True`` the replay gradient is mixed
    back in as in ``replay_mix`` (weights likewise).
    """

    def update(updates: PerSourceGrads, state, params=None):
        del params
        g, ref = updates.current, updates.replay
        if ref is None:
            return g, state
        dot = tree_dot(g, ref)
        coef = jnp.where(dot < 0, dot / jnp.maximum(tree_dot(ref, ref), 1e-30), 0.0)
        projected = jax.tree.map(lambda x, r: x - coef * r, g, ref)
        if add_replay:
            projected = mix_sources(updates, projected, weights)
        return projected, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


METHOD = Method(name="agem", defaults={"add_replay": False},
                combine=lambda c: agem(c.method.agem.add_replay, mix_weights(c)),
                split_grads=lambda c: True)  # the projection needs both gradients
