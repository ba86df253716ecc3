"""The sharded train step: mesh layouts agree, parameters are really split, accumulation is exact,
one AdamW step matches its closed form; and the base optimizer matches AdamW's definition over
two steps, with clipping and weight decay on the right leaves."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpt_jax import model as model_lib
from cpt_jax import sharding as sharding_lib
from cpt_jax.replay.sampler import replay_positions
from cpt_jax.methods import make_optimizer
from cpt_jax.optim.schedules import make_schedule
from cpt_jax.optim.transforms import PerSourceGrads
from cpt_jax.run_config import default_config
from cpt_jax.core.state import Placement, create_train_state
from cpt_jax.train.step import gradient_statistics, make_train_step

_init = jax.jit(model_lib.init_params, static_argnums=0)
TINY = model_lib.LlamaConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4,
                             d_ff=96, max_seq_len=64)
B, L = 16, 24
N_REPLAY = 4  # rows 2, 6, 10, 14 (replay_positions) are replayed rows


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY.vocab_size, size=(B, L + 1), dtype=np.int32)
    # two documents per row at a random split, plus padding (segment 0) on some rows
    seg = np.ones((B, L + 1), np.int32)
    for b in range(B):
        cut = rng.integers(3, L - 3)
        seg[b, cut:] = 2
        if b % 3 == 0:
            seg[b, L - 2:] = 0
    is_replay = np.zeros(B, np.int32)
    is_replay[replay_positions(B, N_REPLAY)] = 1
    return {"tokens": tokens, "segment_ids": seg, "is_replay": is_replay}


def _run_config(clip=1.0):
    c = default_config()
    c.optim.lr, c.optim.warmup_steps, c.optim.clip_norm = 1e-2, 2, clip
    return c


def _assert_trees_close(a, b, atol=1e-4):
    """fp32 tolerance for one AdamW step of size lr=1e-2: Adam's g / (|g| + eps) magnifies
    reduction-order noise in near-zero gradients (seen: 3e-5 on 1 of 12288 entries), so
    parameters are compared at 1% of a step; the loss and gradient norm at rtol 1e-5."""
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                         atol=atol, rtol=1e-5), a, b)


def _run_one_step(mesh_axes, microbatches=1, clip=1.0, n_devices=None):
    return _cached_step(tuple(sorted(mesh_axes.items())), microbatches, clip, n_devices)


@functools.lru_cache(maxsize=None)
def _cached_step(mesh_items, microbatches, clip, n_devices):
    mesh_axes = dict(mesh_items)
    devices = jax.devices()[:n_devices] if n_devices else None
    mesh = sharding_lib.make_mesh(mesh_axes, devices)
    rules = sharding_lib.DEFAULT_RULES
    cfg = _run_config(clip)
    schedule = make_schedule(cfg.optim, 10)
    tx = make_optimizer(cfg, schedule)
    params0 = _init(TINY, jax.random.key(0))
    state, shardings = create_train_state(TINY, tx, mesh, rules, None, params=params0)
    step = make_train_step(Placement(TINY, mesh, rules, shardings), tx, microbatches, schedule)
    state, metrics = step(state, _batch(), N_REPLAY)
    return params0, state, metrics, mesh


def _reference_loss(params, batch):
    """Mean next-token NLL by an explicit log-softmax over the tokens within one document."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    logits = np.asarray(model_lib.forward(TINY, params, tokens[:, :-1], seg[:, :-1]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return (nll * mask).sum() / mask.sum()


def test_loss_matches_reference():
    params0, _, metrics, _ = _run_one_step({"data": 1}, n_devices=1)
    batch = _batch()
    np.testing.assert_allclose(metrics["loss"], _reference_loss(params0, batch), rtol=1e-5)
    # per-source metrics: the current rows and the replayed rows taken apart by hand
    rep = batch["is_replay"] == 1
    parts = {name: {k: v[rows] for k, v in batch.items()}
             for name, rows in (("current", ~rep), ("replay", rep))}
    grads = {}
    for name, part in parts.items():
        np.testing.assert_allclose(metrics[f"loss_{name}"], _reference_loss(params0, part),
                                   rtol=1e-5)
        g = jax.grad(_jax_mean_loss)(params0, part)
        grads[name] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]).astype(np.float64)
        np.testing.assert_allclose(metrics[f"grad_norm_{name}"], np.linalg.norm(grads[name]),
                                   rtol=1e-4)
    cos = grads["current"] @ grads["replay"] / (
        np.linalg.norm(grads["current"]) * np.linalg.norm(grads["replay"]))
    np.testing.assert_allclose(metrics["grad_cos"], cos, rtol=1e-4, atol=1e-6)


