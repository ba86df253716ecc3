"""The methods' gradient transforms against closed forms and hand-unrolled updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpt_jax import model as model_lib
from cpt_jax import sharding as sharding_lib
from cpt_jax.methods import agem as agem_m
from cpt_jax.methods import ewc as ewc_m
from cpt_jax.methods import l2 as l2_m
from cpt_jax.methods import replay as replay_m
from cpt_jax.methods import reptile as reptile_m
from cpt_jax.methods.ewc import diag_fisher
from cpt_jax.optim import transforms as T
from cpt_jax.methods import make_optimizer
from cpt_jax.optim.schedules import make_schedule
from cpt_jax.run_config import default_config
from cpt_jax.core.state import Placement, create_train_state
from cpt_jax.train.step import make_train_step


def _grads(tokens_c=30, tokens_r=10, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    tree = lambda k: {"a": jax.random.normal(k, (3, 4)), "b": jax.random.normal(k, (5,))}
    return T.PerSourceGrads(tree(k1), tree(k2), jnp.float32(tokens_c), jnp.float32(tokens_r))


def test_replay_mix_equals_mixed_batch_gradient():
    """Token-weighted per-source mean gradients == the gradient of the mixed batch's mean."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(12, 3)))
    y = jnp.asarray(rng.normal(size=(12,)))
    is_rep = np.array([1, 0, 0, 0] * 3, bool)
    w = {"w": jnp.asarray(rng.normal(size=(3,)))}

    def mean_loss(p, idx):
        return jnp.mean((x[idx] @ p["w"] - y[idx]) ** 2)

    g_mixed = jax.grad(mean_loss)(w, np.arange(12))
    g = T.PerSourceGrads(jax.grad(mean_loss)(w, np.flatnonzero(~is_rep)),
                         jax.grad(mean_loss)(w, np.flatnonzero(is_rep)),
                         jnp.float32(9), jnp.float32(3))
    out, _ = replay_m.replay_mix().update(g, replay_m.replay_mix().init(w))
    np.testing.assert_allclose(out["w"], g_mixed["w"], rtol=1e-6)


def test_replay_mix_explicit_weights_and_no_replay():
    g = _grads()
    out, _ = replay_m.replay_mix((0.5, 0.5)).update(g, optax.EmptyState())
    np.testing.assert_allclose(out["a"], 0.5 * g.current["a"] + 0.5 * g.replay["a"], rtol=1e-6)
    alone = g._replace(replay=None, replay_tokens=jnp.float32(0))
    out, _ = replay_m.replay_mix((0.5, 0.5)).update(alone, optax.EmptyState())
    np.testing.assert_allclose(out["a"], g.current["a"])


def test_agem_projection():
    g = _grads()
    ref = g.replay
    cur = jax.tree.map(lambda r: -2.0 * r + 0.1, ref)  # conflicting: negative dot product
    conflict = g._replace(current=cur)
    assert float(T.tree_dot(cur, ref)) < 0
    out, _ = agem_m.agem().update(conflict, optax.EmptyState())
    assert float(T.tree_dot(out, ref)) == pytest.approx(0.0, abs=1e-4)  # on the boundary
    # projection removes only the component along ref
    coef = T.tree_dot(cur, ref) / T.tree_dot(ref, ref)
    np.testing.assert_allclose(out["a"], cur["a"] - coef * ref["a"], rtol=1e-5)
    # no conflict: unchanged
    agree = g._replace(current=jax.tree.map(lambda r: 2.0 * r, ref))
    out, _ = agem_m.agem().update(agree, optax.EmptyState())
    np.testing.assert_allclose(out["a"], agree.current["a"])
    # add_replay mixes the replay gradient back in, token-weighted
    out, _ = agem_m.agem(add_replay=True).update(agree, optax.EmptyState())
    np.testing.assert_allclose(out["a"], 0.75 * agree.current["a"] + 0.25 * ref["a"], rtol=1e-6)


