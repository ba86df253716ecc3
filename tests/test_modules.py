"""Domain modules by weight masks (cpt_jax.modules; Kingetsu, Kobayashi, Suzuki 2021).

References are independent of the code under test: the straight-through gradient is
computed by hand, a masked forward is compared with the forward of weights zeroed by numpy
indexing, and the planted case knows its supports by construction.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpt_jax import modules
from cpt_jax import sharding as sharding_lib
from cpt_jax.model import LlamaConfig, forward, init_params
from cpt_jax.core.losses import ce_loss_sum
from cpt_jax.core.state import param_shardings

pytestmark = pytest.mark.usefixtures("exact_float32_matmuls")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------ straight-through, by hand


def test_straight_through_gradient_2x2_by_hand():
    W = np.array([[2.0, -1.0], [0.5, 3.0]], np.float32)
    S = np.array([[1.5, -0.5], [-2.0, 0.3]], np.float32)  # hard mask [[1, 0], [0, 1]]
    C = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    params = {"w": {"kernel": jnp.asarray(W)}}

    def loss(logits):
        masked = modules.apply_mask(params, {"w/kernel": modules.binarize(logits)})
        return jnp.sum(jnp.asarray(C) * masked["w"]["kernel"])

    value, grad = jax.value_and_grad(loss)(jnp.asarray(S))
    # forward: only W[0,0] and W[1,1] kept: 1*2 + 4*3
    assert float(value) == 14.0
    # backward: dL/dS_ij = C_ij W_ij sigmoid(S_ij) (1 - sigmoid(S_ij)), also where m_ij = 0
    want = [[C[i, j] * W[i, j] * _sigmoid(S[i, j]) * (1 - _sigmoid(S[i, j])) for j in range(2)]
            for i in range(2)]
    # e.g. entry (0, 1): 2 * (-1) * s(-0.5) (1 - s(-0.5)) = -2 * 0.37754 * 0.62246 = -0.47001
    assert abs(want[0][1] - (-0.470008)) < 1e-5
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-6)

    # the density term: d density / d S_ij = sigmoid'(S_ij) / 4; density = 2 / 4
    d, g = jax.value_and_grad(lambda s: modules.density({"w/kernel": modules.binarize(s)}))(
        jnp.asarray(S))
    assert float(d) == 0.5
    np.testing.assert_allclose(
        np.asarray(g), [[_sigmoid(s) * (1 - _sigmoid(s)) / 4 for s in row] for row in S.tolist()],
        rtol=1e-6)


def test_sampled_masks_keep_with_probability_sigmoid():
    """Training masks are Gumbel-sigmoid samples: weight i kept with probability
    sigmoid(s_i); their gradient is the straight-through one at the noisy logit, which has
    the sign of the loss gradient times w (never flips it)."""
    s = np.array([-1.0, 0.0, 1.5], np.float32)
    logits = {"w": jnp.asarray(np.tile(s, (1, 20000)))}  # [K=1, 60000]
    kept = np.asarray(modules.sample_masks(logits, jax.random.key(0))["w"]).reshape(20000, 3)
    np.testing.assert_allclose(kept.mean(0), [_sigmoid(x) for x in s], atol=0.01)
    # the mode (no key) is the hard threshold
    np.testing.assert_array_equal(np.asarray(modules.sample_masks(logits)["w"][0, :3]), [0, 0, 1])
    g = jax.grad(lambda l: jnp.sum(modules.sample_masks({"w": l}, jax.random.key(1))["w"]))(
        logits["w"])
    assert np.all(np.asarray(g) > 0) and np.all(np.asarray(g) <= 0.25)  # sigmoid' <= 1/4


def test_union_recompose_jaccard_by_hand():
    a = {"x": np.array([[1, 1], [0, 0]], np.float32), "y": np.array([1, 0], np.float32)}
    b = {"x": np.array([[0, 1], [1, 0]], np.float32), "y": np.array([1, 1], np.float32)}
    u = modules.recompose({"a": a, "b": b}, "a+b")
    np.testing.assert_array_equal(u["x"], [[1, 1], [1, 0]])
    np.testing.assert_array_equal(u["y"], [1, 1])
    # kept: a 3 of 6, union 5 of 6; |a and b| = 2 ((0,1) and y[0]), |a or b| = 5
    assert float(modules.density(a)) == 0.5
    assert abs(float(modules.density(u)) - 5 / 6) < 1e-7
    assert modules.jaccard(a, b) == 2 / 5
    np.testing.assert_allclose(modules.overlap_matrix({"a": a, "b": b}, ["a", "b"]),
                               [[1, 0.4], [0.4, 1]])
    with pytest.raises(ValueError, match="no module for"):
        modules.recompose({"a": a}, ["a", "c"])


# --------------------------------------------------------- masked forward, round trips


TINY = LlamaConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                   max_seq_len=32, tie_embeddings=False)


def _random_mask(params, seed, keep=0.6):
    rng = np.random.default_rng(seed)
    leaves = modules.named_leaves(params)
    return {n: (rng.random(leaves[n].shape) < keep).astype(np.float32)
            for n in modules.maskable_names(params)}


def _zeroed(params, mask):
    """Reference: a numpy copy of params with every removed weight set to 0 by indexing."""
    out = jax.tree.map(lambda x: np.array(x, copy=True), params)
    for name, m in mask.items():
        node = out
        *path, leaf = name.split("/")
        for k in path:
            node = node[k]
        node[leaf][m == 0] = 0.0
    return out


def test_maskable_names_and_kinds():
    params = jax.eval_shape(functools.partial(init_params, TINY), jax.random.key(0))
    names = modules.maskable_names(params)
    assert sorted(names) == sorted(
        [f"layers/attn/{k}/kernel" for k in "qkvo"]
        + [f"layers/mlp/{k}/kernel" for k in ("gate", "up", "down")] + ["lm_head/kernel"])
    assert "embed/embedding" in modules.maskable_names(params, embeddings=True)
    assert "layers/attn_norm/scale" in modules.maskable_names(params, norms=True)
    assert modules.matrix_kind("layers/mlp/down/kernel") == "mlp/down"
    assert modules.matrix_kind("layers_3/attn/q/kernel") == "attn/q"


def test_masked_forward_equals_zeroed_weights_and_round_trips(tmp_path):
    from cpt_jax.hf import load_hf_llama, save_hf_llama
    from cpt_jax.train.checkpoint import load_params, save_params

    params = jax.device_get(init_params(TINY, jax.random.key(1)))
    mask = _random_mask(params, 0)
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 12))
    fwd = jax.jit(forward, static_argnums=0)
    masked = jax.device_get(modules.apply_mask(params, mask))
    ref = _zeroed(params, mask)
    want = np.asarray(fwd(TINY, ref, tokens))
    np.testing.assert_array_equal(np.asarray(fwd(TINY, masked, tokens)), want)
    assert not np.allclose(want, np.asarray(fwd(TINY, params, tokens)))  # the mask matters

    # per-layer densities of a stacked leaf, by hand from the mask
    per = modules.layer_densities(mask)
    q = mask["layers/attn/q/kernel"]
    assert per["attn/q"] == pytest.approx([q[0].mean(), q[1].mean()])

    # params checkpoint and Hugging Face export keep the zeros exactly
    save_params(tmp_path / "ckpt", TINY, masked)
    cfg, loaded = load_params(tmp_path / "ckpt")
    assert cfg == TINY
    jax.tree.map(np.testing.assert_array_equal, loaded, ref)
    save_hf_llama(TINY, loaded, tmp_path / "hf")
    _, from_hf = load_hf_llama(tmp_path / "hf")
    jax.tree.map(np.testing.assert_array_equal, from_hf, ref)
    np.testing.assert_array_equal(np.asarray(fwd(TINY, from_hf, tokens)), want)


# ------------------------------------------------------------------------ planted case

# Two synthetic domains on disjoint token ranges, each learned by its own sub-network on
# its own half of every matrix: domain "a" (tokens 0..7) counts up, x' = x + 1 mod 8;
# domain "b" (tokens 8..15) alternates two free tokens, x_{t+1} = x_{t-1}, which needs
# attention. A sub-network's block never reads the other's model dims, so the sum of the
# two computes each one exactly on its own domain (checked below), and on domain "a" the
# gradient reaching any weight of "b"'s block is exactly 0.
PLANT = LlamaConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32,
                    max_seq_len=32, tie_embeddings=True)
SEQ = 16


def _domain_batch(domain: str, rng, rows: int) -> dict:
    x = np.zeros((rows, SEQ + 1), np.int64)
    x[:, :2] = rng.integers(0, 8, (rows, 2))  # b's second token is free: ln 8 / 16 nats
    for t in range(1 if domain == "a" else 2, SEQ + 1):
        x[:, t] = (x[:, t - 1] + 1) % 8 if domain == "a" else x[:, t - 2]
    if domain == "b":
        x = x + 8
    return {"tokens": jnp.asarray(x, jnp.int32),
            "segment_ids": jnp.ones((rows, SEQ + 1), jnp.int32)}


def _support(params, domain: str) -> dict:
    """0/1 tree: the block of every tensor that the domain's sub-network owns (its model
    dims, its head, its MLP neurons, its tokens' embedding rows)."""
    d = slice(0, 8) if domain == "a" else slice(8, 16)
    h = 0 if domain == "a" else 1
    f = slice(0, 16) if domain == "a" else slice(16, 32)
    tok = slice(0, 8) if domain == "a" else slice(8, 16)
    sup = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), params)
    L = sup["layers"]
    for k in ("q", "k", "v"):
        L["attn"][k]["kernel"][:, d, h, :] = 1
    L["attn"]["o"]["kernel"][:, h, :, d] = 1
    L["mlp"]["gate"]["kernel"][:, d, f] = 1
    L["mlp"]["up"]["kernel"][:, d, f] = 1
    L["mlp"]["down"]["kernel"][:, f, d] = 1
    for norm in ("attn_norm", "mlp_norm"):
        L[norm]["scale"][:, d] = 1
    sup["final_norm"]["scale"][d] = 1
    sup["embed"]["embedding"][tok, d] = 1
    return sup


