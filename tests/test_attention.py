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

# float32 tests at full precision, on GPUs too (conftest)
pytestmark = pytest.mark.usefixtures("exact_float32_matmuls")


def visible_by_hand(segments=SEGMENTS):
    """[B, L, S]: key s visible from query l iff s <= l and both are in one document."""
    b_, l_ = segments.shape
    m = np.zeros((b_, l_, l_), bool)
    for b in range(b_):
        for l in range(l_):
            for s in range(l + 1):
                m[b, l, s] = segments[b, l] == segments[b, s]
    return m


def reference(q, k, v, segments=SEGMENTS):
    """Per query head h, kv head h // (H / K); softmax of masked scaled scores."""
    mask = jnp.asarray(visible_by_hand(segments))
    h_, k_, d_ = q.shape[2], k.shape[2], q.shape[3]
    outs = []
    for h in range(h_):
        kv = h // (h_ // k_)
        s = jnp.einsum("bld,bsd->bls", q[:, :, h], k[:, :, kv]) / math.sqrt(d_)
        p = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1)
        outs.append(jnp.einsum("bls,bsd->bld", p, v[:, :, kv]))
    return jnp.stack(outs, axis=2)


def _inputs(seed=0, shape=(B, L, H, K, D)):
    b, l, h, k_, d = shape
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, l, h, d))
    k = jax.random.normal(ks[1], (b, l, k_, d))
    v = jax.random.normal(ks[2], (b, l, k_, d))
    cot = jax.random.normal(ks[3], (b, l, h, d))  # a random cotangent: every output counts
    return q, k, v, cot


def test_mask_is_causal_within_documents():
    np.testing.assert_array_equal(attention.attention_mask(jnp.asarray(SEGMENTS)),
                                  visible_by_hand())


def test_query_blocks_cover_the_row_evenly():
    assert attention.query_blocks(31) == [(0, 31)]  # shorter than two blocks: one
    assert attention.query_blocks(64) == [(0, 32), (32, 64)]
    assert attention.query_blocks(100) == [(0, 33), (33, 67), (67, 100)]
    assert attention.query_blocks(512) == [(i * 64, i * 64 + 64) for i in range(8)]  # at most 8


# one block; uneven blocks of 2-3 queries with documents across their edges; one query each
@pytest.mark.parametrize("min_block", [L, 2, 1])
def test_xla_attention_and_its_gradients_match_plain_softmax(monkeypatch, min_block):
    monkeypatch.setattr(attention, "MIN_QUERY_BLOCK", min_block)
    monkeypatch.setattr(attention, "MAX_QUERY_BLOCKS", L)
    assert len(attention.query_blocks(L)) == L // min_block
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
        assert attention.resolve("auto", jnp.bfloat16, 128) == "xla"
    else:
        assert attention.resolve("auto", jnp.bfloat16, 128) == "cudnn"
    assert attention.resolve("auto", jnp.float32, 128) == "xla"  # cuDNN: 16-bit dtypes
    assert attention.resolve("auto", jnp.bfloat16, 100) == "xla"  # and lengths it tiles
    assert attention.resolve("cudnn", jnp.float32, 100) == "cudnn"  # explicit: as asked
    with pytest.raises(ValueError, match="choose one of"):
        attention.resolve("flash", jnp.float32, 128)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_cudnn_matches_the_reference_on_packed_rows_in_bfloat16():
    """Run on the GPU machine: cuDNN's kernel with the same-document mask gives the plain
    softmax's output and gradients to bfloat16 accuracy."""
    # cuDNN wants 16-bit operands and lengths it tiles (a multiple of 64): 128 tokens,
    # row 0 packs documents of 50, 40 and 38 tokens, row 1 one of 100 and 28 padding
    segments = np.array([[1] * 50 + [2] * 40 + [3] * 38, [7] * 100 + [0] * 28], np.int32)
    q, k, v, cot = _inputs(2, shape=(2, 128, 4, 2, 64))
    seg = jnp.asarray(segments)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * cot)

    ours = lambda q, k, v: attention.dot_product_attention(q, k, v, seg, "cudnn")
    ref = lambda q, k, v: reference(*(x.astype(jnp.float32) for x in (q, k, v)), segments)
    np.testing.assert_allclose(jax.jit(ours)(q16, k16, v16).astype(jnp.float32),
                               ref(q16, k16, v16), atol=3e-2)
    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q16, k16, v16)
    g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q16, k16, v16)
    for name, a, b in zip("qkv", g_ours, g_ref):
        np.testing.assert_allclose(a.astype(jnp.float32), b, atol=6e-2, rtol=3e-2,
                                   err_msg=f"d{name}")


