"""Logit distillation on replayed rows (Hinton et al. 2015): a teacher snapshot of the
weights is taken at every task boundary, and replayed rows add
``weight * T^2 * KL(teacher || student)`` at temperature T (``kl_distill_loss``).
Costs a teacher forward per replayed row and one parameter copy.

Keys: ``method.distill.weight`` (> 0), ``temperature``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpt_jax.methods.base import Method


def kl_distill_loss(student_logits_BLV, teacher_logits_BLV, mask_BL, temperature: float = 1.0):
    """(sum over masked tokens of T^2 * KL(p_T || q_T), masked token count), float32.

    ``p_T = softmax(teacher / T)``, ``q_T = softmax(student / T)``, per token, computed with
    log-softmax in float32 (stable for any logit scale). The T^2 factor is Hinton et al.
    2015's: the soft-target gradient ``d KL / d student = (q_T - p_T) / T`` shrinks like
    1/T^2 as T grows (for large T, ``q_T - p_T`` is ~ (logit difference) / (V T)), so
    multiplying by T^2 keeps its magnitude roughly independent of T. The gradient of the
    returned sum w.r.t. a token's student logits is ``T * (q_T - p_T)``. No gradient flows
    into the teacher. Teacher tokens of probability 0 (logit -inf) contribute 0.
    """
    t = float(temperature)
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    log_q = jax.nn.log_softmax(student_logits_BLV.astype(jnp.float32) / t, axis=-1)
    log_p = jax.nn.log_softmax(
        jax.lax.stop_gradient(teacher_logits_BLV).astype(jnp.float32) / t, axis=-1)
    p = jnp.exp(log_p)
    kl_BL = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)
    mask = mask_BL.astype(jnp.float32)
    return (t * t) * jnp.sum(kl_BL * mask), jnp.sum(mask)


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
