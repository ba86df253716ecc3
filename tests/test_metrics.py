"""CL metrics against hand-computed values."""

import math

import pytest

from cpt_jax.eval import metrics

# R[i][j]: loss on domain j after task i (3 tasks). Domain 0 is forgotten, domain 1 improves
# after its own task (negative forgetting).
R = [[2.0, 5.0, 6.0],
     [2.5, 3.0, 5.5],
     [2.8, 2.7, 1.5]]
B = [7.0, 7.5, 8.0]  # random-init losses


def test_hand_computed():
    assert metrics.learned_loss(R) == pytest.approx((2.0 + 3.0 + 1.5) / 3)
    assert metrics.retained_loss(R) == pytest.approx((2.8 + 2.7 + 1.5) / 3)
    # f_0 = 2.8 - min(2.0, 2.5) = 0.8 ; f_1 = 2.7 - min(5.0, 3.0) = -0.3
    assert metrics.forgetting(R) == pytest.approx((0.8 - 0.3) / 2)
    # BWT = mean(R00 - R20, R11 - R21) = mean(-0.8, 0.3)
    assert metrics.backward_transfer(R) == pytest.approx((-0.8 + 0.3) / 2)
    # FWT = mean(b1 - R01, b2 - R12) = mean(7.5 - 5.0, 8.0 - 5.5)
    assert metrics.forward_transfer(R, B) == pytest.approx(2.5)


def test_negative_forgetting_when_everything_improves():
    improving = [[3.0, 4.0], [2.0, 2.5]]
    assert metrics.forgetting(improving) == pytest.approx(-1.0)
    assert metrics.backward_transfer(improving) == pytest.approx(1.0)


def test_summary_has_perplexities():
    s = metrics.summary(R, B)
    assert s["retained_ppl"] == pytest.approx(math.exp(s["retained_loss"]))
    assert s["fwt"] == pytest.approx(2.5)


def test_single_task_and_bad_shape():
    assert metrics.forgetting([[1.0]]) is None
    with pytest.raises(ValueError, match="square"):
        metrics.learned_loss([[1.0, 2.0]])


# R2: domain 0 keeps improving during task 1 (best loss 1.8 after task 1, not after its own
# task), so Chaudhry's forgetting and last-step forgetting differ on it.
R2 = [[2.0, 6.0, 7.0],
      [1.8, 3.0, 6.5],
      [2.6, 3.4, 1.0]]


def test_forgetting_last_hand_computed():
    # last-step: mean(R20 - R00, R21 - R11) = mean(0.6, 0.4) = 0.5
    assert metrics.forgetting_last(R2) == pytest.approx(0.5)
    # Chaudhry: mean(2.6 - min(2.0, 1.8), 3.4 - min(6.0, 3.0)) = mean(0.8, 0.4) = 0.6
    assert metrics.forgetting(R2) == pytest.approx(0.6)
    # last-step forgetting is -BWT by definition, on any matrix
    for m in (R, R2):
        assert metrics.forgetting_last(m) == pytest.approx(-metrics.backward_transfer(m))


def test_forgetting_last_negative_and_single_task():
    # every earlier domain improved by the end: negative forgetting
    assert metrics.forgetting_last([[3.0, 4.0], [2.0, 2.5]]) == pytest.approx(-1.0)
    # on R domain 1 improved (3.0 -> 2.7) and domain 0 got worse (2.0 -> 2.8)
    assert metrics.forgetting_last(R) == pytest.approx((0.8 - 0.3) / 2)
    assert metrics.forgetting_last([[1.0]]) is None


def test_curve_area_is_mean_loss_over_the_run():
    curve = [
        {"step": 8, "task": "b", "losses": {"a": 6.0, "b": 1.0}},
        {"step": 0, "task": "init", "losses": {"a": 8.0, "b": 9.0}},  # out of order on purpose
        {"step": 4, "task": "a", "losses": {"a": 4.0}},                 # b not evaluated here
        {"step": 12, "task": "b", "losses": {"a": 2.0, "b": 1.0}},
    ]
    area = metrics.curve_area(curve)
    # a: trapezoids 4*(8+4)/2 + 4*(4+6)/2 + 4*(6+2)/2 = 24 + 20 + 16 = 60, over 12 steps
    assert area["a"] == pytest.approx(5.0)
    # b (points 0, 8, 12): 8*(9+1)/2 + 4*(1+1)/2 = 40 + 4 = 44, over 12 steps
    assert area["b"] == pytest.approx(44 / 12)
    # uneven spacing: 2*(4+2)/2 + 8*(2+2)/2 = 6 + 16 = 22 over 10 steps
    uneven = [{"step": s, "losses": {"x": v}} for s, v in [(0, 4.0), (2, 2.0), (10, 2.0)]]
    assert metrics.curve_area(uneven) == {"x": pytest.approx(2.2)}
    # a single point is its own mean; a constant curve has area = the constant
    assert metrics.curve_area([{"step": 5, "losses": {"x": 3.0}}]) == {"x": 3.0}
    flat = [{"step": s, "losses": {"x": 1.5}} for s in (0, 3, 7)]
    assert metrics.curve_area(flat)["x"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="'zzz'"):
        metrics.curve_area(curve, ["zzz"])