_SUB_TX = optax.adam(3e-2)


@jax.jit
def _sub_step(params, opt, batch, sup):
    def loss(p):
        total, aux = ce_loss_sum(PLANT, p, batch)
        return total / aux["tokens"]

    updates, opt = _SUB_TX.update(jax.grad(loss)(params), opt, params)
    return jax.tree.map(jnp.multiply, optax.apply_updates(params, updates), sup), opt


def _train_subnetwork(domain: str, seed: int, steps: int = 300) -> dict:
    """A sub-network trained on one domain with every weight outside its support held 0."""
    params = init_params(PLANT, jax.random.key(seed))
    sup = jax.tree.map(jnp.asarray, _support(params, domain))
    params = jax.tree.map(jnp.multiply, params, sup)
    opt, rng = _SUB_TX.init(params), np.random.default_rng(seed)
    for _ in range(steps):
        params, opt = _sub_step(params, opt, _domain_batch(domain, rng, 16), sup)
    return params


def _mean_loss(params, batch):
    s, aux = ce_loss_sum(PLANT, params, batch)
    return float(s / aux["tokens"])


def _learn(params, size_weight, share_weight, steps, batches_fn, domains, devices=8):
    """train_masks on a data-parallel mesh of ``devices`` CPU devices."""
    mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1},
                                  jax.devices()[:devices])
    rules = sharding_lib.rules_from_config(None)
    shard = param_shardings(PLANT, mesh, rules)
    return modules.train_masks(
        PLANT, jax.device_put(params, shard), batches_fn, domains,
        names=modules.maskable_names(params), mesh=mesh, rules=rules, param_shardings=shard,
        steps=steps, lr=0.1, size_weight=size_weight, share_weight=share_weight)


