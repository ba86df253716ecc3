"""Diagonal empirical Fisher information for EWC (Kirkpatrick et al. 2017).

F_i = mean_n (d loss_n / d theta_i)^2 over individual examples n: the square of each
example's gradient, not the square of the batch-mean gradient (which would shrink F by
the batch size and lose the per-example variance that EWC relies on).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


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