def test_gradient_statistics_by_hand():
    """Cosines and norms from flattened numpy vectors: all parameters, each layer's slice
    of the stacked leaves, the embeddings alone."""
    rng = np.random.default_rng(3)
    shapes = {"embed": {"embedding": (5, 3)}, "final_norm": {"scale": (3,)},
              "layers": {"attn": {"q": (2, 3, 4)}, "norm": {"scale": (2, 3)}}}
    def tree():
        return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                            is_leaf=lambda x: isinstance(x, tuple))
    a, b = tree(), tree()
    b["embed"]["embedding"] = -2 * a["embed"]["embedding"]  # embeddings: cosine -1 exactly
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]).astype(np.float64)
    cos = lambda x, y: x @ y / np.linalg.norm(x) / np.linalg.norm(y)
    got = jax.jit(gradient_statistics)(a, b)
    np.testing.assert_allclose(got["grad_cos"], cos(flat(a), flat(b)), rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm_current"], np.linalg.norm(flat(a)), rtol=1e-6)
    np.testing.assert_allclose(got["grad_norm_replay"], np.linalg.norm(flat(b)), rtol=1e-6)
    np.testing.assert_allclose(got["grad_cos_embed"], -1.0, rtol=1e-6)
    layer = lambda t, i: flat(jax.tree.map(lambda x: x[i], t["layers"]))
    np.testing.assert_allclose(got["grad_cos_layer"],
                               [cos(layer(a, i), layer(b, i)) for i in range(2)], rtol=1e-5)


@pytest.mark.parametrize("mesh_axes", [{"data": 8}, {"data": 1, "fsdp": 2, "tensor": 4},
                                       {"data": 2, "fsdp": 2, "tensor": 2}])
def test_meshes_agree_with_single_device(mesh_axes):
    _, ref_state, ref_metrics, _ = _run_one_step({"data": 1}, n_devices=1)
    _, state, metrics, _ = _run_one_step(mesh_axes)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm_current"], ref_metrics["grad_norm_current"],
                               rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_cos"], ref_metrics["grad_cos"], rtol=1e-4, atol=1e-6)
    _assert_trees_close(state.params, ref_state.params)


def test_parameters_split_as_rules_say():
    _, state, _, mesh = _run_one_step({"data": 1, "fsdp": 2, "tensor": 4})
    q = state.params["layers"]["attn"]["q"]["kernel"]  # [layers, embed, heads, head_dim]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    nl, d, h, dh = q.shape
    assert {s.data.shape for s in q.addressable_shards} == {(nl, d // 2, h // 4, dh)}
    emb = state.params["embed"]["embedding"]  # [vocab, embed]
    assert {s.data.shape for s in emb.addressable_shards} == {(128 // 4, 64 // 2)}
    # Adam moments are sharded exactly like their parameters.
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)][0]
    mu = adam.mu["layers"]["attn"]["q"]["kernel"]
    assert mu.sharding == q.sharding
    # The step counter and schedule state are replicated.
    assert state.step.sharding.is_fully_replicated


def test_accumulation_equals_big_batch():
    # 4 microbatches on one device (replay part: 4 x 1 row, current part: 4 x 3 rows)
    _, ref_state, ref_metrics, _ = _run_one_step({"data": 1}, n_devices=1)
    _, state, metrics, _ = _run_one_step({"data": 1}, microbatches=4, n_devices=1)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_replay"], ref_metrics["loss_replay"], rtol=1e-6)
    _assert_trees_close(state.params, ref_state.params)
    # 2 microbatches on a 2x4 mesh (each microbatch still spans both batch shards)
    _, ref_state, _, _ = _run_one_step({"data": 2, "tensor": 4}, microbatches=1)
    _, state, _, _ = _run_one_step({"data": 2, "tensor": 4}, microbatches=2)
    _assert_trees_close(state.params, ref_state.params)


def test_uneven_microbatches_are_refused():
    with pytest.raises(ValueError, match="not a multiple of the 8 batch shards"):
        _run_one_step({"data": 8}, microbatches=2)


def test_first_adamw_step_closed_form():
    """The train step applies the chain with the schedule's step-0 lr: from zero moments
    the first update is -lr * g / (|g| + eps) - lr*wd*p; checked with clipping off. A first
    step cannot see b1, b2 or the clip; test_adamw_two_steps_closed_form and the tests
    after it pin those, and which leaves decay."""
    params0, state, _, _ = _run_one_step({"data": 1}, clip=1e9, n_devices=1)
    batch = _batch()

    def loss(p):
        return _jax_mean_loss(p, batch)

    g = jax.jit(jax.grad(loss))(params0)
    opt = _run_config().optim
    lr0 = opt.lr * 1 / opt.warmup_steps  # warmup: lr(step 0) = peak * 1 / warmup_steps

    def expected(path, p, gi):
        decay = opt.weight_decay if path[-1].key != "scale" else 0.0
        return p - lr0 * (gi / (jnp.abs(gi) + opt.eps) + decay * p)

    want = jax.tree_util.tree_map_with_path(expected, params0, g)

    def check(got, want, p, gi):
        got, want, p, gi = map(np.asarray, (got, want, p, gi))
        # g / (|g| + eps) is ill-conditioned where |g| is near eps: there float32 rounding
        # of the gradient (another reduction order) moves it by O(1). Exact elsewhere; the
        # update is bounded by lr * (1 + wd |p|) everywhere.
        sure = np.abs(gi) > 1e-6
        np.testing.assert_allclose(got[sure], want[sure], atol=2e-5)
        assert sure.mean() > 0.9
        assert np.all(np.abs(got - p) <= lr0 * (1 + opt.weight_decay * np.abs(p)) + 1e-7)

    jax.tree.map(check, state.params, want, params0, g)


def _jax_mean_loss(params, batch):
    tokens, seg = batch["tokens"], batch["segment_ids"]
    logits = model_lib.forward(TINY, params, tokens[:, :-1], seg[:, :-1])
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return (nll * mask).sum() / mask.sum()


# ---------------------------------------------------------------------------------------
# The base optimizer, pinned to the AdamW definition (Loshchilov & Hutter 2019, "Decoupled
# Weight Decay Regularization"): with bias-corrected moments
#     m_t = b1 m_{t-1} + (1 - b1) g_t,   v_t = b2 v_{t-1} + (1 - b2) g_t^2,
#     m^_t = m_t / (1 - b1^t),           v^_t = v_t / (1 - b2^t),
#     p_t = p_{t-1} - lr (m^_t / (sqrt(v^_t) + eps) + wd p_{t-1})   (wd only where decayed),
# after clipping g_t to global norm <= clip (g * clip / ||g|| when ||g|| > clip). The default
# run config: b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1, clip 1.0 (Abbes et al. 2025).
# A first Adam step is sign-like (m^/sqrt(v^) = g/|g|), blind to b1, b2 and to a common
# gradient scale, so these take two steps with different gradients.

_LR = 0.05


def _tiny_tree():
    return {"dense": {"kernel": np.array([[0.5, -1.0, 2.0], [0.25, -0.75, 1.5]], np.float32)},
            "norm": {"scale": np.array([1.0, 0.8, 1.2], np.float32)}}


# Decayed leaves of the tiny tree: the weight matrix, not the norm scale (a leaf 'scale').
_TINY_DECAY = {"dense": {"kernel": True}, "norm": {"scale": False}}


def _grads(step):
    """Different magnitudes and signs on the two steps, so b1 and b2 matter."""
    a = np.array
    return {1: {"dense": {"kernel": a([[0.10, -0.20, 0.05], [0.30, 0.02, -0.15]])},
                "norm": {"scale": a([0.04, -0.25, 0.12])}},
            2: {"dense": {"kernel": a([[-0.30, 0.05, 0.20], [0.01, -0.40, 0.10]])},
                "norm": {"scale": a([0.20, 0.05, -0.30])}}}[step]


def _adamw_reference(params, grads_per_step, lr, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, clip=1.0,
                     decay=_TINY_DECAY):
    """AdamW from its definition, in float64 numpy (no optax)."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    m = jax.tree.map(np.zeros_like, p)
    v = jax.tree.map(np.zeros_like, p)
    for t, g in enumerate(grads_per_step, start=1):
        norm = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g)))
        if clip is not None and norm > clip:
            g = jax.tree.map(lambda x: x * (clip / norm), g)
        m = jax.tree.map(lambda m_, g_: b1 * m_ + (1 - b1) * g_, m, g)
        v = jax.tree.map(lambda v_, g_: b2 * v_ + (1 - b2) * g_ * g_, v, g)

        def new(p_, m_, v_, d):
            m_hat, v_hat = m_ / (1 - b1 ** t), v_ / (1 - b2 ** t)
            return p_ - lr * (m_hat / (np.sqrt(v_hat) + eps) + (wd if d else 0.0) * p_)

        p = jax.tree.map(new, p, m, v, decay)
    return p


def _run_chain(params, grads_per_step, lr=_LR):
    """The run's optimizer chain (make_optimizer on the default config), constant lr."""
    cfg = default_config()
    tx = make_optimizer(cfg, lambda step: lr)
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    for g in grads_per_step:
        g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
        per_source = PerSourceGrads(g, None, jnp.float32(8), jnp.float32(0))  # no replay
        updates, state = tx.update(per_source, state, params)
        params = optax.apply_updates(params, updates)
    return jax.device_get(params)


def _global_norm(g):
    return float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g))))


