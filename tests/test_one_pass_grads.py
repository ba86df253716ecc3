"""Gradients split by source only when needed: a replay step that does not log takes one
forward/backward pass over the whole batch, whose gradient is the sum of the per-source
gradients (checked against jax.grad of an explicit log-softmax loss on each source) and
which compiles to as many dot ops as plain training; a log step takes the split pass and
logs the same statistics as before; the loop asks for them at its log steps only; which
methods need the split pass."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpt_jax import methods
from cpt_jax import model as model_lib
from cpt_jax import sharding as sharding_lib
from cpt_jax.methods.replay import replay_mix
from cpt_jax.methods import make_optimizer
from cpt_jax.optim.schedules import make_schedule
from cpt_jax.replay.sampler import replay_positions
from cpt_jax.run_config import default_config
from cpt_jax.core.state import Placement, create_train_state
from cpt_jax.train.step import count_dot_ops, make_train_step

TINY = model_lib.LlamaConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                             d_ff=64, max_seq_len=32)
B, L, N_REPLAY = 8, 16, 2


def _batch():
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, TINY.vocab_size, size=(B, L + 1), dtype=np.int32)
    seg = np.ones((B, L + 1), np.int32)
    for b in range(B):  # two documents per row, padding on some rows
        seg[b, rng.integers(3, L - 3):] = 2
        if b % 3 == 0:
            seg[b, L - 3:] = 0
    return {"tokens": tokens, "segment_ids": seg}


def _loss_sum(params, batch):
    """(sum of masked next-token NLLs, token count): an explicit log-softmax over the full
    logits, not the step's fused cross-entropy."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    logits = model_lib.forward(TINY, params, tokens[:, :-1], seg[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    mask = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)).astype(jnp.float32)
    return (nll * mask).sum(), mask.sum()


@functools.lru_cache(maxsize=None)
def _params0():
    return jax.device_get(model_lib.init_params(TINY, jax.random.key(0)))


def _step(tx, split_grads, microbatches=1, schedule=None, loss_fn=None, teacher=None,
          devices=1):
    """(step, state) from the shared parameters, on a data-parallel mesh of ``devices``;
    with a ``loss_fn`` that has replay terms, the state carries ``teacher`` (parameters)
    and the step points the loss to the replay rows."""
    mesh = sharding_lib.make_mesh({"data": devices}, jax.devices()[:devices])
    rules = sharding_lib.DEFAULT_RULES
    state, shardings = create_train_state(TINY, tx, mesh, rules, None,
                                          params=jax.tree.map(jnp.array, _params0()),
                                          teacher=teacher is not None)
    if teacher is not None:
        state = state.replace(teacher=jax.device_put(teacher, shardings.teacher))
    step = make_train_step(Placement(TINY, mesh, rules, shardings), tx, microbatches, schedule,
                           loss_fn=loss_fn, split_grads=split_grads)
    return step, state


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def test_one_pass_gradient_is_the_sum_of_per_source_gradients():
    """The chain ``replay_mix, scale(-1)`` makes the update minus the combined gradient;
    one pass (split_grads=False, stats=False, also in 2 microbatches) and the split pass
    (stats=True) both give sum_s grad(loss sum of source s) / all tokens."""
    batch = _batch()
    rep = np.zeros(B, bool)
    rep[replay_positions(B, N_REPLAY)] = True
    parts = [{k: v[rows] for k, v in batch.items()} for rows in (~rep, rep)]
    grads, tokens = [], 0.0
    for part in parts:  # independent reference: jax.grad on each source separately
        (_, n), g = jax.value_and_grad(_loss_sum, has_aux=True)(_params0(), part)
        grads.append(_flat(g))
        tokens += float(n)
    expected = (grads[0] + grads[1]) / tokens
    tx = optax.chain(replay_mix(), optax.scale(-1.0))
    got, dots = {}, {}
    for name, micro, n, stats in (("plain", 1, 0, False), ("one_pass", 1, N_REPLAY, False),
                                  ("one_pass_micro2", 2, N_REPLAY, False),
                                  ("split", 1, N_REPLAY, True)):
        step, state = _step(tx, split_grads=False, microbatches=micro)
        compiled = step.lower(state, batch, n, stats=stats).compile()
        dots[name] = count_dot_ops(compiled)
        if name == "plain":
            continue
        new, metrics = compiled(state, batch)
        got[name] = _flat(_params0()) - _flat(new.params)
        np.testing.assert_allclose(got[name], expected, rtol=2e-4, atol=2e-7, err_msg=name)
        assert ("grad_cos" in metrics) == stats
    # the two passes differ by float rounding only
    scale = np.abs(expected).max()
    assert np.abs(got["one_pass"] - got["split"]).max() < 1e-5 * scale
    # the CPU proxy for the accelerator's replay tax: the replay step that does not log
    # compiles to as many dot ops as the plain step; the split (log) step to more
    assert dots["plain"] > 0
    assert dots["one_pass"] == dots["plain"] < dots["split"], dots