def test_summary_puts_a_perplexity_beside_every_loss():
    s = metrics.summary(R2, B)
    losses = [k for k in s if k.endswith("_loss")]
    assert set(losses) == {"learned_loss", "retained_loss", "init_loss"}
    for k in losses:
        assert s[k.replace("_loss", "_ppl")] == pytest.approx(math.exp(s[k]))
    assert s["init_loss"] == pytest.approx((7.0 + 7.5 + 8.0) / 3)
    assert s["forgetting_last"] == pytest.approx(0.5)
    # a diverged run: perplexity is inf, not an OverflowError
    assert metrics.summary([[1e4]])["retained_ppl"] == math.inf


def test_metrics_from_results():
    res = {"domains": ["a", "b"], "tasks": ["a", "b"],
           "loss_matrix": [[2.0, 5.0], [3.0, 1.0]],
           "init_losses": {"a": 6.0, "b": 7.0},
           "eval_curve": [{"step": 0, "losses": {"a": 6.0, "b": 7.0}},
                          {"step": 10, "losses": {"a": 2.0, "b": 5.0}},
                          {"step": 20, "losses": {"a": 3.0, "b": 1.0}}]}
    m = metrics.metrics_from_results(res)
    assert m["forgetting"] == pytest.approx(1.0)        # 3.0 - 2.0
    assert m["fwt"] == pytest.approx(7.0 - 5.0)
    assert m["curve_area"]["a"] == pytest.approx((10 * 4.0 + 10 * 2.5) / 20)
    assert m["curve_area"]["b"] == pytest.approx((10 * 6.0 + 10 * 3.0) / 20)
    assert m["curve_area_mean"] == pytest.approx((3.25 + 4.5) / 2)
    # a run stopped after its first task: the finished square part
    partial = dict(res, loss_matrix=[[2.0, 5.0]])
    assert metrics.metrics_from_results(partial)["retained_loss"] == pytest.approx(2.0)


def test_training_flops_counts_like_benchmark():
    from cpt_jax.model import LlamaConfig
    cfg = LlamaConfig(vocab_size=10, d_model=4, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=6)
    # flops_per_token by hand: weight matrices q 4x2x2=16, k 4x1x2=8, v 8, o 16, mlp 3*4*6=72,
    # output projection 4*10=40 -> 160 (RMSNorm scales are not matmuls); 6*160 = 960.
    # attention: 12 * n_layers * seq_len * n_heads * head_dim = 12 * 1 * 8 * 2 * 2 = 384.
    assert cfg.flops_per_token(8) == 960 + 384
    assert metrics.training_flops(cfg, 1000, 8) == 1000 * (960 + 384)

    stats = [{"task": "a", "steps": 8, "new_tokens": 2048, "replay_tokens": 0},
             {"task": "b", "steps": 6, "new_tokens": 1152, "replay_tokens": 384}]
    entries, totals = metrics.with_flops(stats, cfg, 8)
    assert "flops" not in stats[0]                       # input untouched
    assert entries[0]["flops"] == 2048 * 1344 and entries[1]["flops"] == 1536 * 1344
    assert entries[1]["task"] == "b" and entries[1]["replay_tokens"] == 384
    assert totals == {"new_tokens": 3200, "replay_tokens": 384, "tokens": 3584,
                      "flops": 3584 * 1344}


def test_metrics_from_results_of_a_joint_run():
    # joint training: one task over all data, evaluated on every configured domain
    res = {"domains": ["a", "b"], "tasks": ["joint"], "loss_matrix": [[2.0, 3.0]],
           "init_losses": {"a": 6.0, "b": 7.0},
           "config": {"tasks": [{"domain": "a", "steps": 4}, {"domain": "b", "steps": 4}]},
           "eval_curve": [{"step": 0, "losses": {"a": 6.0, "b": 7.0}},
                          {"step": 8, "losses": {"a": 2.0, "b": 3.0}}]}
    assert metrics.loss_matrix_columns(res) == ["a", "b"]
    m = metrics.metrics_from_results(res)
    assert m["retained_loss"] == pytest.approx(2.5)
    assert m["retained_ppl"] == pytest.approx(math.exp(2.5))
    assert set(m) == {"retained_loss", "retained_ppl", "curve_area", "curve_area_mean"}
    assert m["curve_area"] == {"a": pytest.approx(4.0), "b": pytest.approx(5.0)}