def _assert_tree_allclose(got, want, atol=2e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float64), y,
                                                         rtol=0, atol=atol), got, want)


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_default_config_is_the_papers_adamw():
    opt = default_config().optim
    assert (opt.b1, opt.b2, opt.eps, opt.weight_decay, opt.clip_norm) == (
        0.9, 0.95, 1e-8, 0.1, 1.0)


def test_adamw_two_steps_closed_form():
    grads = [_grads(1), _grads(2)]
    assert all(_global_norm(g) < 1.0 for g in grads)  # clipping inactive here
    got = _run_chain(_tiny_tree(), grads)
    want = _adamw_reference(_tiny_tree(), grads, _LR)
    _assert_tree_allclose(got, want)
    # The check can see the betas and the decay: each variant moves the
    # result by far more than the tolerance.
    for variant in (dict(b1=0.5), dict(b2=0.999), dict(wd=0.0),
                    dict(decay={"dense": {"kernel": True}, "norm": {"scale": True}})):
        assert _max_diff(_adamw_reference(_tiny_tree(), grads, _LR, **variant), want) > 5e-5, \
            variant
    # Sanity: one step alone is sign-like, independent of the betas.
    one = _adamw_reference(_tiny_tree(), grads[:1], _LR)
    assert _max_diff(_adamw_reference(_tiny_tree(), grads[:1], _LR, b1=0.5, b2=0.999),
                     one) < 1e-9


