"""Experience replay (Abbes et al. 2025, "Revisiting Replay and Gradient Alignment for
Continual Pre-Training of LLMs"): a fraction of every batch is replayed from earlier tasks
(``replay.rate``, ``cpt_jax.replay``) and the two sources' gradients are combined. The
default combiner of every run.

Keys: ``method.mix_weights`` (None: token-proportional, the mixed batch's mean loss).
"""

from __future__ import annotations

import optax

from cpt_jax.methods.base import Method
from cpt_jax.optim.transforms import PerSourceGrads, mix_sources


def replay_mix(weights: tuple[float, float] | None = None) -> optax.GradientTransformation:
    """Combine per-source gradients into one (experience replay, Abbes et al. 2025).

    With ``weights=None`` the weights are the sources' token counts, so the result is exactly
    the gradient of the mixed batch's mean loss. Explicit ``(w_current, w_replay)`` weigh
    the two mean gradients regardless of how many rows each has (e.g. (0.5, 0.5)).
    """

    def update(updates: PerSourceGrads, state, params=None):
        del params
        return mix_sources(updates, updates.current, weights), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def mix_weights(config):
    m = config.method.mix_weights
    return tuple(m) if m else None


# Token-proportional mixing is the gradient of the mixed batch's mean loss: one pass over
# the whole batch gives it. Explicit weights need the two mean gradients apart.
METHOD = Method(name="replay", combine=lambda c: replay_mix(mix_weights(c)),
                split_grads=lambda c: mix_weights(c) is not None)
