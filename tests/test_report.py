"""Run comparison: table values against hand-computed ones, figures, CLI and its errors."""

import json
import os
import subprocess
import sys

import pytest

from cpt_jax.eval import report
from cpt_jax.model import LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODEL = dict(vocab_size=10, d_model=4, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=6)
# flops_per_token(seq_len=8) of MODEL, worked out by hand in tests/test_metrics.py
FLOPS_PER_TOKEN = 1344


def _results(rate, R, name="", method=None, compute=None):
    """A results.json dict for tasks a, b with a two-point-per-task eval curve."""
    config = {"name": name, "seq_len": 8, "replay": {"rate": rate}, "model": dict(MODEL)}
    if method is not None:
        config["method"] = method
    res = {
        "domains": ["a", "b"], "tasks": ["a", "b"], "loss_matrix": R,
        "init_losses": {"a": 6.0, "b": 7.0},
        "eval_curve": [{"step": 0, "task": "init", "losses": {"a": 6.0, "b": 7.0}},
                       {"step": 10, "task": "a", "losses": {"a": R[0][0], "b": R[0][1]}},
                       {"step": 20, "task": "b", "losses": {"a": R[1][0], "b": R[1][1]}}],
        "task_boundaries": [{"task": "a", "end_step": 10}, {"task": "b", "end_step": 20}],
        "task_stats": [{"task": "a", "steps": 10, "new_tokens": 800, "replay_tokens": 0},
                       {"task": "b", "steps": 10, "new_tokens": 600, "replay_tokens": 200}],
        "metrics": {"stale": "ignored: the report recomputes"},
        "config": config,
    }
    if compute is not None:
        res["compute"] = compute
    return res


def _write_run(path, res):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump(res, f)
    return str(path)


def test_rows_against_hand_computed_values():
    seq = _results(0.0, [[2.0, 5.0], [3.0, 1.0]])
    row = report.run_row(seq, "seq")
    assert row["run"] == "seq" and row["method"] == "sequential" and row["replay_rate"] == 0.0
    assert row["params"] == LlamaConfig(**MODEL).num_params()
    # tokens 800 + 800 at 1344 FLOPs each, recomputed from task_stats and config.model
    assert row["flops"] == pytest.approx(1600 * FLOPS_PER_TOKEN)
    assert row["learned_loss"] == pytest.approx((2.0 + 1.0) / 2)
    assert row["retained_loss"] == pytest.approx((3.0 + 1.0) / 2)
    assert row["forgetting"] == pytest.approx(3.0 - 2.0)
    assert row["bwt"] == pytest.approx(2.0 - 3.0)
    assert row["fwt"] == pytest.approx(7.0 - 5.0)
    # a: 10*(6+2)/2 + 10*(2+3)/2 = 65 over 20 -> 3.25; b: 10*(7+5)/2 + 10*(5+1)/2 = 90 -> 4.5
    assert row["curve_area_mean"] == pytest.approx((3.25 + 4.5) / 2)


def test_method_and_flops_sources():
    R = [[2.0, 5.0], [2.2, 1.0]]
    assert report.run_row(_results(0.25, R), "x")["method"] == "replay"
    assert report.run_row(_results(0.25, R, name="demo"), "x")["method"] == "demo"
    assert report.run_row(_results(0.25, R, name="demo", method={"name": "mer"}),
                          "x")["method"] == "mer"
    assert report.run_row(_results(0.0, R, method="ewc"), "x")["method"] == "ewc"
    # FLOPs the run recorded win over recomputation
    rec = _results(0.25, R, compute={"flops": 123.0})
    assert report.run_row(rec, "x")["flops"] == 123.0
    no_model = _results(0.25, R)
    del no_model["config"]["model"]
    row = report.run_row(no_model, "x")
    assert row["flops"] is None and row["params"] is None
    assert "| – | – |" in report.markdown_table([row])