def _run(tx, theta0, grad_fn, steps):
    params = {"t": jnp.float32(theta0)}
    state = tx.init(params)
    traj = []
    for _ in range(steps):
        upd, state = tx.update(grad_fn(params), state, params)
        params = optax.apply_updates(params, upd)
        traj.append(float(params["t"]))
    return np.array(traj)


def test_reptile_quadratic_closed_form():
    """f = a/2 t^2 with SGD(eta): inner steps multiply t by r = 1 - eta a; every k steps
    t <- t_s + eps (t - t_s). So at step n = q k + j: t = t0 (1 + eps (r^k - 1))^q r^j."""
    a, eta, k, eps, t0 = 2.0, 0.1, 4, 0.3, 1.5
    tx = optax.chain(optax.sgd(eta), reptile_m.reptile(every=k, meta_lr=eps))
    traj = _run(tx, t0, lambda p: {"t": a * p["t"]}, 13)
    r = 1 - eta * a
    want = [t0 * (1 + eps * (r ** k - 1)) ** (n // k) * r ** (n % k) for n in range(1, 14)]
    np.testing.assert_allclose(traj, want, rtol=1e-5)


def test_nested_reptile_is_original_mer():
    """Two Reptile transforms (within-batch beta every k1 steps, across-batch gamma every
    k2 = s k1 steps) follow Riemer et al. 2019, Algorithm 1, written here as the paper
    nests it: each batch starts from theta_W <- theta (so after an across-batch step, from
    the weights gamma produced); s batches make one across-batch period."""
    eta, k1, beta, s, gamma, t0 = 0.05, 2, 0.5, 3, 0.3, 1.0
    grad = lambda t: 3.0 * t ** 3 - t  # a non-quadratic loss keeps the nesting honest
    tx = optax.chain(optax.sgd(eta), reptile_m.reptile(k1, beta), reptile_m.reptile(s * k1, gamma))
    n_periods = 3
    traj = _run(tx, t0, lambda p: {"t": grad(p["t"])}, n_periods * s * k1)

    theta, want = t0, []
    for _ in range(n_periods):
        theta_A = theta  # start of an across-batch period
        for _ in range(s):
            theta_W = theta  # start of a batch
            for i in range(k1):
                theta = theta - eta * grad(theta)
                if i < k1 - 1:
                    want.append(theta)
            theta = theta_W + beta * (theta - theta_W)  # within-batch Reptile
            want.append(theta)
        theta = theta_A + gamma * (theta - theta_A)  # across-batch Reptile
        want[-1] = theta
    np.testing.assert_allclose(traj, want, rtol=1e-5)


def test_reptile_step_pure_function_matches_transform():
    """reptile_step(params, slow, t) after each inner step gives the same weights as the
    transform in the chain, and at a period end both slow and params are the
    interpolation slow + eps (theta - slow)."""
    p = {"w": jnp.array([1.0, -2.0])}
    new, slow = reptile_m.reptile_step({"w": jnp.array([3.0, 0.0])}, p, 4, every=4, meta_lr=0.25)
    np.testing.assert_allclose(new["w"], [1.5, -1.5])
    np.testing.assert_allclose(slow["w"], [1.5, -1.5])
    same, slow2 = reptile_m.reptile_step({"w": jnp.array([3.0, 0.0])}, p, 5, every=4, meta_lr=0.25)
    np.testing.assert_allclose(same["w"], [3.0, 0.0])
    np.testing.assert_allclose(slow2["w"], [1.0, -2.0])

    eta, k, eps, t0 = 0.1, 3, 0.6, 1.2
    grad = lambda t: t ** 3 + 0.5
    traj = _run(optax.chain(optax.sgd(eta), reptile_m.reptile(k, eps)), t0,
                lambda q: {"t": grad(q["t"])}, 10)
    params, slow, want = {"t": jnp.float32(t0)}, {"t": jnp.float32(t0)}, []
    for t in range(1, 11):
        params = {"t": params["t"] - eta * grad(params["t"])}
        params, slow = reptile_m.reptile_step(params, slow, t, every=k, meta_lr=eps)
        want.append(float(params["t"]))
    np.testing.assert_allclose(traj, want, rtol=1e-5)


def test_reset_moments_zeroes_adam_state_at_period():
    tx = reptile_m.reset_moments(optax.adam(0.1), every=3)
    params = {"t": jnp.float32(1.0)}
    state = tx.init(params)
    for n in range(1, 4):
        _, state = tx.update({"t": jnp.float32(0.5)}, state, params)
        adam = state[1][0]
        if n < 3:
            assert float(adam.mu["t"]) != 0.0
    assert float(adam.mu["t"]) == 0.0 and float(adam.nu["t"]) == 0.0 and int(adam.count) == 0


def test_l2_anchor_and_ewc_penalty_gradients():
    params = {"t": jnp.array([1.0, 2.0])}
    zero = {"t": jnp.zeros(2)}
    tx = l2_m.l2_anchor(0.5)
    state = l2_m.set_anchor(tx.init(params), {"t": jnp.array([0.0, 4.0])})
    out, _ = tx.update(zero, state, params)
    np.testing.assert_allclose(out["t"], 0.5 * np.array([1.0, -2.0]))

    tx = ewc_m.ewc(2.0)
    state = tx.init(params)
    out, _ = tx.update(zero, state, params)
    np.testing.assert_allclose(out["t"], 0.0)  # no Fisher before the first boundary
    state = ewc_m.set_ewc(state, {"t": jnp.array([0.0, 0.0])}, {"t": jnp.array([3.0, 1.0])})
    state = ewc_m.set_ewc(state, {"t": jnp.array([0.0, 1.0])}, {"t": jnp.array([1.0, 1.0])},
                      decay=0.5)  # F = 0.5 * [3, 1] + [1, 1]
    out, _ = tx.update(zero, state, params)
    np.testing.assert_allclose(out["t"], 2.0 * np.array([2.5, 1.5]) * np.array([1.0, 1.0]))


def test_fisher_linear_gaussian_matches_analytic():
    """y ~ N(w.x, s^2): the Fisher of the log-likelihood is E[x x^T] / s^2, diagonal
    E[x_i^2] / s^2. Labels drawn from the model, per-example squared gradients."""
    rng = np.random.default_rng(0)
    n, s = 20000, 0.5
    scales = np.array([0.5, 1.0, 2.0])
    x = rng.normal(size=(n, 3)) * scales
    w = np.array([0.3, -1.0, 0.7])
    y = x @ w + s * rng.normal(size=n)

    def nll(p, ex):
        return 0.5 * (ex["y"] - ex["x"] @ p["w"]) ** 2 / s ** 2

    f = diag_fisher(nll, {"w": jnp.asarray(w, jnp.float32)},
                    {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)},
                    chunk=100)
    np.testing.assert_allclose(f["w"], scales ** 2 / s ** 2, rtol=0.05)
    # per-example squares, not the square of the mean gradient (which is ~0 here)
    mean_grad = jax.grad(lambda p: jnp.mean(jax.vmap(nll, (None, 0))(
        p, {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)})))(
        {"w": jnp.asarray(w, jnp.float32)})
    assert np.all(np.asarray(mean_grad["w"]) ** 2 < 0.01 * np.asarray(f["w"]))


