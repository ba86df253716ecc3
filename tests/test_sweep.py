"""scripts/sweep.py: grid expansion, FLOPs-matched budgets against a hand count, --print,
per-point failures, and a sweep killed in the middle that the same command finishes
without redoing finished points."""

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from cpt_jax import sweep as sweep_lib
from cpt_jax.presets import MODEL_PRESETS
from tiny_runs import ROOT, load_script, tiny_run_config

SWEEP = os.path.join(ROOT, "scripts", "sweep.py")
sweep_script = load_script("sweep")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    domains = []
    letters = ["".join(chr(97 + (i * 7 + j * 3) % 26) for j in range(2 + i % 5))
               for i in range(80)]
    for name, words in (("en", letters), ("num", [str(i * 37) for i in range(60)])):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": " ".join(words[(d + i) % len(words)]
                                                              for i in range(40))}) + "\n"
                                for d in range(40)))
        domains.append({"name": name, "kind": "jsonl", "pattern": str(path), "field": "text"})
    path = root / "cfg.py"
    path.write_text(tiny_run_config(json.dumps(domains), str(root / "cache"),
                                    vocab_size=300, steps=6, keep=3))
    return str(path)


def _sweep(argv):
    return sweep_script.main(argv)


def test_grid_is_the_product_with_presets_expanded():
    points = sweep_lib.expand_grid([sweep_lib.parse_axis("model=tiny,base"),
                                    sweep_lib.parse_axis("replay.rate=0,0.5"),
                                    sweep_lib.parse_axis("seed=3")])
    assert [p.values for p in points] == [
        {"model": m, "replay.rate": r, "seed": "3"} for m in ("tiny", "base") for r in ("0", "0.5")]
    assert points[2].name == "model-base_replay.rate-0_seed-3"
    ov = dict(points[2].overrides)
    assert ov["model.d_model"] == "192" and ov["model.n_layers"] == "6"
    assert ov["model.head_dim"] == "none" and ov["replay.rate"] == "0"
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        sweep_lib.expand_grid([sweep_lib.parse_axis("model=huge")])
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        sweep_lib.parse_axis("replay.rate")


def test_demo_presets_span_8x_non_embedding_parameters():
    from cpt_jax.model import LlamaConfig

    def non_embedding(name):  # by hand: q, k, v, o, gate, up, down and two norms per layer
        p = {"head_dim": None, **MODEL_PRESETS[name]}
        d, h, kv, f = p["d_model"], p["n_heads"], p["n_kv_heads"], p["d_ff"]
        dh = d // h
        return p["n_layers"] * (d * h * dh * 2 + d * kv * dh * 2 + 3 * d * f + 2 * d) + d

    sizes = [non_embedding(n) for n in ("tiny", "small", "base")]
    assert sizes[0] < sizes[1] < sizes[2] and sizes[2] >= 8 * sizes[0]
    cfg = LlamaConfig.from_dict({**MODEL_PRESETS["base"], "vocab_size": 2048})
    assert cfg.num_params(include_embedding=False) == sizes[2]


def _hand_flops(model: dict, vocab, tasks, rate, batch, seq):
    """Training FLOPs by hand: additive replay takes ceil(steps * B / (B - round(rate B)))
    steps after task 0; 6 FLOPs per matmul weight per token plus 12 L S H Dh attention."""
    d, layers, h, kv, f = (model[k] for k in ("d_model", "n_layers", "n_heads",
                                               "n_kv_heads", "d_ff"))
    dh = d // h
    weights = layers * (2 * d * h * dh + 2 * d * kv * dh + 3 * d * f) + vocab * d
    per_token = 6 * weights + 12 * layers * seq * h * dh
    n_replay = math.floor(rate * batch + 0.5)
    steps = tasks[0] + sum(math.ceil(s * batch / (batch - n_replay)) for s in tasks[1:])
    return steps * batch * seq * per_token


