"""End to end: scripts/train.py on tiny local domains writes a valid results.json."""

import json
import os
import sys

import numpy as np
import pytest

from cpt_jax import results_file
from cpt_jax.train.loop import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_domains(tmp_path):
    """Three tiny domains with very different text, as JSON-lines files (left alone when
    they already exist: worker processes of one test share them)."""
    words = {"en": ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran"],
             "num": [str(i) for i in range(10)],
             "sym": ["<", ">", "=", "+", "{", "}", "(", ")", ";"]}
    domains = []
    for k, (name, vocab) in enumerate(words.items()):
        path = tmp_path / f"{name}.jsonl"
        if not path.exists():
            lines = [" ".join(vocab[(d * 7 + i * (k + 2)) % len(vocab)] for i in range(40))
                     for d in range(60)]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
            tmp.rename(path)
        domains.append({"name": name, "kind": "jsonl", "pattern": str(path), "field": "text"})
    return domains


def _config(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import tiny  # configs/tiny.py
    c = tiny.get_config()
    c.model.vocab_size = 320
    c.seq_len, c.global_batch = 32, 8
    c.data.domains = _write_domains(tmp_path)
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.val_fraction = 0.2
    c.tasks = [{"domain": "en", "steps": 8}, {"domain": "num", "steps": 4},
               {"domain": "sym", "tokens": 4 * 8 * 32}]
    c.replay.rate = 0.25
    c.eval.update(dict(every=4, max_rows=8, batch=8))
    c.optim.lr = 3e-3
    return c


def test_run_writes_results(tmp_path):
    c = _config(tmp_path)
    res = run(c, str(tmp_path / "work"))
    on_disk = json.load(open(tmp_path / "work" / "results.json"))
    assert on_disk["loss_matrix"] == res["loss_matrix"]
    assert on_disk["schema_version"] == res["schema_version"] == results_file.SCHEMA_VERSION
    assert res["domains"] == ["en", "num", "sym"] and res["tasks"] == ["en", "num", "sym"]
    assert len(res["loss_matrix"]) == 3 and all(len(r) == 3 for r in res["loss_matrix"])
    # the first task is learned: its loss after task 0 is below the random-init loss
    assert res["loss_matrix"][0][0] < res["init_losses"]["en"] - 0.5
    # additive accounting: 2 of 8 rows replayed, 6 new, so a 4-step (32-row) budget takes
    # ceil(32 / 6) = 6 steps, and a 1024-token budget the same.
    steps = [t["steps"] for t in res["task_stats"]]
    assert steps == [8, 6, 6]
    assert res["task_stats"][1]["replay_tokens"] == 6 * 2 * 32
    assert res["task_stats"][1]["new_tokens"] == 6 * 6 * 32
    assert res["task_stats"][0]["replay_tokens"] == 0
    ends = [b["end_step"] for b in res["task_boundaries"]]
    assert ends == [8, 14, 20]
    curve_steps = [e["step"] for e in res["eval_curve"]]
    assert curve_steps == [0, 4, 8, 12, 14, 16, 20]
    assert set(res["metrics"]) >= {"learned_loss", "retained_loss", "forgetting", "bwt", "fwt"}
    assert res["config"]["replay"]["rate"] == 0.25
    assert os.path.getsize(tmp_path / "work" / "loss_curves.png") > 1000
    lines = open(tmp_path / "work" / "metrics.jsonl").read().splitlines()
    assert json.loads(lines[-1])["step"] == 20


def test_bad_config_is_rejected_before_training(tmp_path):
    c = _config(tmp_path)
    c.replay.rate = 1.5
    with pytest.raises(ValueError, match=r"replay.rate=1.5"):
        run(c, str(tmp_path / "w1"))
    c = _config(tmp_path)
    c.tasks = [{"domain": "en", "steps": 2}, {"domain": "en", "steps": 2}]
    with pytest.raises(ValueError, match="appear twice"):
        run(c, str(tmp_path / "w2"))
    c = _config(tmp_path)
    c.init.hf, c.init.checkpoint = "/models/x", "runs/y"
    with pytest.raises(ValueError, match="init.hf and init.checkpoint are all set"):
        run(c, str(tmp_path / "w3"))


def test_boundary_methods_run_through_the_loop(tmp_path):
    """EWC, distillation, L2-to-task-start, a decaying replay rate and nested Reptile
    together: the loop completes, replayed rows carry a distillation term, and the decaying
    schedule replays fewer rows than a constant 25% would."""
    c = _config(tmp_path)
    c.method.ewc.update(dict(lam=10.0, rows=8, chunk=4))
    c.method.distill.update(dict(weight=0.5, temperature=2.0))
    c.method.l2.update(dict(weight=1e-3, anchor="task_start"))
    c.method.reptile.periods = [{"every": 2, "meta_lr": 0.5}, {"every": 4, "meta_lr": 0.5}]
    c.method.name = "replay+ewc+distill+l2+reptile"
    c.replay.update(dict(schedule="linear_decay", end_rate=0.0))
    c.replay.accounting = "compute_equivalent"
    res = run(c, str(tmp_path / "work"))
    assert len(res["loss_matrix"]) == 3
    stats = res["task_stats"]
    assert [t["steps"] for t in stats] == [8, 4, 4]
    # mix-review decays over the whole run, not per task: 0.25 -> 0 linearly over the 4 + 4
    # nominal steps of tasks 1 and 2, B = 8 rows, round half up:
    # task 1: 8 * (.25, .21875, .1875, .15625) = 2, 1.75, 1.5, 1.25 -> 2 + 2 + 2 + 1
    # task 2: 8 * (.125, .09375, .0625, .03125) = 1, .75, .5, .25 -> 1 + 1 + 1 + 0
    assert stats[1]["replay_tokens"] == 7 * 32
    assert stats[2]["replay_tokens"] == 3 * 32
    logged = [json.loads(l) for l in open(tmp_path / "work" / "metrics.jsonl")]
    assert any("distill_replay" in m and m["distill_replay"] > 0 for m in logged)


def test_joint_training_is_one_task_over_the_union(tmp_path):
    c = _config(tmp_path)
    c.joint = True
    res = run(c, str(tmp_path / "work"))
    assert res["tasks"] == ["joint"]
    assert res["task_stats"][0]["steps"] == 8 + 4 + 4 and res["task_stats"][0]["replay_tokens"] == 0
    assert len(res["loss_matrix"]) == 1 and len(res["loss_matrix"][0]) == 3
    assert set(res["metrics"]) == {
        "retained_loss", "retained_ppl", "final_loss_all", "final_ppl_all", "init_loss_random",
        "init_ppl_random", "init_loss_start", "init_ppl_start", "curve_area", "curve_area_mean"}
    R = res["loss_matrix"][0]
    assert res["metrics"]["retained_loss"] == pytest.approx((R[0] + R[1]) / 2)
    by_domain = res["compute"]["new_tokens_by_domain"]  # the union's rows by their domain
    assert sorted(by_domain) == ["en", "num", "sym"] and min(by_domain.values()) > 0
    assert sum(by_domain.values()) == res["compute"]["new_tokens"] == 16 * 8 * 32


def test_a_replay_policy_gets_its_pool_from_the_current_model(tmp_path, monkeypatch):
    """A toy ReplayPolicy ("the 6 easiest earlier rows"), registered by name: at task 1's
    start it scores every task-0 row with score_rows; the scores equal the mean token loss
    of a forward pass with the task-0-end weights, and every row replayed in task 1 is one
    of the 6 it kept."""
    from cpt_jax import pretrained
    from cpt_jax.replay import policies
    from cpt_jax.replay.buffer import ReplayPolicy, ReplayPool
    from cpt_jax.train.checkpoint import RunCheckpointer
    from cpt_jax.core.losses import token_losses
    from cpt_jax.train.setup import prepare_run

    seen = {}

    class Easiest(ReplayPolicy):
        name, bounded = "easiest", False

        def pool(self, b):
            ids = np.arange(b.starts[b.task])
            scores = b.score_rows(ids)
            seen.update(task=b.task, ids=ids, scores=scores)
            return ReplayPool.of_rows(np.sort(ids[np.argsort(scores, kind="stable")[:6]]))

    monkeypatch.setitem(policies.POLICIES, "easiest", Easiest)
    c = _config(tmp_path)
    c.tasks = [{"domain": "en", "steps": 4}, {"domain": "num", "steps": 4}]
    c.replay.policy = "easiest"
    c.checkpoint.update(dict(every=0, async_save=False))
    work = tmp_path / "work"
    run(c, str(work))

    # the scores: an independent forward pass with the weights at the end of task 0
    parts = prepare_run(c, str(work))
    mcfg = pretrained.model_config(c)
    params = RunCheckpointer(str(work / "checkpoints"), read_only=True).read_arrays(
        parts.steps[0])["params"]
    tokens, segs = parts.train_sources[0].read(seen["ids"])
    losses, mask, _ = token_losses(mcfg, params, {"tokens": tokens, "segment_ids": segs})
    want = np.asarray((losses * mask).sum(1) / np.maximum(mask.sum(1), 1))
    assert seen["task"] == 1 and len(seen["ids"]) == len(parts.train_sources[0])
    np.testing.assert_allclose(seen["scores"], want, rtol=2e-5, atol=2e-5)

    # task 1 replays only the kept rows, drawn by the sampler from that pool
    kept = np.sort(seen["ids"][np.argsort(seen["scores"], kind="stable")[:6]])
    parts.sampler.pools[1] = ReplayPool.of_rows(kept)
    replayed = set()
    for step in range(parts.steps[1]):
        b = parts.sampler.batch(1, step)
        replayed |= set(b.row[b.is_replay].tolist())
        assert (b.domain[b.is_replay] == 0).all()
    assert replayed and replayed <= set(kept.tolist())