@pytest.fixture(scope="module")
def planted():
    net_a, net_b = _train_subnetwork("a", 0), _train_subnetwork("b", 1)
    full = jax.tree.map(jnp.add, net_a, net_b)  # disjoint supports: the sum holds both
    rng = np.random.default_rng(5)
    val = {d: _domain_batch(d, rng, 64) for d in ("a", "b")}
    return {"a": net_a, "b": net_b, "full": full, "val": val}


def _batches(*domains, seed=7):
    """sample(t) -> {domain: 8 rows}; "mix" is half "a" rows, half "b" rows."""
    def one(d, rng, rows):
        if d != "mix":
            return _domain_batch(d, rng, rows)
        a, b = _domain_batch("a", rng, rows // 2), _domain_batch("b", rng, rows // 2)
        return {k: jnp.concatenate([a[k], b[k]]) for k in a}

    def sample(t):
        rng = np.random.default_rng([seed, t])
        return {d: one(d, rng, 8) for d in domains}

    sample.one = one
    return sample


def test_planted_modules_recover_the_supports(planted):
    """Each module keeps most of its sub-network's support (the rest is weights its domain
    does not need: the module's loss stays at the full model's), none of the other's, and
    their union scores both domains as the full model does."""
    full, val = planted["full"], planted["val"]
    # the planted model is each sub-network on its domain, and each solved its domain
    for d in ("a", "b"):
        assert _mean_loss(full, val[d]) == pytest.approx(_mean_loss(planted[d], val[d]),
                                                         abs=1e-5)
        # guessing among the domain's 8 tokens: ln 8 = 2.08; uniform over 16: 2.77
        assert _mean_loss(full, val[d]) < 0.5, d

    # domains not in sorted order: module k must be trained on domain k, whatever jit does
    # to the order of a dict's keys
    masks, _ = _learn(full, size_weight=0.05, share_weight=0.0, steps=120,
                      batches_fn=_batches("a", "b"), domains=["b", "a"], devices=1)
    names = modules.maskable_names(full)
    sup = {d: modules.named_leaves(_support(full, d)) for d in ("a", "b")}

    def frac(mask, support):  # |mask and support| / |support|
        return (sum(float((mask[n] * support[n]).sum()) for n in names)
                / sum(float(support[n].sum()) for n in names))

    recall = {d: frac(masks[d], sup[d]) for d in ("a", "b")}
    leak = {d: frac(masks[d], sup["b" if d == "a" else "a"]) for d in ("a", "b")}
    jac = modules.jaccard(masks["a"], masks["b"])
    print(f"planted: recall {recall}, leak into the other support {leak}, Jaccard {jac:.3f}")
    for d in ("a", "b"):
        assert recall[d] >= 0.75, (d, recall)
        assert leak[d] <= 0.02, (d, leak)
        # the weights left out were not needed: the module scores its domain as the full model
        assert _mean_loss(modules.apply_mask(full, masks[d]), val[d]) <= \
            _mean_loss(full, val[d]) + 0.05, d
    assert jac <= 0.02
    # the union (the recomposition a+b) scores both domains as the full model does
    union = modules.recompose(masks, ["a", "b"])
    for d in ("a", "b"):
        assert _mean_loss(modules.apply_mask(full, union), val[d]) <= \
            _mean_loss(full, val[d]) + 0.02, d


def test_share_term_shrinks_the_union(planted):
    """Domains "a" and "mix" (half a, half b rows) can share a's weights. With
    share_weight 0.5 the union of their modules is smaller than with 0 (by at least 0.03 of
    all weights) while each module's validation loss moves by at most 0.05 nats."""
    full = planted["full"]
    sample = _batches("a", "mix")
    rng = np.random.default_rng(5)
    val = {d: sample.one(d, rng, 64) for d in ("a", "mix")}
    out = {}
    for share in (0.0, 0.5):
        masks, _ = _learn(full, size_weight=0.1, share_weight=share, steps=120,
                          batches_fn=sample, domains=["a", "mix"], devices=1)
        out[share] = {"union": float(modules.density(modules.recompose(masks, "a+mix"))),
                      "jaccard": modules.jaccard(masks["a"], masks["mix"]),
                      "loss": {d: _mean_loss(modules.apply_mask(full, masks[d]), val[d])
                               for d in masks}}
    print(f"share term: {out}")
    assert out[0.5]["union"] <= out[0.0]["union"] - 0.03
    for d in ("a", "mix"):
        assert abs(out[0.5]["loss"][d] - out[0.0]["loss"][d]) <= 0.05, d