def test_all_transforms_in_sharded_step():
    """agem + l2 + ewc + nested reptile inside the jitted step on a 2x4 mesh: every
    parameter-shaped state is sharded like the parameters, and a step runs."""
    cfg = default_config()
    mcfg = model_lib.LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                 n_kv_heads=4, d_ff=64)
    cfg.method.name = "agem+l2+ewc+reptile"
    cfg.method.l2.weight = 0.1
    cfg.method.ewc.lam = 1.0
    cfg.method.reptile.periods = [{"every": 2, "meta_lr": 0.5}, {"every": 4, "meta_lr": 0.2}]
    mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    rules = sharding_lib.DEFAULT_RULES
    sched = make_schedule(cfg.optim, 10)
    tx = make_optimizer(cfg, sched)
    state, shardings = create_train_state(mcfg, tx, mesh, rules, jax.random.key(0))
    q_shard = state.params["layers"]["attn"]["q"]["kernel"].sharding
    found = []
    for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
            x, (reptile_m.ReptileState, l2_m.AnchorState, ewc_m.EWCState))):
        if isinstance(s, reptile_m.ReptileState):
            found.append(s.slow["layers"]["attn"]["q"]["kernel"].sharding)
        elif isinstance(s, l2_m.AnchorState):
            found.append(s.anchor["layers"]["attn"]["q"]["kernel"].sharding)
        elif isinstance(s, ewc_m.EWCState):
            found.append(s.fisher["layers"]["attn"]["q"]["kernel"].sharding)
    assert len(found) == 4 and all(f == q_shard for f in found)
    step = make_train_step(Placement(mcfg, mesh, rules, shardings), tx, 1, sched)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 64, (8, 9), dtype=np.int32),
             "segment_ids": np.ones((8, 9), np.int32),
             "is_replay": np.zeros(8, np.int32)}
    p0 = jax.device_get(state.params)
    for _ in range(2):
        state, m = step(state, batch, 2)
    assert np.isfinite(float(m["loss"])) and -1 <= float(m["grad_cos"]) <= 1
    assert m["grad_cos_layer"].shape == (2,)
    assert not np.allclose(jax.device_get(state.params)["embed"]["embedding"],
                           p0["embed"]["embedding"])


