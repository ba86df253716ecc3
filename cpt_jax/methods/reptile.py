"""Reptile's meta-update (Nichol et al. 2018); with replay it is MER as run by Abbes et al.
2025, and two nested periods give the original MER (Riemer et al. 2019).

Keys: ``method.reptile.periods``, a list of ``{"every": k, "meta_lr": keep}`` (one transform
each, in order; ``meta_lr`` is the fraction of each period's displacement kept), and
``method.reptile.reset_moments`` (zero Adam's moments at every meta step of the first
period: MER's optional reset).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cpt_jax.methods.base import Method


class ReptileState(NamedTuple):
    count: jax.Array  # int32: inner steps taken
    slow: Any  # theta_slow, parameter-shaped


def reptile_interpolate(slow, params, meta_lr: float):
    """theta_slow + meta_lr * (theta - theta_slow): Nichol et al. 2018's outer step.

    ``meta_lr`` is the fraction of the period's displacement KEPT: 1 keeps all of it (no
    meta step), 0 returns to the slow weights. Abbes et al. 2025's code README writes the
    same update as ``(1 - eps) theta_slow + eps theta``, i.e. eps = meta_lr; a pull-back of
    eps toward the slow weights, ``(1 - eps) theta + eps theta_slow``, is meta_lr = 1 - eps.
    """
    return jax.tree.map(lambda s, p: s + meta_lr * (p - s), slow, params)


def reptile_step(params, slow, step, every: int, meta_lr: float):
    """Reptile as a pure function of (params, slow, step) -> (params, slow).

    ``step`` counts the inner (optimizer) steps taken, ``params`` are the weights after the
    latest one. At every ``every``-th step the weights become
    ``reptile_interpolate(slow, params, meta_lr)`` and that point is the next period's slow
    copy; otherwise both pass through. For a hand-written loop or a notebook::

        params = optax.apply_updates(params, updates); t += 1
        params, slow = reptile_step(params, slow, t, every=500, meta_lr=0.9)
    """
    def meta(args):
        p, s = args
        new = reptile_interpolate(s, p, meta_lr)
        return new, new

    return jax.lax.cond(jnp.asarray(step) % every == 0, meta, lambda args: args,
                        (params, slow))


def reptile(every: int, meta_lr: float) -> optax.GradientTransformation:
    """Reptile meta-update (Nichol et al. 2018) as run by MER in Abbes et al. 2025.

    Ordinary optimizer steps are the inner loop; every ``every`` steps the parameters
    after the inner update are moved to theta_slow + meta_lr * (theta - theta_slow)
    (``reptile_interpolate``: ``meta_lr`` is the fraction of the period's displacement
    kept). The weights the step ends with become the next period's theta_slow.
    Between meta steps the inner update passes through untouched (``lax.cond``, so the
    cost is a few parameter-sized vector ops once per period). Memory: one parameter copy.

    Placed after the base optimizer in the chain. Composed twice with two periods and
    rates it gives the original MER's within-batch (beta) and across-batch (gamma) Reptile
    steps (Riemer et al. 2019, "Learning to Learn without Forgetting by Maximizing
    Transfer and Minimizing Interference", Algorithm 1). The slow copy is taken lazily, from
    the parameters the next step starts from, so that when both periods end on one step
    the within-batch copy theta_W is taken AFTER the across-batch (gamma) step, as in the
    paper, and not from the beta result that gamma then moved.
    """
    if every < 1:
        raise ValueError(f"reptile every={every} must be >= 1")

    def init(params):
        return ReptileState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.asarray, params))

    def update(updates, state: ReptileState, params=None):
        if params is None:
            raise ValueError("reptile needs params: call tx.update(grads, state, params)")
        # A period ended on the previous step: the weights this step starts from (after
        # every transform of that step) are the new slow copy.
        slow = jax.lax.cond(state.count % every == 0, lambda: jax.tree.map(jnp.copy, params),
                            lambda: state.slow)
        count = state.count + 1

        def meta(upd):
            inner = jax.tree.map(jnp.add, params, upd)
            return jax.tree.map(jnp.subtract, reptile_interpolate(slow, inner, meta_lr), params)

        updates = jax.lax.cond(count % every == 0, meta, lambda upd: upd, updates)
        return updates, ReptileState(count, slow)

    return optax.GradientTransformation(init, update)


def reset_moments(inner: optax.GradientTransformation, every: int
                  ) -> optax.GradientTransformation:
    """Wrap an optimizer so its Adam moments (mu, nu and their bias-correction count) are
    reset to zero every ``every`` steps: MER's optional "reset" at a meta step. The
    learning-rate schedule's own step count is left alone."""

    def init(params):
        return (jnp.zeros((), jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        count, inner_state = state
        updates, inner_state = inner.update(updates, inner_state, params)
        count = count + 1

        def reset(s):
            return jax.tree.map(
                lambda x: x._replace(count=jnp.zeros_like(x.count),
                                     mu=jax.tree.map(jnp.zeros_like, x.mu),
                                     nu=jax.tree.map(jnp.zeros_like, x.nu))
                if isinstance(x, optax.ScaleByAdamState) else x,
                s, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))

        inner_state = jax.lax.cond(count % every == 0, reset, lambda s: s, inner_state)
        return updates, (count, inner_state)

    return optax.GradientTransformation(init, update)


def _check(config):
    for p in config.method.reptile.periods:
        if not (isinstance(p, dict) and set(p) == {"every", "meta_lr"}
                and int(p["every"]) >= 1 and 0 < float(p["meta_lr"]) <= 1):
            raise ValueError(f"method.reptile.periods entry {p}: give {{'every': k >= 1, "
                             "'meta_lr': keep in (0, 1]}")


def _periods(config):
    return [(int(p["every"]), float(p["meta_lr"])) for p in config.method.reptile.periods]


METHOD = Method(
    name="reptile", defaults={"periods": [], "reset_moments": False},
    outer=lambda c: [reptile(every, keep) for every, keep in _periods(c)],
    wrap_base=lambda c, base: (reset_moments(base, every=_periods(c)[0][0])
                               if c.method.reptile.reset_moments else base),
    active=lambda c: bool(c.method.reptile.periods), check=_check)