def test_log_steps_log_the_same_statistics():
    """With the run's optimizer: a log step (stats=True) of a one-pass method is the split
    step every replay step took before (same metrics, same parameters); a step without
    statistics has the same loss and, to rounding, parameters, and no per-source metrics."""
    cfg = default_config()
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-2, 2
    schedule = make_schedule(cfg.optim, 10)
    tx = make_optimizer(cfg, schedule)
    batch = _batch()
    runs = {}
    for name, split_grads, stats in (("always_split", True, True), ("log_step", False, True),
                                     ("other_step", False, False)):
        step, state = _step(tx, split_grads, schedule=schedule)
        new, metrics = step(state, batch, N_REPLAY, stats=stats)
        runs[name] = (jax.device_get(new.params), jax.device_get(metrics))
    ref_params, ref = runs["always_split"]
    params, logged = runs["log_step"]
    assert set(logged) == set(ref) >= {"grad_cos", "grad_cos_layer", "grad_cos_embed",
                                       "grad_norm_current", "grad_norm_replay",
                                       "loss_current", "loss_replay"}
    for k in ref:
        np.testing.assert_array_equal(logged[k], ref[k], err_msg=k)
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    params, other = runs["other_step"]
    assert not {"grad_cos", "grad_norm_replay", "loss_current", "loss_replay"} & set(other)
    np.testing.assert_allclose(other["loss"], ref["loss"], rtol=1e-6)
    np.testing.assert_allclose(other["update_norm"], ref["update_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5),
                 params, ref_params)


def test_count_dot_ops_reads_hlo_text():
    text = ("%dot.1 = f32[4,4]{1,0} dot(f32[4,8]{1,0} %a, f32[8,4]{1,0} %b), "
            "lhs_contracting_dims={1}\n"
            "  ROOT %convolution.2 = f32[1,4]{1,0} convolution(%x, %y), dim_labels=bf_io->bf\n"
            "%add.3 = f32[4]{0} add(%p, %q)\n  %dot_general_like = f32[] reduce(%r, %s)\n")
    assert count_dot_ops(text) == 2


@pytest.mark.parametrize("name,extra,split", [
    ("replay", {}, False), ("agem", {}, True), ("replay+reptile", {}, False),
    ("replay+l2", {}, False), ("replay+ewc", {}, False), ("replay+distill", {}, False),
    ("replay+der", {}, False), ("agem+distill", {}, True),
    ("replay", {"mix_weights": [0.5, 0.5]}, True)])
def test_which_methods_need_the_split_pass(name, extra, split):
    c = default_config()
    c.method.name = name
    for k, v in extra.items():
        c.method[k] = v
    assert methods.compose(c, TINY, lambda step: 1e-3).split_grads is split


def test_the_loop_splits_at_log_steps_only(tmp_path, monkeypatch):
    """A replay run asks for the statistics at exactly the steps the log hook logs (every
    log_every-th and a task's last), and those lines carry the gradient cosine."""
    from cpt_jax.train import loop
    from test_train_loop import _config

    calls = []
    make = loop.make_train_step

    def recording(*args, **kwargs):
        assert kwargs["split_grads"] is False  # plain replay: one pass
        step = make(*args, **kwargs)

        def wrapped(state, batch, n_replay, stats):
            calls.append((n_replay, stats))
            return step(state, batch, n_replay, stats=stats)
        return wrapped

    monkeypatch.setattr(loop, "make_train_step", recording)
    c = _config(tmp_path)
    c.tasks = [{"domain": "en", "steps": 2}, {"domain": "num", "steps": 5}]
    c.log_every, c.eval.every = 2, 0
    loop.run(c, str(tmp_path / "work"))
    # additive accounting: task num's 5 x 8 new rows take ceil(40 / 6) = 7 replay steps
    assert [n > 0 for n, _ in calls] == [False] * 2 + [True] * 7
    log_steps = [2, 4, 6, 8, 9]
    assert [s for _, s in calls] == [g in log_steps for g in range(1, 10)]
    logged = [json.loads(l) for l in open(tmp_path / "work" / "metrics.jsonl")]
    steps = {m["step"]: m for m in logged if "loss" in m}
    assert sorted(steps) == log_steps
    assert all("grad_cos" in steps[s] and "loss_replay" in steps[s] for s in log_steps[1:])


# ---------------------------------------------------------------------------------------
# Loss terms on replayed rows (distillation, DER) in the one pass

K_DER, T_DISTILL = 3, 2.0


def _teacher():
    """Parameters other than the student's, so the KL is not zero on any row."""
    return jax.device_get(model_lib.init_params(TINY, jax.random.key(1)))


def _der_batch():
    """_batch() with DER's stored top-k logits on EVERY row (valid on all rows but one
    replay row): only the replay rows may use them."""
    batch = _batch()
    rng = np.random.default_rng(3)
    batch["der_values"] = rng.normal(size=(B, L, K_DER)).astype(np.float32) * 2
    batch["der_indices"] = np.stack([rng.permutation(TINY.vocab_size)[:K_DER]
                                     for _ in range(B * L)]).reshape(B, L, K_DER).astype(np.int32)
    valid = np.ones(B, np.int32)
    valid[replay_positions(B, N_REPLAY)[0]] = 0
    batch["der_valid"] = valid
    return batch


def _term_reference(kind, weight, params, batch):
    """(CE sum over all rows + weight * the term summed over the replay rows, token count),
    by hand: full logits, explicit log-softmax, the replay rows picked by position."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    logits = model_lib.forward(TINY, params, tokens[:, :-1], seg[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    mask = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)).astype(jnp.float32)
    rep = replay_positions(B, N_REPLAY)
    z, m = logits[rep], mask[rep]
    if kind == "distill":
        t = model_lib.forward(TINY, _teacher(), tokens[rep, :-1], seg[rep, :-1])
        log_p = jax.nn.log_softmax(t / T_DISTILL, -1)
        log_q = jax.nn.log_softmax(z / T_DISTILL, -1)
        per_token = T_DISTILL ** 2 * jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)
    else:
        got = jnp.take_along_axis(z, jnp.asarray(batch["der_indices"][rep]), -1)
        per_token = jnp.mean((got - batch["der_values"][rep]) ** 2, -1)
        m = m * batch["der_valid"][rep][:, None]
    return (nll * mask).sum() + weight * (per_token * m).sum(), mask.sum()


def _term_setup(kind):
    """(loss_fn, teacher or None, batch, expected gradient) of a replay+``kind`` run."""
    c = default_config()
    c.method.name = f"replay+{kind}"
    if kind == "distill":
        c.method.distill.update(weight=0.7, temperature=T_DISTILL)
        weight, teacher, batch = 0.7, _teacher(), _batch()
    else:
        c.method.der.update(weight=0.5, k=K_DER)
        weight, teacher, batch = 0.5, None, _der_batch()
    assert not methods.compose(c, TINY, lambda step: 1e-3).split_grads
    (_, n), g = jax.value_and_grad(functools.partial(_term_reference, kind, weight),
                                   has_aux=True)(_params0(), batch)
    return methods.make_loss_fn(c, TINY), teacher, batch, _flat(g) / float(n)


@pytest.mark.parametrize("kind", ["distill", "der"])
def test_replay_terms_take_one_pass_with_the_split_pass_gradient(kind):
    """Distillation and DER between log steps: one forward/backward pass (also in 2
    microbatches, and with the batch over 2 data-parallel devices, where the reordered
    replay rows all sit on the last shard) gives the split pass's update, the gradient of
    CE over all rows plus the term on the replay rows only, over all loss tokens (a
    hand-written reference); the same loss metric; and fewer dot ops than the split pass
    (the body runs once)."""
    loss_fn, teacher, batch, expected = _term_setup(kind)
    tx = optax.chain(replay_mix(), optax.scale(-1.0))
    got, dots, logged = {}, {}, {}
    for name, micro, stats, devices in (("one_pass", 1, False, 1),
                                        ("one_pass_micro2", 2, False, 1),
                                        ("one_pass_data2_micro2", 2, False, 2),
                                        ("split", 1, True, 1)):
        step, state = _step(tx, split_grads=False, microbatches=micro, loss_fn=loss_fn,
                            teacher=teacher, devices=devices)
        compiled = step.lower(state, batch, N_REPLAY, stats=stats).compile()
        dots[name] = count_dot_ops(compiled)
        new, logged[name] = jax.device_get(compiled(state, batch))
        got[name] = _flat(_params0()) - _flat(new.params)
        np.testing.assert_allclose(got[name], expected, rtol=2e-4, atol=2e-7, err_msg=name)
    scale = np.abs(expected).max()
    assert np.abs(got["one_pass"] - got["split"]).max() < 1e-5 * scale
    for name in ("one_pass_micro2", "one_pass_data2_micro2"):
        assert np.abs(got[name] - got["split"]).max() < 1e-5 * scale, name
    for name in ("one_pass", "one_pass_micro2", "one_pass_data2_micro2"):
        np.testing.assert_allclose(logged[name]["loss"], logged["split"]["loss"], rtol=1e-6)
        assert f"{kind}_replay" not in logged[name] and "loss_replay" not in logged[name]
    assert f"{kind}_replay" in logged["split"]
    assert dots["one_pass"] < dots["split"], dots


def test_replay_terms_one_pass_refuses_uneven_microbatches():
    """The one pass with replay terms needs both parts divisible by the microbatches, as
    the split pass does, and says so in the split pass's words."""
    loss_fn, teacher, batch, _ = _term_setup("distill")
    step, state = _step(optax.chain(replay_mix(), optax.scale(-1.0)), split_grads=False,
                        microbatches=2, loss_fn=loss_fn, teacher=teacher)
    with pytest.raises(ValueError, match="batch part of 5 rows is not divisible by microbatches=2"):
        step.lower(state, batch, 3, stats=False)
