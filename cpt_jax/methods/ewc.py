"""Elastic weight consolidation (Kirkpatrick et al. 2017), online (Schwarz et al. 2018):
a diagonal-Fisher-weighted pull toward the weights at the last task boundary.

Keys: ``method.ewc.lam`` (> 0), ``decay`` (online EWC's gamma), ``rows`` (rows of the
finished task the Fisher is estimated on), ``chunk`` (per-example gradients at once).

The diagonal empirical Fisher is F_i = mean_n (d loss_n / d theta_i)^2 over individual
examples n: the square of each example's gradient, not the square of the batch-mean
gradient (which would shrink F by the batch size and lose the per-example variance that
EWC relies on).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cpt_jax.methods.base import Method
from cpt_jax.optim.transforms import replace_states
from cpt_jax.core.losses import token_losses


class EWCState(NamedTuple):
    fisher: Any  # diagonal Fisher, parameter-shaped, accumulated over tasks
    anchor: Any  # theta* at the last task boundary


def ewc(lam: float) -> optax.GradientTransformation:
    """Elastic weight consolidation (Kirkpatrick et al. 2017), diagonal Fisher.

    Adds the gradient of lam/2 * sum_i F_i (theta_i - theta*_i)^2. F is zero until the
    first task ends; at each task boundary the loop adds the Fisher of the task just
    finished, estimated at the current weights, to the running sum (online EWC, Schwarz et
    al. 2018, "Progress & Compress": each task's Fisher enters once) and moves theta* to
    the current weights, with ``set_ewc``. Memory: two parameter copies.
    """

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return EWCState(zeros, jax.tree.map(jnp.asarray, params))

    def update(updates, state: EWCState, params=None):
        updates = jax.tree.map(lambda u, f, p, a: u + lam * f * (p - a), updates,
                               state.fisher, params, state.anchor)
        return updates, state

    return optax.GradientTransformation(init, update)


def set_ewc(opt_state, params, new_fisher, decay: float = 1.0):
    """At a task boundary: F <- decay * F + F_new, theta* <- params (F_new: the Fisher of
    the task just finished only)."""
    return replace_states(
        opt_state, EWCState,
        lambda s: EWCState(jax.tree.map(lambda f, n: decay * f + n, s.fisher, new_fisher),
                           params))


def diag_fisher(per_example_loss: Callable, params, examples, chunk: int = 1):
    """Mean over the leading axis of `examples` of squared per-example gradients.

    `per_example_loss(params, example) -> scalar`; `examples` is a pytree whose leaves have
    a leading example axis N (a multiple of `chunk`). Gradients of `chunk` examples are
    taken at once with vmap and the squares accumulated with lax.scan, so memory holds
    `chunk` gradients, not N.
    """
    n = jax.tree.leaves(examples)[0].shape[0]
    if n % chunk:
        raise ValueError(f"{n} Fisher examples are not a multiple of chunk={chunk}")
    grad_one = jax.grad(per_example_loss)
    chunks = jax.tree.map(lambda x: x.reshape(n // chunk, chunk, *x.shape[1:]), examples)

    def body(acc, ex):
        g = jax.vmap(grad_one, in_axes=(None, 0))(params, ex)
        return jax.tree.map(lambda a, gi: a + jnp.sum(jnp.square(gi), axis=0), acc, g), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    total, _ = jax.lax.scan(body, zeros, chunks)
    return jax.tree.map(lambda t: t / n, total)


def _boundary(config, mcfg):
    def row_loss(params, row):
        one = jax.tree.map(lambda x: x[None], row)
        losses, mask, _ = token_losses(mcfg, params, one)
        return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)

    def apply(state, rows):
        fisher = diag_fisher(row_loss, state.params, rows, config.method.ewc.chunk)
        return state.replace(opt_state=set_ewc(state.opt_state, state.params, fisher,
                                               config.method.ewc.decay))

    return apply


def _check(config):
    e = config.method.ewc
    if e.rows < 1 or e.chunk < 1 or e.rows % e.chunk:
        raise ValueError(f"method.ewc.rows={e.rows} and chunk={e.chunk} must be >= 1, rows a "
                         "multiple of chunk")


METHOD = Method(name="ewc", defaults={"lam": 0.0, "decay": 1.0, "rows": 64, "chunk": 4},
                regularize=lambda c: ewc(c.method.ewc.lam),
                boundary=_boundary,
                boundary_rows=lambda c: c.method.ewc.rows,
                active=lambda c: c.method.ewc.lam > 0, check=_check)
