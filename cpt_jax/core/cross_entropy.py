"""Next-token cross-entropy fused with the output projection, in token chunks.

``weighted_ce_sum(hidden, w, targets, weights) = sum_n weights_n * CE(hidden_n @ w, target_n)``
without ever holding the [N, V] logits of the whole batch: the tokens are taken
``chunk`` at a time (``lax.scan``), and each chunk's logits [chunk, V] live only inside
its iteration. Under differentiation the forward pass also forms the gradient, since
``d CE / d logits = softmax - onehot`` is known once the log-sum-exp is: per chunk,
``dlogits = (softmax - onehot) * weights``, ``d hidden = dlogits @ w^T`` and
``dw += hidden^T @ dlogits``, so the backward pass only scales them by the incoming
scalar cotangent. That is three matmuls with the output matrix and one exp pass over the
logits, where differentiating ``optax.softmax_cross_entropy_with_integer_labels`` on full
logits holds [N, V] float32 logits and their gradient at once (8.4 GB for Llama-3 at 8 x 2048
tokens) and passes over them several times.

The logits and softmax are float32 whatever the compute dtype of ``hidden`` (matmuls in
that dtype with float32 accumulation), as in the model's own output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def max_chunk_logits() -> int:
    """Logits held at once: 2^24 float32 (64 MB) on a CPU, where a chunk that stays near the
    caches is fastest; 2^28 (1 GB) on an accelerator, where each chunk adds a read and write
    of the float32 [D, V] weight-gradient accumulator (2 GB at Llama-3's D 2048, V 128256),
    so a few large chunks beat many small ones."""
    return 1 << 24 if jax.default_backend() == "cpu" else 1 << 28


def token_chunk(n_tokens: int, vocab: int, max_logits: int | None = None) -> int:
    """The largest divisor of ``n_tokens`` whose chunk holds at most ``max_logits`` logits
    (default ``max_chunk_logits()``)."""
    limit = max(1, (max_logits or max_chunk_logits()) // vocab)
    return max(c for c in range(1, min(n_tokens, limit) + 1) if n_tokens % c == 0)


def weighted_ce_sum(hidden_ND, w_DV, targets_N, weights_N, max_logits: int | None = None):
    """sum_n weights_n * (logsumexp(hidden_n @ w) - (hidden_n @ w)[target_n]), float32.

    ``hidden`` [N, D] in the compute dtype, ``w`` [D, V] (any float dtype; the matmuls use
    hidden's), ``targets`` [N] int, ``weights`` [N] float (the loss mask). Differentiable in
    hidden, w and weights."""
    chunk = token_chunk(hidden_ND.shape[0], w_DV.shape[1], max_logits)
    with jax.named_scope("cross_entropy"):  # names its ops in profiles (eval.step_profile)
        return _ce_sum(chunk, hidden_ND, w_DV, targets_N.astype(jnp.int32),
                       weights_N.astype(jnp.float32))


def _chunks(chunk, *arrays):
    return tuple(a.reshape(a.shape[0] // chunk, chunk, *a.shape[1:]) for a in arrays)


def _chunk_logits(h_CD, w_DV):
    return jnp.dot(h_CD, w_DV.astype(h_CD.dtype), preferred_element_type=jnp.float32)


def _token_losses(logits_CV, t_C):
    lse = jax.nn.logsumexp(logits_CV, axis=-1)
    return lse - jnp.take_along_axis(logits_CV, t_C[:, None], axis=-1)[:, 0], lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ce_sum(chunk, hidden_ND, w_DV, targets_N, weights_N):
    def body(total, xs):
        h, t, wt = xs
        losses, _ = _token_losses(_chunk_logits(h, w_DV), t)
        return total + jnp.sum(losses * wt), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            _chunks(chunk, hidden_ND, targets_N, weights_N))
    return total


def _ce_sum_fwd(chunk, hidden_ND, w_DV, targets_N, weights_N):
    w_c = w_DV.astype(hidden_ND.dtype)

    def body(carry, xs):
        total, dw = carry
        h, t, wt = xs
        logits = _chunk_logits(h, w_c)
        losses, lse = _token_losses(logits, t)
        probs = jnp.exp(logits - lse[:, None])
        onehot = jax.nn.one_hot(t, logits.shape[-1], dtype=jnp.float32)
        dlogits = ((probs - onehot) * wt[:, None]).astype(h.dtype)
        dh = jnp.dot(dlogits, w_c.T, preferred_element_type=jnp.float32).astype(h.dtype)
        dw = dw + jnp.dot(h.T, dlogits, preferred_element_type=jnp.float32)
        return (total + jnp.sum(losses * wt), dw), (dh, losses)

    zeros = jnp.zeros(w_DV.shape, jnp.float32)
    (total, dw), (dh, losses) = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros),
        _chunks(chunk, hidden_ND, targets_N, weights_N))
    return total, (dh.reshape(hidden_ND.shape), dw.astype(w_DV.dtype), losses.reshape(-1))


def _ce_sum_bwd(chunk, res, g):
    dh, dw, losses = res
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), None, g * losses


_ce_sum.defvjp(_ce_sum_fwd, _ce_sum_bwd)