def test_adamw_clips_the_global_norm_before_the_moments():
    # Step 1's gradient has global norm 5 (clipped to 1), step 2's is below 1 (unclipped):
    # the relative scale of the two steps reaches the moments, so clipping is visible.
    g1 = jax.tree.map(lambda x: x * (5.0 / _global_norm(_grads(1))), _grads(1))
    grads = [g1, _grads(2)]
    assert _global_norm(g1) == pytest.approx(5.0) and _global_norm(grads[1]) < 1.0
    got = _run_chain(_tiny_tree(), grads)
    want = _adamw_reference(_tiny_tree(), grads, _LR)
    _assert_tree_allclose(got, want)
    unclipped = _adamw_reference(_tiny_tree(), grads, _LR, clip=None)
    assert _max_diff(unclipped, want) > 5e-4  # the clip matters in this case
    # The clip is on the global norm across leaves, not per leaf: per-leaf clipping would
    # leave every leaf here (each of norm < 5) scaled differently.
    per_leaf = [jax.tree.map(lambda x: x / max(1.0, np.sqrt(np.sum(x * x))), g) for g in grads]
    assert _max_diff(_adamw_reference(_tiny_tree(), per_leaf, _LR, clip=None), want) > 5e-5


# Weight decay on the real model's parameters: all weight matrices and the embeddings,
# not the RMSNorm scales. Written out by name (the project's decision), not by a rule.
_DECAYED = {"embed/embedding", "lm_head/kernel", "attn/q/kernel", "attn/k/kernel",
            "attn/v/kernel", "attn/o/kernel", "mlp/gate/kernel", "mlp/up/kernel",
            "mlp/down/kernel"}
_NOT_DECAYED = {"final_norm/scale", "attn_norm/scale", "mlp_norm/scale"}


@pytest.mark.parametrize("scan_layers", [True, False])
def test_weight_decay_on_matrices_and_embeddings_not_norm_scales(scan_layers):
    cfg = model_lib.LlamaConfig(vocab_size=32, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1,
                                d_ff=12, max_seq_len=16, scan_layers=scan_layers)
    params = jax.device_get(model_lib.init_params(cfg, jax.random.key(1)))
    # Norm scales start at 1 (a zero scale could not show decay): perturb every leaf so
    # none is zero.
    params = jax.tree.map(lambda x: np.asarray(x, np.float32) + 0.5, params)
    zero = jax.tree.map(np.zeros_like, params)
    got = _run_chain(params, [zero], lr=_LR)
    seen = set()
    for path, p0 in jax.tree_util.tree_leaves_with_path(params):
        keys = [k.key for k in path]
        name = "/".join(k for k in keys if not k.startswith("layers"))
        seen.add(name)
        p1 = _get(got, keys)
        # Zero gradient: Adam's term is 0 / (0 + eps) = 0; only decay moves a leaf,
        # p <- p - lr * wd * p.
        if name in _DECAYED:
            np.testing.assert_allclose(p1, p0 * (1 - _LR * 0.1), rtol=1e-6, err_msg=name)
        else:
            assert name in _NOT_DECAYED, name
            np.testing.assert_array_equal(p1, p0, err_msg=name)
    assert seen == _DECAYED | _NOT_DECAYED


def _get(tree, keys):
    for k in keys:
        tree = tree[k]
    return np.asarray(tree)
