"""Last-layer gradient features (cpt_jax.replay.features): the dense reference is jax
autodiff's gradient of each row's mean loss (tied and untied output matrices); the sketch
is exactly the dense gradient projected by its two factors, unbiased for inner products
with the variance its docstring states; the sharded step does not depend on the mesh or on
padding rows; bad dims are refused; trajectory blocks count equally."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpt_jax import model as model_lib
from cpt_jax import sharding as sharding_lib
from cpt_jax.replay import features as F
from cpt_jax.core.losses import token_losses
from cpt_jax.core.state import Placement, param_shardings

D, V, L = 32, 128, 12
B = 6


def _cfg(tied: bool) -> model_lib.LlamaConfig:
    return model_lib.LlamaConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=4, n_kv_heads=2,
                                 d_ff=64, max_seq_len=32, tie_embeddings=tied)


def _params(cfg, seed=0):
    """Random parameters with a sharp output layer, so that softmax(z) is far from both
    uniform and the logits themselves (a wrong 'logits instead of probabilities' shows)."""
    params = model_lib.init_params(cfg, jax.random.key(seed))
    params = jax.tree.map(lambda x: x, params)
    if cfg.tie_embeddings:
        params["embed"]["embedding"] = params["embed"]["embedding"] * 40.0
    else:
        params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 40.0
    return params


def _batch(seed=0, rows=B, low_vocab=V):
    """Packed rows: two documents per row (a boundary the mask must skip), different
    amounts of padding (so the token counts n_r differ), and the last row all padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, low_vocab, size=(rows, L + 1), dtype=np.int32)
    seg = np.ones((rows, L + 1), np.int32)
    for r in range(rows):
        seg[r, rng.integers(3, L - 3):] = 2
        seg[r, L + 1 - r:] = 0  # r padding tokens at the end
    seg[rows - 1] = 0
    return {"tokens": tokens, "segment_ids": seg}


def _row_mean_loss(losses_BL, mask_BL, r):
    losses_BL, mask_BL = jnp.asarray(losses_BL), jnp.asarray(mask_BL)
    return jnp.sum(losses_BL[r] * mask_BL[r]) / jnp.maximum(jnp.sum(mask_BL[r]), 1.0)


def test_batch_exercises_mask_and_lengths():
    b = _batch()
    _, mask, _ = token_losses(_cfg(False), _params(_cfg(False)), b)
    n = np.asarray(mask.sum(1))
    assert len(set(n[:-1].tolist())) == B - 1 and n[-1] == 0  # every n_r differs; one empty
    inside = (b["segment_ids"][:, 1:] > 0) & (b["segment_ids"][:, :-1] > 0)
    assert (np.asarray(mask)[inside] == 0).sum() >= B - 1  # a document boundary in each row


@pytest.mark.parametrize("tied", [False, True])
def test_forward_hidden_is_the_output_projection_input(tied):
    cfg = _cfg(tied)
    params, b = _params(cfg), _batch()
    tokens, seg = b["tokens"][:, :-1], b["segment_ids"][:, :-1]
    hidden, logits = model_lib.forward_hidden(cfg, params, tokens, seg)
    assert hidden.shape == (B, L, D) and hidden.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(logits),
                                  np.asarray(model_lib.forward(cfg, params, tokens, seg)))
    w = params["embed"]["embedding"].T if tied else params["lm_head"]["kernel"]
    np.testing.assert_allclose(np.asarray(hidden @ w), np.asarray(logits), rtol=1e-5, atol=1e-4)


def test_dense_equals_autodiff_untied():
    """jax.grad of each row's mean token loss through the whole model, w.r.t. lm_head."""
    cfg = _cfg(False)
    params, b = _params(cfg), _batch()

    def row_loss(p, r):
        losses, mask, _ = token_losses(cfg, p, b)
        return _row_mean_loss(losses, mask, r)

    want = jax.vmap(lambda r: jax.grad(row_loss)(params, r)["lm_head"]["kernel"])(jnp.arange(B))
    got = F.dense_last_layer_grads(cfg, params, b).reshape(B, D, V)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale, rtol=1e-4)
    assert not np.any(np.asarray(got[-1]))  # the all-padding row has no gradient
    assert float(jnp.min(jnp.linalg.norm(want[:-1].reshape(B - 1, -1), axis=1))) > 0.1 * scale