def test_non_finite_steps_are_skipped_and_counted():
    cfg = default_config()
    cfg.method.name = "replay+reptile"
    cfg.method.reptile.periods = [{"every": 1, "meta_lr": 0.5}]
    tx = make_optimizer(cfg, make_schedule(cfg.optim, 10))
    params = {"w": jnp.ones((2, 2))}
    state = tx.init(params)

    def grads(v):
        g = {"w": jnp.full((2, 2), v)}
        return T.PerSourceGrads(g, None, jnp.float32(4), jnp.float32(0))

    upd, state = tx.update(grads(jnp.nan), state, params)
    assert float(jnp.abs(upd["w"]).max()) == 0.0  # skipped: no update
    assert int(state.bad_in_a_row) == 1 and int(state.bad_total) == 1
    # the inner state (Adam moments, Reptile slow weights) did not move
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), state.inner,
                 tx.init(params).inner)
    upd, state2 = tx.update(grads(jnp.inf), state, params)
    assert int(state2.bad_in_a_row) == 2
    upd, state3 = tx.update(grads(0.1), state2, params)
    assert int(state3.bad_in_a_row) == 0 and int(state3.bad_total) == 2
    assert float(jnp.abs(upd["w"]).max()) > 0  # a finite step is applied again


def test_schedule_count_skips_bad_steps_and_restarts():
    """The schedule's count (the step whose learning rate the next update applies) does
    not advance on a skipped step; restart_schedule sets it to 0 and keeps Adam's moments."""
    tx = make_optimizer(default_config(), make_schedule(default_config().optim, 10))
    params = {"w": jnp.ones((2, 2))}
    state = tx.init(params)
    g = lambda v: T.PerSourceGrads({"w": jnp.full((2, 2), v)}, None, jnp.float32(4),
                                   jnp.float32(0))
    _, state = tx.update(g(0.1), state, params)
    _, state = tx.update(g(jnp.nan), state, params)
    assert int(T.schedule_count(state)) == 1
    _, state = tx.update(g(0.2), state, params)
    assert int(T.schedule_count(state)) == 2
    restarted = T.restart_schedule(state)
    assert int(T.schedule_count(restarted)) == 0
    adam = lambda s: [x for x in jax.tree.leaves(
        s, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(x, optax.ScaleByAdamState)][0]
    assert int(adam(restarted).count) == 2
    np.testing.assert_array_equal(adam(restarted).mu["w"], adam(state).mu["w"])
