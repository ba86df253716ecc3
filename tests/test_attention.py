"""cpt_jax.attention's "xla" implementation against a plain softmax attention built from a
mask written out position by position, forward and gradients (its backward pass is the
FlashAttention-2 formula, the reference's is autodiff through the softmax)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax import attention

B, L, H, K, D = 2, 9, 4, 2, 8
# row 0: documents of 4, 3 and 2 tokens; row 1: one of 6 then 3 padding tokens
SEGMENTS = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3], [5, 5, 5, 5, 5, 5, 0, 0, 0]], np.int32)


def visible_by_hand():
    """[B, L, S]: key s visible from query l iff s <= l and both are in one document."""
    m = np.zeros((B, L, L), bool)
    for b in range(B):
        for l in range(L):
            for s in range(l + 1):
                m[b, l, s] = SEGMENTS[b, l] == SEGMENTS[b, s]
    return m


def reference(q, k, v):
    """Per query head h, kv head h // (H / K); softmax of masked scaled scores."""
    mask = jnp.asarray(visible_by_hand())
    outs = []
    for h in range(H):
        kv = h // (H // K)
        s = jnp.einsum("bld,bsd->bls", q[:, :, h], k[:, :, kv]) / math.sqrt(D)
        p = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1)
        outs.append(jnp.einsum("bls,bsd->bld", p, v[:, :, kv]))
    return jnp.stack(outs, axis=2)


def _inputs(seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, L, H, D))
    k = jax.random.normal(ks[1], (B, L, K, D))
    v = jax.random.normal(ks[2], (B, L, K, D))
    cot = jax.random.normal(ks[3], (B, L, H, D))  # a random cotangent: every output counts
    return q, k, v, cot


def test_mask_is_causal_within_documents():
    np.testing.assert_array_equal(attention.attention_mask(jnp.asarray(SEGMENTS)),
                                  visible_by_hand())


def test_xla_attention_and_its_gradients_match_plain_softmax():
    q, k, v, cot = _inputs()
    seg = jnp.asarray(SEGMENTS)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * cot)

    ours = lambda q, k, v: attention.dot_product_attention(q, k, v, seg, "xla")
    np.testing.assert_allclose(jax.jit(ours)(q, k, v), reference(q, k, v), atol=2e-6)
    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_ours, g_ref):
        np.testing.assert_allclose(a, b, atol=2e-5, err_msg=f"d{name}")


def test_bfloat16_inputs_stay_close_to_float32():
    q, k, v, _ = _inputs(1)
    seg = jnp.asarray(SEGMENTS)
    out16 = attention.dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), seg)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(out16.astype(jnp.float32), reference(q, k, v), atol=3e-2)


def test_auto_resolves_to_xla_off_gpu_and_names_are_checked():
    if jax.default_backend() != "gpu":
        assert attention.resolve("auto", jnp.bfloat16) == "xla"
    assert attention.resolve("auto", jnp.float32) == "xla"  # cuDNN needs a 16-bit dtype
    with pytest.raises(ValueError, match="choose one of"):
        attention.resolve("flash", jnp.float32)
