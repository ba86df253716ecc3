"""Logit distillation on replayed rows (Hinton et al. 2015): a teacher snapshot of the
weights is taken at every task boundary, and replayed rows add
``weight * T^2 * KL(teacher || student)`` at temperature T (``losses.kl_distill_loss``).
Costs a teacher forward per replayed row and one parameter copy.

Keys: ``method.distill.weight`` (> 0), ``temperature``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpt_jax.methods.base import Method
from cpt_jax.train.losses import kl_distill_loss


def _replay_loss(config):
    d = config.method.distill

    def term(logits, batch, mask, teacher_logits):
        del batch
        kl, _ = kl_distill_loss(logits, teacher_logits, mask, d.temperature)
        return d.weight * kl, "distill", kl

    return term


def _boundary(config, mcfg):
    del config, mcfg
    return lambda state, rows: state.replace(teacher=jax.tree.map(jnp.copy, state.params))


def _check(config):
    if not config.method.distill.temperature > 0:
        raise ValueError(f"method.distill.temperature={config.method.distill.temperature} "
                         "must be > 0")


METHOD = Method(name="distill", defaults={"weight": 0.0, "temperature": 2.0},
                replay_loss=_replay_loss, teacher=True, boundary=_boundary,
                active=lambda c: c.method.distill.weight > 0, check=_check)
