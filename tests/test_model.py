"""Properties of cpt_jax.model checked against independent expectations (tiny shapes, CPU).

Numerical agreement with transformers itself is in tests/test_hf.py; here: packed rows
behave like separate documents, the layer stacking / remat / compute-dtype options do not
change the function, and RoPE scaling and per-document positions match hand computations.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cpt_jax.model import (LlamaConfig, forward, init_params, positions_from_segments,
                           rope_inv_freq, swiglu)

TINY = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   max_seq_len=64, init_std=0.2)


# jit so each (config, shape) compiles once; eager flax runs op by op and is much slower.
fwd = jax.jit(forward, static_argnums=0)
SHAPE = (2, 12)  # most tests share this batch shape, and so their compiled forward


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(TINY, jax.random.key(0))


def tokens(shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, TINY.vocab_size)


def unstack(stacked):
    """Stacked tree (layers/... with a leading [L] axis) -> per-layer tree (layers_{i}/...)."""
    out = {k: v for k, v in stacked.items() if k != "layers"}
    n = jax.tree.leaves(stacked["layers"])[0].shape[0]
    for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked["layers"])
    return out


def loss_fn(config, params, toks):
    logits = fwd(config, params, toks[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1).mean()


def test_packed_row_equals_documents_run_alone(params):
    lengths = [5, 7, 4]
    docs = [tokens((1, n), seed=i + 1) for i, n in enumerate(lengths)]
    pad = 3
    row = jnp.concatenate(docs + [jnp.zeros((1, pad), jnp.int32)], axis=1)  # [1, 19]
    seg = jnp.array([sum(([i + 1] * n for i, n in enumerate(lengths)), []) + [0] * pad])
    packed = fwd(TINY, params, row, seg)  # [1, 19, V]
    # Each document alone, as one row of a batch, no segment_ids; trailing filler tokens
    # cannot reach back (causality, tested below), so row i's first n_i logits are doc i's.
    alone_rows = jnp.stack([jnp.pad(d[0], (0, max(lengths) - d.shape[1]), constant_values=7)
                            for d in docs])  # [3, 7]
    alone = fwd(TINY, params, alone_rows)  # [3, 7, V]
    start = 0
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(packed[0, start:start + n], alone[i, :n], atol=1e-5, rtol=0)
        start += n


def test_causal(params):
    a = tokens(SHAPE)
    b = a.at[:, 8:].set((a[:, 8:] + 1) % TINY.vocab_size)
    la, lb = fwd(TINY, params, a), fwd(TINY, params, b)
    np.testing.assert_array_equal(la[:, :8], lb[:, :8])
    assert np.abs(la[:, 8:] - lb[:, 8:]).max() > 1e-3


def test_scan_and_unrolled_layers_agree(params):
    toks = tokens(SHAPE)
    unrolled = dataclasses.replace(TINY, scan_layers=False)
    per_layer = unstack(params)
    # the per-layer tree is exactly what the unrolled model initialises
    want = jax.eval_shape(lambda k: init_params(unrolled, k), jax.random.key(0))
    assert jax.tree.structure(want) == jax.tree.structure(per_layer)
    np.testing.assert_allclose(fwd(TINY, params, toks), fwd(unrolled, per_layer, toks),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("scan", [True, False])
def test_full_remat_same_logits_and_grads(params, scan):
    toks = tokens(SHAPE)
    base = dataclasses.replace(TINY, scan_layers=scan)
    remat = dataclasses.replace(base, remat="full")
    p = params if scan else unstack(params)
    np.testing.assert_allclose(fwd(base, p, toks), fwd(remat, p, toks), atol=1e-6, rtol=0)
    grad = jax.jit(jax.grad(loss_fn, argnums=1), static_argnums=0)
    g0, g1 = grad(base, p, toks), grad(remat, p, toks)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0)) > 1e-3  # grads not trivial


def test_bf16_compute_close_to_f32(params):
    toks = tokens(SHAPE)
    f32 = fwd(TINY, params, toks)
    bf16 = fwd(dataclasses.replace(TINY, dtype="bfloat16"), params, toks)
    assert bf16.dtype == jnp.float32
    scale = float(jnp.abs(f32).max())
    assert scale > 0.5
    err = float(jnp.abs(bf16 - f32).max())
    assert err < 0.05 * scale, (err, scale)
    assert err > 0  # bf16 really was used


def test_rope_inv_freq_default():
    c = LlamaConfig(d_model=32, n_heads=4, n_kv_heads=4, rope_theta=10000.0)  # Dh = 8
    np.testing.assert_allclose(rope_inv_freq(c), [1.0, 0.1, 0.01, 0.001], rtol=1e-6)


def test_rope_inv_freq_llama3_scaling_by_hand():
    # Dh = 8, theta = 1e4: base frequencies 1, 0.1, 0.01, 0.001, wavelengths 2*pi/f.
    # original length 100, low 1, high 4: wavelengths < 25 keep their frequency, > 100 are
    # divided by factor 8, and in between are blended with s = (100 / wavelen - 1) / 3.
    c = LlamaConfig(d_model=32, n_heads=4, n_kv_heads=4, rope_theta=10000.0, rope_scaling=dict(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=100))
    # wavelen 6.28: high frequency, kept
    f0 = 1.0
    # wavelen 62.8: medium, s = (100 / 62.83 - 1) / 3 = 0.19718
    s = (100 / (2 * math.pi / 0.1) - 1) / 3
    f1 = (1 - s) * 0.1 / 8 + s * 0.1  # = 0.029754
    # wavelen 628 and 6283: low frequency, divided by 8
    f2, f3 = 0.01 / 8, 0.001 / 8
    assert abs(f1 - 0.029754) < 1e-6
    np.testing.assert_allclose(rope_inv_freq(c), [f0, f1, f2, f3], rtol=1e-6)


def test_positions_from_segments_by_hand():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0],
                     [1, 1, 1, 1, 1, 1, 1, 1],
                     [4, 5, 5, 5, 6, 6, 6, 6]])
    want = [[0, 1, 2, 0, 1, 0, 0, 1],
            [0, 1, 2, 3, 4, 5, 6, 7],
            [0, 0, 1, 2, 0, 1, 2, 3]]
    pos = positions_from_segments(seg)
    assert pos.dtype == jnp.int32
    np.testing.assert_array_equal(pos, want)


def test_swiglu_backward_matches_autodiff_of_its_formula():
    ks = jax.random.split(jax.random.key(5), 5)
    x = jax.random.normal(ks[0], (2, 5, 8))
    wg, wu = jax.random.normal(ks[1], (8, 12)), jax.random.normal(ks[2], (8, 12))
    wd, cot = jax.random.normal(ks[3], (12, 8)), jax.random.normal(ks[4], (2, 5, 8))
    plain = lambda x, wg, wu, wd: jnp.sum(((nn.silu(x @ wg) * (x @ wu)) @ wd) * cot)
    ours = lambda *a: jnp.sum(swiglu(*a) * cot)
    np.testing.assert_allclose(ours(x, wg, wu, wd), plain(x, wg, wu, wd), rtol=1e-6)
    for name, a, b in zip(("x", "gate", "up", "down"),
                          jax.grad(ours, argnums=(0, 1, 2, 3))(x, wg, wu, wd),
                          jax.grad(plain, argnums=(0, 1, 2, 3))(x, wg, wu, wd)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=name)
