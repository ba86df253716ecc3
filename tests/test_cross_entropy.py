"""The fused, chunked cross-entropy against optax on full logits: value and gradients, with
several chunks, uneven weights and a model end to end (``ce_loss_sum`` against
``token_losses``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpt_jax import model as model_lib
from cpt_jax.core.cross_entropy import token_chunk, weighted_ce_sum
from cpt_jax.core.losses import ce_loss_sum, token_losses

# float32 tests at full precision, on GPUs too (conftest)
pytestmark = pytest.mark.usefixtures("exact_float32_matmuls")


def test_chunk_is_the_largest_divisor_within_the_budget():
    assert token_chunk(12, 10, max_logits=40) == 4  # 4 tokens x 10 logits
    assert token_chunk(12, 10, max_logits=59) == 4  # 5 does not divide 12
    assert token_chunk(7, 10, max_logits=40) == 1  # prime
    assert token_chunk(2048, 32000, max_logits=1 << 24) == 512  # 524 -> 512
    assert token_chunk(8, 10, max_logits=10_000) == 8  # everything in one chunk


@pytest.mark.parametrize("max_logits", [40, 10_000])  # 3 chunks of 4 tokens, or one
def test_value_and_gradients_match_optax_on_full_logits(max_logits):
    N, D, V = 12, 6, 10
    ks = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(ks[0], (N, D))
    w = jax.random.normal(ks[1], (D, V))
    t = jax.random.randint(ks[2], (N,), 0, V)
    wt = jax.random.uniform(ks[3], (N,)) * (jnp.arange(N) % 5 != 0)  # some weights 0

    def ref(h, w, wt):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(h @ w, t) * wt)

    ours = lambda h, w, wt: weighted_ce_sum(h, w, t, wt, max_logits=max_logits)
    np.testing.assert_allclose(ours(h, w, wt), ref(h, w, wt), rtol=1e-6)
    g_ours = jax.grad(lambda *a: 2.5 * ours(*a), argnums=(0, 1, 2))(h, w, wt)
    g_ref = jax.grad(lambda *a: 2.5 * ref(*a), argnums=(0, 1, 2))(h, w, wt)
    for name, a, b in zip(("hidden", "w", "weights"), g_ours, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("tied", [False, True])
def test_ce_loss_sum_equals_the_sum_over_full_logits(tied):
    cfg = model_lib.LlamaConfig(vocab_size=48, d_model=16, n_layers=1, n_heads=2,
                                n_kv_heads=1, d_ff=32, max_seq_len=16, init_std=0.3,
                                tie_embeddings=tied)
    params = model_lib.init_params(cfg, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (3, 9), 0, cfg.vocab_size)
    seg = jnp.array([[1] * 9, [1] * 4 + [2] * 5, [3] * 6 + [0] * 3])
    batch = {"tokens": tokens, "segment_ids": seg, "row_weight": jnp.array([1.0, 0.5, 2.0])}

    def full(p):
        losses, mask, _ = token_losses(cfg, p, batch)
        return jnp.sum(losses * mask)

    fused = lambda p: ce_loss_sum(cfg, p, batch)[0]
    np.testing.assert_allclose(fused(params), full(params), rtol=1e-6)
    g_fused, g_full = jax.grad(fused)(params), jax.grad(full)(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_fused),
                            jax.tree.leaves(g_full)):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_bfloat16_compute_gives_the_float32_loss_and_gradient():
    """The accelerator configs' precision (bf16 compute, float32 parameters) on CPU: the
    same loss as float32 compute to bf16 accuracy, and a gradient pointing the same way."""
    shape = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                 max_seq_len=32, init_std=0.1)
    f32 = model_lib.LlamaConfig(**shape)
    bf16 = model_lib.LlamaConfig(**shape, dtype="bfloat16")
    params = model_lib.init_params(f32, jax.random.key(3))
    tokens = jax.random.randint(jax.random.key(4), (4, 17), 0, 64)
    seg = jnp.concatenate([jnp.ones((4, 9), jnp.int32), 2 * jnp.ones((4, 8), jnp.int32)], 1)
    batch = {"tokens": tokens, "segment_ids": seg}
    (l32, _), g32 = jax.value_and_grad(lambda p: ce_loss_sum(f32, p, batch), has_aux=True)(params)
    (l16, _), g16 = jax.value_and_grad(lambda p: ce_loss_sum(bf16, p, batch), has_aux=True)(params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g16))  # float32 master grads
    np.testing.assert_allclose(l16, l32, rtol=1e-2)
    flat32, flat16 = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)]) for g in (g32, g16))
    cos = flat32 @ flat16 / (jnp.linalg.norm(flat32) * jnp.linalg.norm(flat16))
    assert cos > 0.99, cos
    assert not np.allclose(l16, l32, rtol=1e-7)  # bf16 really was used
