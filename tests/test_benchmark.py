"""scripts/benchmark.py runs (no timing asserted): its method comparison reports the state
memory each method adds, in parameter copies."""

import os
import sys

import pytest

from cpt_jax import cli
from cpt_jax.optim.transforms import LOSS_WINDOW
from tiny_runs import ROOT, load_script



@pytest.fixture(scope="module")
def bench():
    mod = load_script("benchmark")
    mod.config = cli.load_config(os.path.join(ROOT, "configs", "tiny.py"), [])
    return mod


def test_single_benchmark_reports_mfu(bench):
    cfg = bench.config
    r = bench.benchmark(cfg, steps=1, warmup=0)
    assert r["tokens_per_s"] > 0
    # MFU = model FLOP/s over the measured matmul peak
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["model_flops_per_token"]
                                     / (r["matmul_peak_tflops_per_s"] * 1e12), rel=1e-9)
    # configs/tiny.py by hand: per layer q 64*64 + k,v 2*64*32 + o 64*64 + mlp 3*64*96 = 30720,
    # 2 layers + head 64*128 -> 69632 matmul params; attention 12*2*32*64 = 49152.
    assert r["model_flops_per_token"] == 6 * 69632 + 49152
    # float32 parameters: 4 bytes each; AdamW keeps two moments of the same size
    # (plus the schedule count, the step guard's three int32 counters and its float32
    # window of recent losses)
    assert r["param_bytes"] == 4 * r["params"]
    guard = 4 * LOSS_WINDOW
    assert 2 * r["param_bytes"] + guard <= r["opt_state_bytes"] <= 2 * r["param_bytes"] + guard + 64


def test_method_memory_in_parameter_copies(bench):
    r = bench.compare_methods(bench.config, ["replay", "agem", "reptile", "distill", "der"],
                              steps=1, warmup=0)
    assert r["replay"]["extra_param_copies"] == 0.0
    assert r["agem"]["extra_param_copies"] == 0.0
    assert r["der"]["extra_param_copies"] == 0.0  # DER's logits live on the host
    assert r["distill"]["extra_param_copies"] == 1.0  # the teacher snapshot
    # the slow weights plus a 4-byte step counter
    assert r["reptile"]["extra_param_copies"] == pytest.approx(1.0, abs=1e-3)
    assert r["reptile"]["meta_step_s"] > 0 and r["reptile"]["amortised_over"] == 500
    # dot ops of the compiled steps: replay between log steps takes one pass over the batch
    # (plain training's dots), its log step and every A-GEM step the split pass
    dots = {m: (v["dot_ops"], v["dot_ops_log_step"]) for m, v in r.items()}
    plain = dots["plain"][0]
    assert plain > 0 and dots["plain"] == (plain, plain) and dots["reptile"] == (plain, plain)
    assert dots["replay"][0] == plain < dots["replay"][1]
    assert dots["agem"][0] == dots["agem"][1] == dots["replay"][1]
    # distillation and DER between log steps: one pass plus their terms' logits (and the
    # teacher's forward) on the replayed rows, fewer dots than their (split) log step
    assert plain < dots["der"][0] < dots["der"][1] == dots["replay"][1]
    assert dots["der"][0] < dots["distill"][0] < dots["distill"][1]


def test_checkpoint_timing_saves_the_whole_state(bench, tmp_path):
    r = bench.checkpoint_times(bench.config, str(tmp_path / "ck"), repeats=1)
    # configs/tiny.py: 69632 matmul params + embedding 128*64 + norms (2*2 + 1)*64 = 78144;
    # params + AdamW's two moments in float32, the guard's loss window, a few int32 counters
    assert 3 * 4 * 78144 + 4 * LOSS_WINDOW <= r["state_bytes"] < 3 * 4 * 78144 + 4 * LOSS_WINDOW + 64
    assert r["blocking_blocked_s"] > 0 and r["async_total_s"] >= r["async_blocked_s"] > 0
    assert not os.listdir(tmp_path / "ck")  # the scratch checkpoints are removed


def test_peer_torch_starts_from_our_weights_and_is_timed(bench):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    r = bench.compare_peer(bench.config, steps=1, warmup=0, rounds=2)
    # Hugging Face's LlamaForCausalLM on our exported initial weights: the same loss
    assert r["first_step_loss"]["torch"] == pytest.approx(r["first_step_loss"]["ours"], rel=1e-4)
    # timed in separate processes, alternating: two rounds of one process per framework;
    # the ratio is each round's, its median and range reported
    assert len(r["rounds"]) == 2
    ratios = [x["ours"]["tokens_per_s"] / x["torch"]["tokens_per_s"] for x in r["rounds"]]
    assert r["speed_ratio"] == pytest.approx(sum(ratios) / 2)
    assert r["speed_ratio_range"] == pytest.approx([min(ratios), max(ratios)])
    for side in ("ours", "torch"):
        lo, hi = r[side]["tokens_per_s_range"]
        assert 0 < lo <= r[side]["tokens_per_s"] <= hi
    with pytest.raises(ValueError, match="at least 2"):
        bench.compare_peer(bench.config, steps=1, warmup=0, rounds=1)


def test_peer_torch_without_torch_says_how_to_install_it(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ValueError, match=r'pip install -e "\.\[peer\]"'):
        bench.compare_peer(bench.config, steps=1, warmup=0)


def test_profile_attributes_the_train_steps_ops(bench):
    """--profile on the tiny config: the traced ops are the compiled train step's, and the
    step's matmuls (its q/k/v/o, MLP and head projections and their gradients) are there."""
    r = bench.step_profile(bench.config, steps=2, warmup=1)
    assert r["params"] > 0 and r["op_ms"] > 0
    assert r["by_kind"]["matmul"] > 0
    assert abs(sum(r["by_kind"].values()) - r["op_ms"]) < 1e-6
    assert all(0 < t["share"] <= 1 for t in r["top"])