def _block_inputs():
    ks = jax.random.split(jax.random.key(7), 7)
    Dm = 12
    x = jax.random.normal(ks[0], (B, L, Dm))
    wq = jax.random.normal(ks[1], (Dm, H, D)) / 3
    wk, wv = (jax.random.normal(k_, (Dm, K, D)) / 3 for k_ in ks[2:4])
    wo = jax.random.normal(ks[4], (H, D, Dm)) / 3
    cot = jax.random.normal(ks[5], (B, L, Dm))
    pos = jnp.asarray(np.where(SEGMENTS > 0, np.arange(L)[None] % 5, 0))
    theta = pos[..., None] * (1.0 / 10000 ** (jnp.arange(D // 2) / (D // 2)))  # [B, L, D/2]
    return (x, wq, wk, wv, wo), cot, theta


def _block_loss(cot, theta):
    angles = jnp.concatenate([theta, theta], axis=-1)[:, :, None]
    cos, sin, seg = jnp.cos(angles), jnp.sin(angles), jnp.asarray(SEGMENTS)
    return lambda *w: jnp.sum(attention.attention_block(*w, cos, sin, seg) * cot)


@pytest.mark.parametrize("keep", [True, False], ids=["probabilities_kept", "recomputed"])
def test_attention_block_and_its_gradients_match_the_sublayer_written_plainly(
        monkeypatch, keep):
    """Projections, rotary embedding (written per pair of dimensions), attention and output
    projection composed from the plain pieces, differentiated by autodiff; with the
    backward pass on the forward's kept probabilities and on recomputed ones."""
    monkeypatch.setattr(attention, "KEEP_PROBABILITIES_MAX", 1 << 30 if keep else 0)
    monkeypatch.setattr(attention, "MIN_QUERY_BLOCK", 3)  # 3 blocks of 3 queries
    assert attention.keeps_probabilities(B, H, L) == keep
    args, cot, theta = _block_inputs()

    def rope_by_pairs(x):  # dimension i pairs with i + D/2, rotated by theta_i
        c, s = jnp.cos(theta)[:, :, None], jnp.sin(theta)[:, :, None]
        a, b = x[..., :D // 2], x[..., D // 2:]
        return jnp.concatenate([a * c - b * s, b * c + a * s], axis=-1)

    def plain(x, wq, wk, wv, wo):
        q = rope_by_pairs(jnp.einsum("bld,dhk->blhk", x, wq))
        k = rope_by_pairs(jnp.einsum("bld,dhk->blhk", x, wk))
        v = jnp.einsum("bld,dhk->blhk", x, wv)
        return jnp.sum(jnp.einsum("blhk,hkd->bld", reference(q, k, v), wo) * cot)

    ours = _block_loss(cot, theta)
    np.testing.assert_allclose(jax.jit(ours)(*args), plain(*args), rtol=1e-5)
    g_ours = jax.jit(jax.grad(ours, argnums=range(5)))(*args)
    g_plain = jax.grad(plain, argnums=range(5))(*args)
    for name, a, b in zip(("x", "wq", "wk", "wv", "wo"), g_ours, g_plain):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-5, err_msg=name)


def test_kept_probabilities_give_the_recomputed_gradients_bit_for_bit(monkeypatch):
    """Keeping the forward's probabilities (CPU, small) saves each query block's
    [B, K, G, hi - lo, hi] probabilities for the backward pass and changes no bit of the
    gradients: they are kept as the backward recomputes them. The rule: at most
    KEEP_PROBABILITIES_MAX floats per layer, B * H * sum over blocks of (hi - lo) * hi."""
    monkeypatch.setattr(attention, "MIN_QUERY_BLOCK", 3)  # blocks [0,3) [3,6) [6,9)
    n = B * H * (3 * 3 + 3 * 6 + 3 * 9)
    block_probs = {(B, K, H // K, 3, hi) for hi in (3, 6, 9)}
    args, cot, theta = _block_inputs()
    loss = _block_loss(cot, theta)
    grads = {}
    for keep, limit in ((True, n), (False, n - 1)):
        monkeypatch.setattr(attention, "KEEP_PROBABILITIES_MAX", limit)
        assert attention.keeps_probabilities(B, H, L) == keep
        _, backward = jax.vjp(loss, *args)
        saved = {tuple(r.shape) for r in jax.tree.leaves(backward)}
        assert (block_probs <= saved) == keep, saved
        grads[keep] = jax.jit(jax.grad(loss, argnums=range(5)))(*args)
    for a, b in zip(grads[True], grads[False]):
        np.testing.assert_array_equal(a, b)