def test_dense_equals_autodiff_tied():
    """Tied embeddings: the output side of the embedding's gradient, isolated by
    differentiating logits = h @ W.T w.r.t. an explicit W with h held fixed; and, through
    the whole model, on the vocabulary rows that no input uses (their only gradient is the
    output side)."""
    cfg = _cfg(True)
    params, b = _params(cfg), _batch(low_vocab=V // 2)  # ids >= V/2 never occur
    tokens, seg = b["tokens"], b["segment_ids"]
    hidden, _ = model_lib.forward_hidden(cfg, params, tokens[:, :-1], seg[:, :-1])
    _, mask, _ = token_losses(cfg, params, b)

    def row_loss_w(w, r):
        losses = optax.softmax_cross_entropy_with_integer_labels(hidden @ w.T, tokens[:, 1:])
        return _row_mean_loss(losses, mask, r)

    w0 = params["embed"]["embedding"]  # [V, D]
    want = jax.vmap(lambda r: jax.grad(row_loss_w)(w0, r))(jnp.arange(B))  # [B, V, D]
    got = F.dense_last_layer_grads(cfg, params, b).reshape(B, D, V)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want.transpose(0, 2, 1)),
                               atol=1e-5 * scale, rtol=1e-4)

    def row_loss(p, r):
        losses, m, _ = token_losses(cfg, p, b)
        return _row_mean_loss(losses, m, r)

    full = jax.vmap(lambda r: jax.grad(row_loss)(params, r)["embed"]["embedding"])(jnp.arange(B))
    unused = slice(V // 2, V)
    np.testing.assert_allclose(np.asarray(got[:, :, unused]),
                               np.asarray(full[:, unused, :].transpose(0, 2, 1)),
                               atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_projected_is_the_projected_dense_gradient(tied):
    cfg = _cfg(tied)
    params, b = _params(cfg), _batch()
    proj = F.make_projection(D, V, 256, seed=3)
    assert proj.hidden.shape == (D, 16) and proj.vocab.shape == (V, 16) and proj.dim == 256
    dense = F.dense_last_layer_grads(cfg, params, b).reshape(B, D, V)
    want = jnp.einsum("da,bdv,vc->bac", proj.hidden, dense, proj.vocab).reshape(B, -1)
    got = F.projected_last_layer_grads(cfg, params, b, proj)
    assert got.shape == (B, 256) and got.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale, rtol=1e-4)


def _sketch_many(dense_BDV, dim, seeds):
    """Sketches of the same dense gradients under many seeds: [S, B, dim]."""
    def one(seed):
        p = F.make_projection(D, V, dim, seed)
        return jnp.einsum("da,bdv,vc->bac", p.hidden, dense_BDV, p.vocab).reshape(
            dense_BDV.shape[0], -1)
    return jnp.stack([one(s) for s in seeds])


def _norm_variance(g_DV, a, b):
    """Exact variance of ||P_h^T G P_v||_F^2 for Gaussian factors (module docstring):
    (2 T^2 + 2 (a + b + 1) Q) / (a b), T = ||G||_F^2, Q = ||G G^T||_F^2."""
    t = float(jnp.sum(g_DV ** 2))
    q = float(jnp.sum((g_DV @ g_DV.T) ** 2))
    return (2 * t * t + 2 * (a + b + 1) * q) / (a * b)


def test_sketch_preserves_norms_within_their_exact_spread():
    """One seed, dim = 1024 (a = b = 32): every row's squared feature norm is within 5
    standard deviations (exact Gaussian variance) of its dense gradient's; by Chebyshev a
    miss has probability <= 4% per row even without normality. The bound is also tight
    enough that a sketch with the wrong entry variance (e.g. N(0, 1) instead of 1/a) or of
    the sum-loss gradient would fail."""
    cfg = _cfg(False)
    params, b = _params(cfg), _batch()
    dense = F.dense_last_layer_grads(cfg, params, b).reshape(B, D, V)
    proj = F.make_projection(D, V, 1024, seed=0)
    a, c = proj.hidden.shape[1], proj.vocab.shape[1]
    assert (a, c) == (32, 32)
    feats = F.projected_last_layer_grads(cfg, params, b, proj)
    for r in range(B - 1):
        true = float(jnp.sum(dense[r] ** 2))
        sd = math.sqrt(_norm_variance(dense[r], a, c))
        assert sd < 0.35 * true  # the check below is a meaningful one
        assert abs(float(jnp.sum(feats[r] ** 2)) - true) <= 5 * sd, r


def test_sketch_gram_is_unbiased_and_has_the_stated_variance():
    """Over 200 seeds: the mean sketched Gram matrix matches the dense one within 5
    standard errors in every entry (unbiased: E <f_r, f_s> = <G_r, G_s>), and the sample
    variance of squared norms matches the closed form within 35% (its own sampling error
    for 200 draws is ~10-20%)."""
    cfg = _cfg(False)
    params, b = _params(cfg), _batch()
    dense = F.dense_last_layer_grads(cfg, params, b).reshape(B, D, V)[:-1]
    n, dim = 200, 64
    sk = _sketch_many(dense, dim, range(n))  # [S, B-1, dim]
    grams = jnp.einsum("sbi,sci->sbc", sk, sk)
    true = jnp.einsum("bdv,cdv->bc", dense, dense)
    se = jnp.std(grams, axis=0, ddof=1) / math.sqrt(n)
    z = np.asarray(jnp.abs(grams.mean(0) - true) / se)
    assert z.max() < 5, z
    a, c = F.factor_dim(D, V, dim)
    for r in range(B - 1):
        emp = float(jnp.var(grams[:, r, r], ddof=1))
        assert emp == pytest.approx(_norm_variance(dense[r], a, c), rel=0.35), r


def test_projection_is_seeded_and_factored():
    p1, p2 = F.make_projection(D, V, 256, 7), F.make_projection(D, V, 256, 7)
    np.testing.assert_array_equal(np.asarray(p1.vocab), np.asarray(p2.vocab))
    assert not np.array_equal(np.asarray(p1.hidden),
                              np.asarray(F.make_projection(D, V, 256, 8).hidden))
    assert F.factor_dim(4096, 32000, 256) == (16, 16)
    assert F.factor_dim(4096, 32000, 512) == (32, 16)
    assert F.factor_dim(4, 32000, 64) == (4, 16)  # a capped by d
    assert F.factor_dim(512, 8, 64) == (8, 8)
    big = F.make_projection(64, 4096, 64 * 64, 0)
    assert float(jnp.var(big.hidden)) == pytest.approx(1 / 64, rel=0.05)
    assert float(jnp.var(big.vocab)) == pytest.approx(1 / 64, rel=0.05)


@pytest.mark.parametrize("dim, match", [(0, "dim=0"), (-4, "dim=-4"), (2.5, "dim=2.5"),
                                        (True, "dim=True"), (D * V + 1, "exceeds"),
                                        (131, "no factorisation")])
def test_bad_dim_raises(dim, match):
    with pytest.raises(ValueError, match=match):
        F.make_projection(D, V, dim, 0)
    mesh = sharding_lib.make_mesh({"data": 1}, jax.devices()[:1])
    with pytest.raises(ValueError, match=match):
        F.make_feature_step(Placement(_cfg(False), mesh, sharding_lib.DEFAULT_RULES, None),
                            dim, 0)


def test_projection_for_another_model_raises():
    cfg = _cfg(False)
    with pytest.raises(ValueError, match="make_projection"):
        F.projected_last_layer_grads(cfg, _params(cfg), _batch(),
                                     F.make_projection(D, 2 * V, 64, 0))


@pytest.mark.parametrize("mesh_axes", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_feature_step_independent_of_mesh_and_padding_rows(mesh_axes):
    cfg = _cfg(False)
    params, b = _params(cfg), _batch(rows=B)
    want = F.projected_last_layer_grads(cfg, params, b, F.make_projection(D, V, 256, 5))

    rules = sharding_lib.DEFAULT_RULES
    mesh = sharding_lib.make_mesh(mesh_axes)
    shard = param_shardings(cfg, mesh, rules)
    step = F.make_feature_step(Placement(cfg, mesh, rules, shard), 256, seed=5)
    # B = 6 real rows padded to 8 with all-padding rows (anywhere: here first and last)
    pad = lambda x: np.concatenate([np.zeros_like(x[:1]), x, np.zeros_like(x[:1])])
    batch = {k: pad(v) for k, v in b.items()}
    got = step(jax.device_put(params, shard), batch)
    assert got.shape == (B + 2, 256) and got.dtype == jnp.float32
    assert got.sharding.is_fully_replicated
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got[1:-1]), np.asarray(want), atol=1e-5 * scale,
                               rtol=1e-4)
    assert not np.any(np.asarray(got[0])) and not np.any(np.asarray(got[-1]))


def test_trajectory_features_weigh_points_equally():
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(10, 4)), rng.normal(size=(10, 6))
    out = F.trajectory_features([f1, 1000.0 * f2])
    assert out.shape == (10, 10) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(F.trajectory_features([f1, f2])),
                               rtol=1e-5)
    for block in (out[:, :4], out[:, 4:]):  # mean squared row norm 1 per parameter point
        assert float(jnp.mean(jnp.sum(block ** 2, axis=1))) == pytest.approx(1.0, rel=1e-5)
    zero = F.trajectory_features([f1, np.zeros((10, 3))])
    assert not np.any(np.asarray(zero[:, 4:])) and np.all(np.isfinite(np.asarray(zero)))
    with pytest.raises(ValueError, match="row counts"):
        F.trajectory_features([f1, f2[:9]])
    with pytest.raises(ValueError, match="empty"):
        F.trajectory_features([])
    with pytest.raises(ValueError, match="2-D"):
        F.trajectory_features([f1, f2[0]])
