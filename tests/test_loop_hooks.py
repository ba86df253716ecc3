"""The open loop: hooks added from outside run at their cadence and at task starts and ends
(``Trainer.add_hook``, ``run(hooks=...)``); a method with memory is one file plus one
registry line and resumes bit-exactly; the W&B hook logs what metrics.jsonl got."""

from __future__ import annotations

import json

import pytest

import tally_method
from cpt_jax import methods
from cpt_jax.train.loop import Hook, run
from test_train_loop import _config
# autouse in this module too: wandb offline and silent, its files under tmp_path, and
# sys.exit / sys.excepthook given back after each test (wandb.init replaces them)
from test_wandb_logger import _offline_env  # noqa: F401

try:
    import wandb  # noqa: F401
except ImportError:
    wandb = None


def _small(tmp_path):
    c = _config(tmp_path)
    c.tasks = [{"domain": "en", "steps": 5}, {"domain": "num", "steps": 4},
               {"domain": "sym", "steps": 4}]
    c.eval.every, c.log_every = 4, 2
    c.checkpoint.every = 0  # task ends only
    return c


class Killed(Exception):
    pass


def test_a_hook_from_outside_runs_at_its_cadence_and_task_events(tmp_path):
    c = _small(tmp_path)
    c.tasks = c.tasks[:2]
    seen = []

    def record(info):
        seen.append((info.event, info.global_step, info.task, dict(info.logged)))

    results = run(c, str(tmp_path / "work"),
                  hooks=[Hook(record, every=3, at_task_end=True, at_task_start=True)])
    steps = [(e, g, k) for e, g, k, _ in seen]
    # additive accounting: task num's 4 x 8 new rows take ceil(32 / 6) = 6 steps
    assert [b["end_step"] for b in results["task_boundaries"]] == [5, 11]
    assert steps == [("task_start", 0, 0), ("step", 3, 0), ("task_end", 5, 0),
                     ("task_start", 5, 1), ("step", 6, 1), ("step", 9, 1),
                     ("task_end", 11, 1)]
    logged = {g: lg for e, g, _, lg in seen if e != "task_start"}
    assert all(lg == {} for e, _, _, lg in seen if e == "task_start")  # no replay pool
    # the built-in hooks ran first: what they logged at that event is in info.logged
    lines = [json.loads(x) for x in open(tmp_path / "work" / "metrics.jsonl")]
    at = {}
    for line in lines:
        at.setdefault(line["step"], {}).update(line)
    for g in (3, 5, 6, 9, 11):
        want = {k: v for k, v in at.get(g, {}).items() if k != "step"}
        assert logged[g] == want, g
    assert "loss" in logged[6] and "eval/en" not in logged[6]  # log step, no eval
    assert "eval/en" in logged[11] and "task_wall_s" in logged[11]  # a task end
    assert logged[3] == {}  # neither a log nor an eval step


def test_a_method_with_memory_resumes_bit_exactly(tmp_path, monkeypatch):
    """Killed two steps after the second boundary, before any checkpoint after it, the run
    resumes from the first task end's checkpoint (whose memory it restores) and replays
    the boundary: the results equal the uninterrupted run's, bit for bit."""
    monkeypatch.setitem(methods.REGISTRY, tally_method.METHOD.name, tally_method.METHOD)
    c = _small(tmp_path)
    c.method.name = "replay+tally"
    c.method.tally.weight = 0.05
    whole = run(c, str(tmp_path / "whole"))
    end_of_task_1 = whole["task_boundaries"][1]["end_step"]

    def kill(info):
        if info.global_step == end_of_task_1 + 2:
            raise Killed

    with pytest.raises(Killed):
        run(c, str(tmp_path / "killed"), hooks=[Hook(kill, every=1)])
    ckpts = sorted(int(p.name) for p in (tmp_path / "killed" / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert ckpts[-1] == end_of_task_1  # nothing saved after the boundary
    resumed = run(c, str(tmp_path / "killed"))
    for key in ("loss_matrix", "eval_curve", "metrics"):
        assert resumed[key] == whole[key], key

    # the memory mattered: without its first entry the run computes something else
    class Forgetful(tally_method.TallyMemory):
        def load_arrays(self, arrays):
            pass

    forgetful = tally_method.METHOD.__class__(**{**tally_method.METHOD.__dict__,
                                                 "memory": Forgetful})
    monkeypatch.setitem(methods.REGISTRY, "tally", forgetful)
    with pytest.raises(Killed):
        run(c, str(tmp_path / "forgetful"), hooks=[Hook(kill, every=1)])
    lost = run(c, str(tmp_path / "forgetful"))
    assert lost["loss_matrix"][2] != whole["loss_matrix"][2]


@pytest.mark.skipif(wandb is None, reason="needs wandb: pip install -e '.[test]'")
def test_wandb_hook_logs_what_metrics_jsonl_got(tmp_path):
    from test_wandb_logger import _fragments, _read

    c = _small(tmp_path)
    c.tasks = c.tasks[:2]
    c.logging.update(dict(wandb=True, mode="offline", project="cpt_test"))
    work = tmp_path / "work"
    run(c, str(work))
    run_id = (work / "wandb_id").read_text().strip()
    (path,) = _fragments(str(work), run_id)
    _, history = _read(path)
    want = {}
    for line in open(work / "metrics.jsonl"):
        rec = json.loads(line)
        numbers = {k: v for k, v in rec.items() if k != "step" and not isinstance(v, (str, bool))}
        if numbers:
            want.setdefault(rec["step"], {}).update(numbers)
    assert history == want