def test_markdown_table_format():
    rows = [report.run_row(_results(0.0, [[2.0, 5.0], [3.0, 1.0]]), "seq"),
            report.run_row(_results(0.5, [[2.0, 5.0], [2.25, 1.5]]), "replay50")]
    lines = report.markdown_table(rows).splitlines()
    assert lines[0] == ("| run | method | replay rate | params | training FLOPs | learned | "
                        "retained | forgetting | BWT | FWT | mean loss over run |")
    assert len(lines) == 4 and all(line.count("|") == 12 for line in lines)
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[:3] == ["replay50", "replay", "0.5"]
    assert cells[4] == f"{1600 * FLOPS_PER_TOKEN:.3g}"
    assert cells[5:10] == ["1.750", "1.875", "0.250", "-0.250", "2.000"]


def test_write_report_files(tmp_path):
    a = _write_run(tmp_path / "runs" / "seq", _results(0.0, [[2.0, 5.0], [3.0, 1.0]]))
    b = _write_run(tmp_path / "runs" / "replay", _results(0.25, [[2.0, 5.0], [2.2, 1.1]]))
    out = tmp_path / "rep"
    rep = report.write_report([a, b], str(out))
    assert sorted(os.listdir(out)) == sorted(["report.md", "report.json", "loss_curves.png",
                                              "loss_matrices.png", "retained_vs_flops.png"])
    for name in ("loss_curves.png", "loss_matrices.png", "retained_vs_flops.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == PNG_MAGIC
        assert os.path.getsize(out / name) > 5000
    md = (out / "report.md").read_text()
    assert rep["markdown"] in md and "![loss curves](loss_curves.png)" in md
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["seq", "replay"]
    assert rows[1]["retained_loss"] == pytest.approx(1.65)


def test_missing_results_is_named_and_nothing_written(tmp_path):
    good = _write_run(tmp_path / "good", _results(0.0, [[2.0, 5.0], [3.0, 1.0]]))
    bad = tmp_path / "crashed"
    bad.mkdir()
    out = tmp_path / "rep"
    with pytest.raises(FileNotFoundError, match=r"crashed has no results.json"):
        report.write_report([good, str(bad)], str(out))
    assert not out.exists()
    (bad / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        report.load_results(str(bad))


def test_labels_are_unique():
    assert report.run_labels(["x/run", "y/run", "z/other/"]) == ["run", "run#2", "other"]


def test_cli(tmp_path):
    a = _write_run(tmp_path / "seq", _results(0.0, [[2.0, 5.0], [3.0, 1.0]]))
    script = os.path.join(ROOT, "scripts", "report.py")
    proc = subprocess.run([sys.executable, script, a, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("| run | method |") and "| seq | sequential | 0 |" in proc.stdout
    assert (tmp_path / "out" / "report.md").exists()
    proc = subprocess.run([sys.executable, script, str(tmp_path / "nope"),
                           "--out", str(tmp_path / "out2")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nope does not exist" in proc.stderr
    assert not (tmp_path / "out2").exists()


def test_joint_run_in_the_report(tmp_path):
    joint = _results(0.0, [[2.0, 5.0], [3.0, 1.0]])
    joint.update(tasks=["joint"], loss_matrix=[[2.5, 1.5]], method="replay")
    joint["config"].update(joint=True, tasks=[{"domain": "a", "steps": 10},
                                              {"domain": "b", "steps": 10}])
    row = report.run_row(joint, "joint")
    assert row["method"] == "joint" and row["retained_loss"] == pytest.approx(2.0)
    assert row["learned_loss"] is None and row["forgetting"] is None
    seq = _write_run(tmp_path / "seq", _results(0.0, [[2.0, 5.0], [3.0, 1.0]]))
    rep = report.write_report([seq, _write_run(tmp_path / "joint", joint)], str(tmp_path / "o"))
    assert "| joint | joint | 0 |" in rep["markdown"]
    assert os.path.getsize(rep["files"]["loss_matrices.png"]) > 5000