def test_match_flops_gives_every_point_the_budget(config_file):
    axes = [sweep_lib.parse_axis("model=tiny,small"), sweep_lib.parse_axis("replay.rate=0,0.5")]
    points = sweep_lib.expand_grid(axes)
    natural = {p.name: _hand_flops(MODEL_PRESETS[p.values["model"]], 300, [60, 60],
                                   float(p.values["replay.rate"]), 8, 16) for p in points}
    budget = sweep_lib.match_flops(config_file, [("tasks", json.dumps(
        [{"domain": "en", "steps": 60}, {"domain": "num", "steps": 60}]))], points, "max")
    assert budget == pytest.approx(max(natural.values()))
    for p in points:
        tasks = [t["steps"] for t in json.loads(dict(p.overrides)["tasks"])]
        model = MODEL_PRESETS[p.values["model"]]
        got = _hand_flops(model, 300, tasks, float(p.values["replay.rate"]), 8, 16)
        assert got == pytest.approx(p.flops, rel=1e-9)
        assert got == pytest.approx(budget, rel=0.02), p.name  # step rounding only
    biggest = max(points, key=lambda p: natural[p.name])
    assert [t["steps"] for t in json.loads(dict(biggest.overrides)["tasks"])] == [60, 60]
    small = [p for p in points if p.values == {"model": "tiny", "replay.rate": "0"}][0]
    assert json.loads(dict(small.overrides)["tasks"])[0]["steps"] > 3 * 60  # trains longer


def test_print_lists_one_command_per_point(config_file, tmp_path, capsys):
    work = str(tmp_path / "sw")
    assert _sweep(["--config", config_file, "--workdir", work, "--grid", "seed=0,1",
                   "--grid", "model=tiny", "--config.optim.lr=0.002", "--print"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    argv = shlex.split(lines[1])
    assert argv[argv.index("--workdir") + 1] == os.path.join(work, "seed-1_model-tiny")
    assert "--config.optim.lr=0.002" in argv and "--config.seed=1" in argv
    assert "--config.model.d_model=64" in argv
    index = json.load(open(os.path.join(work, "index.json")))
    assert [e["status"] for e in index["points"]] == ["pending", "pending"]


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_backend_optimization_level=0", "PYTHONPATH": ROOT}


@pytest.mark.slow
def test_failed_point_is_recorded_and_the_sweep_goes_on(config_file, tmp_path):
    work = str(tmp_path / "sw")
    proc = subprocess.run([sys.executable, SWEEP, "--config", config_file, "--workdir", work,
                           "--grid", "replay.rate=1.5,0"], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    points = {e["name"]: e for e in json.load(open(os.path.join(work, "index.json")))["points"]}
    assert points["replay.rate-0"]["status"] == "done"
    assert points["replay.rate-1.5"]["status"] == "failed"
    assert "replay" in points["replay.rate-1.5"]["error"] and "1.5" in points["replay.rate-1.5"]["error"]
    assert sweep_lib.is_complete(os.path.join(work, "replay.rate-0"))


@pytest.mark.slow
def test_killed_sweep_finishes_with_the_same_command(config_file, tmp_path):
    work = str(tmp_path / "sw")
    cmd = [sys.executable, SWEEP, "--config", config_file, "--workdir", work,
           "--grid", "seed=0,1,2"]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    index_path = os.path.join(work, "index.json")
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once point 0 is done and point 1 has saved
        time.sleep(0.2)
        try:
            status = [e["status"] for e in json.load(open(index_path))["points"]]
        except (OSError, ValueError):
            continue
        ckpt = os.path.join(work, "seed-1", "checkpoints")
        if status[0] == "done" and os.path.isdir(ckpt) and os.listdir(ckpt):
            break
    else:
        proc.kill()
        pytest.fail(f"sweep did not reach point 1: {proc.communicate()[0]}")
    proc.send_signal(signal.SIGKILL)  # no chance to clean up; its run gets SIGTERM
    proc.wait()
    first = os.stat(os.path.join(work, "seed-0", "results.json")).st_mtime_ns
    assert not sweep_lib.is_complete(os.path.join(work, "seed-2"))

    again = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "sweep: 3/3 done, 0 failed" in again.stdout
    index = json.load(open(index_path))
    assert [e["status"] for e in index["points"]] == ["done"] * 3
    assert os.stat(os.path.join(work, "seed-0", "results.json")).st_mtime_ns == first
    logs = [open(os.path.join(work, f"seed-{s}", "train.log")).read() for s in range(3)]
    assert [log.count("\n$ ") + log.startswith("$ ") for log in logs] == [1, 2, 1]
