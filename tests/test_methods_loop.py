"""Each continual-learning method, run through the whole loop, moves the parameters the way
its definition says, compared with the same run without it (same data, seed and steps).

Two tasks of 6 steps, checkpoints every 3 steps (all kept), so the parameters at the task
boundary (step 6) and at the end (step 12) can be read back.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_loop import _config

from cpt_jax import model as model_lib
from cpt_jax import pretrained
from cpt_jax.train.checkpoint import RunCheckpointer
from cpt_jax.train.loop import prepare_run, run

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` skips it in the inner loop

BOUNDARY, END = 6, 12


def _method_config(data_dir, **edits):
    c = _config(data_dir)
    c.tasks = [{"domain": "en", "steps": 6}, {"domain": "num", "steps": 6}]
    c.replay.rate = 0.0
    c.eval.every = 0
    c.log_every = 1
    c.checkpoint.update(dict(every=3, keep=10, async_save=False))
    for key, value in edits.items():
        node, *path = key.split(".")
        target = c[node]
        for p in path[:-1]:
            target = target[p]
        if path:
            target[path[-1]] = value
        else:
            c[node] = value
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (config, checkpointer, workdir) of each run, made once for the module."""
    data = tmp_path_factory.mktemp("data")
    specs = {
        "seq": {},
        "l2": {"method.name": "replay+l2", "method.l2.weight": 1.0,
               "method.l2.anchor": "task_start"},
        "ewc": {"method.name": "replay+ewc", "method.ewc.lam": 1e4, "method.ewc.rows": 8},
        "reptile": {"method.name": "replay+reptile",
                    "method.reptile.periods": [{"every": 3, "meta_lr": 0.5}]},
        "replay": {"replay.rate": 0.25},
        "distill": {"replay.rate": 0.25, "method.name": "replay+distill",
                    "method.distill.weight": 50.0},
    }
    out = {}
    for name, edits in specs.items():
        c = _method_config(data, **edits)
        work = tmp_path_factory.mktemp(name)
        run(c, str(work))
        out[name] = (c, RunCheckpointer(str(work / "checkpoints"), read_only=True), work)
    return out


def _params(runs, name, step):
    return runs[name][1].read_arrays(step)["params"]


def _find(tree, key):
    """The first non-empty subtree stored under `key` in nested dicts and lists."""
    if isinstance(tree, dict) and jax.tree.leaves(tree.get(key)):
        return tree[key]
    if isinstance(tree, (dict, list)):
        for v in (tree.values() if isinstance(tree, dict) else tree):
            found = _find(v, key)
            if found is not None:
                return found
    return None


def _sq_dist(a, b, weight=None):
    weight = weight if weight is not None else jax.tree.map(np.ones_like, a)
    return float(sum(np.sum(w * (x - y) ** 2) for x, y, w in zip(
        jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(weight))))


def test_l2_to_task_start_ends_closer_to_its_anchor(runs):
    """L2 toward the weights at the task start: over task 1 the weights drift less from
    the task-1 start than without the penalty."""
    drift = {n: _sq_dist(_params(runs, n, END), _params(runs, n, BOUNDARY))
             for n in ("seq", "l2")}
    assert drift["l2"] < 0.5 * drift["seq"], drift


def test_ewc_ends_with_a_lower_fisher_weighted_distance(runs):
    """EWC: sum_i F_i (theta_i - theta*_i)^2 after task 1 is lower than without EWC. The
    two runs are identical through task 0 (F = 0 then), so theta* and F are shared."""
    ewc_state = runs["ewc"][1].read_arrays(END)
    fisher = _find(ewc_state["opt_state"], "fisher")
    anchor = _find(ewc_state["opt_state"], "anchor")
    np.testing.assert_array_equal(jax.tree.leaves(anchor)[0],
                                  jax.tree.leaves(_params(runs, "seq", BOUNDARY))[0])
    assert sum(float(np.sum(f)) for f in jax.tree.leaves(fisher)) > 0
    penalty = {n: _sq_dist(_params(runs, n, END), anchor, fisher) for n in ("seq", "ewc")}
    assert penalty["ewc"] < 0.5 * penalty["seq"], penalty


def test_reptile_params_are_the_interpolation_at_a_period_end(runs):
    """Reptile (every 3, meta_lr 0.5): the first 3 inner steps equal plain training's, so
    at step 3 the weights are init + 0.5 (plain_3 - init)."""
    c = runs["reptile"][0]
    mcfg = pretrained.model_config(c)
    init = jax.device_get(model_lib.init_params(mcfg, jax.random.key(c.seed)))
    plain, rep = _params(runs, "seq", 3), _params(runs, "reptile", 3)
    want = jax.tree.map(lambda i, p: i + 0.5 * (p - i), init, plain)
    for w, r, p in zip(jax.tree.leaves(want), jax.tree.leaves(rep), jax.tree.leaves(plain)):
        np.testing.assert_allclose(r, w, rtol=1e-5, atol=1e-6)
        assert not np.allclose(r, p)  # the meta step did move the weights


