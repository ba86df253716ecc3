"""Run comparison: table values against hand-computed ones, figures, CLI and its errors."""

import json
import os
import re
import subprocess
import sys

import pytest

from cpt_jax.eval import metrics, report
from cpt_jax.model import LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODEL = dict(vocab_size=10, d_model=4, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=6)
# flops_per_token(seq_len=8) of MODEL, worked out by hand in tests/test_metrics.py
FLOPS_PER_TOKEN = 1344


def _results(rate, R, name="", method=None, compute=None):
    """A results.json dict for tasks a, b (fresh init) with a two-point-per-task eval curve."""
    config = {"name": name, "seq_len": 8, "replay": {"rate": rate}, "model": dict(MODEL),
              "init": {"hf": "", "orbax": "", "checkpoint": ""}}
    if method is not None:
        config["method"] = method
    res = {
        "domains": ["a", "b"], "tasks": ["a", "b"], "loss_matrix": R,
        "init_losses": {"a": 6.0, "b": 7.0}, "init_losses_random": {"a": 6.0, "b": 7.0},
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
    assert row["retained_loss"] == pytest.approx(3.0)              # earlier domain a only
    assert row["final_loss_all"] == pytest.approx((3.0 + 1.0) / 2)
    assert row["forgetting"] == pytest.approx(3.0 - 2.0)
    assert row["bwt"] == pytest.approx(2.0 - 3.0)
    assert row["fwt"] == pytest.approx(7.0 - 5.0)
    # a: 10*(6+2)/2 + 10*(2+3)/2 = 65 over 20 -> 3.25; b: 10*(7+5)/2 + 10*(5+1)/2 = 90 -> 4.5
    assert row["curve_area_mean"] == pytest.approx((3.25 + 4.5) / 2)


def test_fwt_of_a_pretrained_start_uses_the_random_init_losses():
    pre = _results(0.0, [[2.0, 5.0], [3.0, 1.0]])
    pre["config"]["init"]["hf"] = "/ckpt/llama"
    pre["init_losses"] = {"a": 2.5, "b": 4.0}                      # the pre-trained model's
    assert report.run_row(pre, "pre")["fwt"] == pytest.approx(7.0 - 5.0)    # not 4.0 - 5.0
    del pre["init_losses_random"]                                   # an old results.json
    assert report.run_row(pre, "pre")["fwt"] is None


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
                        "retained | final, all domains | forgetting | BWT | FWT | "
                        "mean loss over run |")
    assert len(lines) == 4 and all(line.count("|") == 13 for line in lines)
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[:3] == ["replay50", "replay", "0.5"]
    assert cells[4] == f"{1600 * FLOPS_PER_TOKEN:.3g}"
    # learned (2 + 1.5)/2, retained 2.25, final (2.25 + 1.5)/2, forgetting 2.25 - 2,
    # BWT 2 - 2.25, FWT 7 - 5
    assert cells[5:11] == ["1.750", "2.250", "1.875", "0.250", "-0.250", "2.000"]


def test_report_definitions_agree_with_metrics():
    """Every formula report.md states is the one in the metrics module docstring."""
    def flat(text):
        return " ".join(text.split())
    formulas = ["mean_j R[j][j]", "mean_{j < T-1} R[T-1][j]", "mean_j R[T-1][j]",
                "R[T-1][j] - min_{j <= l < T-1} R[l][j]",
                "mean_{i < T-1} (R[i][i] - R[T-1][i])", "mean_{i >= 1} (b[i] - R[i-1][i])"]
    for f in formulas:
        assert f in flat(report.DEFINITIONS) and f in flat(metrics.__doc__), f
    for text in (report.DEFINITIONS, metrics.__doc__):
        assert not re.search(r"R\[T\]", text)
        assert "randomly initialised" in text.lower()


def test_write_report_files(tmp_path):
    a = _write_run(tmp_path / "runs" / "seq", _results(0.0, [[2.0, 5.0], [3.0, 1.0]]))
    b = _write_run(tmp_path / "runs" / "replay", _results(0.25, [[2.0, 5.0], [2.2, 1.1]]))
    out = tmp_path / "rep"
    rep = report.write_report([a, b], str(out))
    pngs = ["loss_curves.png", "loss_matrices.png", "retained_vs_flops.png",
            "retained_vs_learned.png"]
    assert sorted(os.listdir(out)) == sorted(["report.md", "report.json"] + pngs)
    assert sorted(rep["files"]) == sorted(os.listdir(out))
    for name in pngs:
        with open(out / name, "rb") as f:
            assert f.read(8) == PNG_MAGIC
        assert os.path.getsize(out / name) > 5000
    md = (out / "report.md").read_text()
    assert rep["markdown"] in md and "![loss curves](loss_curves.png)" in md
    assert "![retained loss vs learned loss](retained_vs_learned.png)" in md
    # no machine-local paths: a report pasted into a README must not carry them
    assert str(tmp_path) not in md and os.path.abspath(a) not in md and "Runs:" not in md
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["seq", "replay"]
    assert rows[1]["retained_loss"] == pytest.approx(2.2)
    assert rows[1]["final_loss_all"] == pytest.approx((2.2 + 1.1) / 2)


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
    # retained: the earlier configured domain a only, as for a sequential run; final: both
    assert row["method"] == "joint" and row["retained_loss"] == pytest.approx(2.5)
    assert row["final_loss_all"] == pytest.approx((2.5 + 1.5) / 2)
    assert row["learned_loss"] is None and row["forgetting"] is None
    seq = _write_run(tmp_path / "seq", _results(0.0, [[2.0, 5.0], [3.0, 1.0]]))
    rep = report.write_report([seq, _write_run(tmp_path / "joint", joint)], str(tmp_path / "o"))
    assert "| joint | joint | 0 |" in rep["markdown"]
    assert os.path.getsize(rep["files"]["loss_matrices.png"]) > 5000
    # the joint run has no learned loss, hence no point in retained_vs_learned (still drawn)
    assert os.path.getsize(rep["files"]["retained_vs_learned.png"]) > 5000


def test_replay_policies_get_their_columns_and_the_buffer_figure(tmp_path):
    """Runs of bounded replay policies: the table names policy and buffer, and
    retained_vs_buffer.png is written; a report of uniform runs only has neither."""
    runs = []
    for name, policy, buffer, retained in (("all", "uniform", 0, 2.5),
                                           ("res64", "reservoir", 64, 2.9),
                                           ("res256", "reservoir", 256, 2.7)):
        res = _results(0.25, [[2.0, 5.0], [retained, 1.0]], name=name)
        res["config"]["replay"].update(policy=policy, buffer_rows=buffer)
        runs.append(_write_run(tmp_path / "runs" / name, res))
    rep = report.write_report(runs, str(tmp_path / "rep"))
    header = rep["markdown"].splitlines()[0]
    assert "| replay policy | buffer rows |" in header
    assert "| res64 | res64 | 0.25 | reservoir | 64 |" in rep["markdown"]
    with open(tmp_path / "rep" / "retained_vs_buffer.png", "rb") as f:
        assert f.read(8) == PNG_MAGIC
    plain = report.write_report(runs[:1], str(tmp_path / "plain"))
    assert "replay policy" not in plain["markdown"]
    assert not os.path.exists(tmp_path / "plain" / "retained_vs_buffer.png")