def test_distillation_keeps_the_old_predictions_closer(runs):
    """Logit distillation on replayed rows: after task 1, KL(teacher || student) on task 0's
    training rows is lower than for plain replay; the teacher is the task-0-end model,
    the same in both runs."""
    c = runs["distill"][0]
    parts = prepare_run(c, str(runs["distill"][2]))
    tokens, seg = parts.train_sources[0].read(np.arange(8))
    teacher = _params(runs, "distill", BOUNDARY)
    np.testing.assert_array_equal(jax.tree.leaves(teacher)[0],
                                  jax.tree.leaves(_params(runs, "replay", BOUNDARY))[0])

    def kl(student):
        t = model_lib.forward(parts.mcfg, teacher, tokens[:, :-1], seg[:, :-1])
        s = model_lib.forward(parts.mcfg, student, tokens[:, :-1], seg[:, :-1])
        p = jax.nn.softmax(t, -1)
        return float(jnp.mean(jnp.sum(p * (jax.nn.log_softmax(t, -1)
                                           - jax.nn.log_softmax(s, -1)), -1)))

    kls = {n: kl(_params(runs, n, END)) for n in ("replay", "distill")}
    assert kls["distill"] < 0.7 * kls["replay"], kls


def test_online_ewc_adds_each_tasks_fisher_once(tmp_path):
    """Online EWC over two boundaries: the second adds exactly the empirical Fisher of task
    1's rows at the task-1-end weights, mean_n (d loss_n / d theta)^2 with loss_n a row's
    mean token loss; task 0's Fisher is not added again. ``ewc.rows`` equals task 1's row
    count, so the draw without replacement is all of its rows, whatever their order."""
    c = _method_config(tmp_path, **{"method.name": "replay+ewc", "method.ewc.lam": 1.0,
                                    "method.ewc.chunk": 1})
    c.tasks = [{"domain": "en", "steps": 3}, {"domain": "num", "steps": 3},
               {"domain": "sym", "steps": 3}]
    parts = prepare_run(c, str(tmp_path / "work"))
    rows = parts.train_sources[1]
    c.method.ewc.rows = len(rows)
    run(c, str(tmp_path / "work"))
    ckpt = RunCheckpointer(str(tmp_path / "work" / "checkpoints"), read_only=True)
    after_task1, end = ckpt.read_arrays(6), ckpt.read_arrays(9)
    f1 = _find(after_task1["opt_state"], "fisher")
    f2 = _find(end["opt_state"], "fisher")
    assert sum(float(np.sum(f)) for f in jax.tree.leaves(f1)) > 0  # task 0's, added once

    tokens, seg = rows.read(np.arange(len(rows)))

    def row_loss(params, tok, sg):
        logits = model_lib.forward(parts.mcfg, params, tok[None, :-1], sg[None, :-1])[0]
        logp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(logp, tok[1:, None], -1)[:, 0]
        same_doc = ((sg[1:] == sg[:-1]) & (sg[1:] > 0)).astype(jnp.float32)
        return jnp.sum(nll * same_doc) / jnp.sum(same_doc)

    theta = after_task1["params"]
    grad = jax.jit(jax.grad(row_loss))
    squares = [jax.tree.map(np.square, grad(theta, tokens[i], seg[i]))
               for i in range(len(rows))]
    want_increment = jax.tree.map(lambda *s: np.mean(np.stack(s), 0), *squares)
    for a, b, w in zip(jax.tree.leaves(f2), jax.tree.leaves(f1),
                       jax.tree.leaves(want_increment)):
        np.testing.assert_allclose(a - b, w, rtol=2e-3, atol=1e-9)


def _counts(tree):
    """(schedule count, Adam count) in a checkpoint's opt_state dicts."""
    found = {}

    def walk(t):
        if isinstance(t, dict):
            if set(t) == {"count"}:
                found["schedule"] = int(t["count"])
            elif set(t) >= {"count", "mu", "nu"}:
                found["adam"] = int(t["count"])
            for v in t.values():
                walk(v)
        elif isinstance(t, list):
            for v in t:
                walk(v)

    walk(tree)
    return found["schedule"], found["adam"]


@pytest.mark.parametrize("continue_schedule", [False, True])
def test_init_checkpoint_restarts_the_schedule_and_keeps_moments(runs, tmp_path,
                                                                 continue_schedule):
    """A run started from another run's whole state (12 steps) warms up again by default
    (its logged learning rates are a fresh run's) with Adam's moments and their count
    carried over; init.continue_schedule keeps the old schedule position instead."""
    import json
    c = _method_config(tmp_path, **{"init.checkpoint": str(runs["seq"][2]),
                                    "init.continue_schedule": continue_schedule})
    work = tmp_path / "work"
    run(c, str(work))
    lrs = [m["lr"] for m in map(json.loads, open(work / "metrics.jsonl")) if "lr" in m]
    fresh = [m["lr"] for m in map(json.loads, open(runs["seq"][2] / "metrics.jsonl"))
             if "lr" in m]
    sched, adam = _counts(RunCheckpointer(str(work / "checkpoints"),
                                          read_only=True).read_arrays(3)["opt_state"])
    assert adam == 12 + 3  # moments (and their bias correction) carried over
    if continue_schedule:
        assert sched == 12 + 3 and lrs[0] != pytest.approx(fresh[0])
    else:
        assert sched == 3 and lrs == pytest.approx(fresh)
