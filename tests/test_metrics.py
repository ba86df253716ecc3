"""CL metrics against hand-computed values.

Each matrix is built so that a plausible wrong definition gives a different number; the
comment beside each expectation says which one and what it would give.
"""

import math

import pytest

from cpt_jax.eval import metrics

# R[i][j]: loss on domain j after task i (3 tasks).
# - domain 1 had a LOWER loss before it was trained (3.0 after task 0) than after its own task
#   (3.5): Chaudhry's "best so far" must only count rows l >= j;
# - the last domain's final loss (1.0) is far below the others: retained over the earlier
#   domains differs from the mean over all domains.
R = [[2.0, 3.0, 6.0],
     [2.2, 3.5, 5.0],
     [2.4, 3.6, 1.0]]
B = [7.0, 8.0, 9.0]      # losses of a randomly initialised model
START = [2.5, 3.2, 6.5]  # losses of a pre-trained start model (not random)


def test_learned_retained_final():
    assert metrics.learned_loss(R) == pytest.approx((2.0 + 3.5 + 1.0) / 3)
    # earlier domains only: (2.4 + 3.6) / 2 = 3.0; over all domains it would be 7.0 / 3
    assert metrics.retained_loss(R) == pytest.approx((2.4 + 3.6) / 2)
    assert metrics.final_loss_all(R) == pytest.approx((2.4 + 3.6 + 1.0) / 3)


def test_forgetting_ignores_the_loss_before_the_domain_was_trained():
    # f_0 = 2.4 - min(2.0, 2.2) = 0.4 ; f_1 = 3.6 - min(3.5) = 0.1 -> 0.25
    # (min over all rows l < T-1 would take 3.0 for domain 1: (0.4 + 0.6) / 2 = 0.5)
    assert metrics.forgetting(R) == pytest.approx((2.4 - 2.0 + 3.6 - 3.5) / 2)


def test_backward_and_forward_transfer():
    # BWT = mean(R00 - R20, R11 - R21) = mean(2.0 - 2.4, 3.5 - 3.6)
    assert metrics.backward_transfer(R) == pytest.approx((2.0 - 2.4 + 3.5 - 3.6) / 2)
    # FWT = mean(b1 - R01, b2 - R12) with b the RANDOM-init losses
    assert metrics.forward_transfer(R, B) == pytest.approx((8.0 - 3.0 + 9.0 - 5.0) / 2)
    # the start model's losses give another number, which is why FWT must not use them
    assert metrics.forward_transfer(R, START) == pytest.approx((3.2 - 3.0 + 6.5 - 5.0) / 2)
    with pytest.raises(ValueError, match="one loss per domain"):
        metrics.forward_transfer(R, B[:2])


# NEG: every earlier domain ends better than its best loss from its own task on (negative
# forgetting), domain 0 kept improving during task 1 (so last-step forgetting differs from
# Chaudhry's), and domain 1 was lowest before it was trained (2.0 after task 0).
NEG = [[3.0, 2.0, 5.0],
       [2.8, 2.6, 4.0],
       [2.5, 2.4, 1.0]]


def test_negative_forgetting():
    # f_0 = 2.5 - min(3.0, 2.8) = -0.3 ; f_1 = 2.4 - 2.6 = -0.2
    # (counting the pre-training 2.0 would give f_1 = +0.4 and a positive mean, 0.05)
    assert metrics.forgetting(NEG) == pytest.approx((2.5 - 2.8 + 2.4 - 2.6) / 2)
    # last-step: mean(R20 - R00, R21 - R11) = mean(-0.5, -0.2)
    assert metrics.forgetting_last(NEG) == pytest.approx((2.5 - 3.0 + 2.4 - 2.6) / 2)
    assert metrics.backward_transfer(NEG) == pytest.approx((3.0 - 2.5 + 2.6 - 2.4) / 2)
    # last-step forgetting is -BWT by definition, on any matrix
    for m in (R, NEG):
        assert metrics.forgetting_last(m) == pytest.approx(-metrics.backward_transfer(m))


def test_single_task_and_bad_shape():
    one = [[1.5]]
    assert metrics.retained_loss(one) is None and metrics.forgetting(one) is None
    assert metrics.backward_transfer(one) is None and metrics.forgetting_last(one) is None
    assert metrics.forward_transfer(one, [4.0]) is None
    assert metrics.final_loss_all(one) == 1.5 and metrics.learned_loss(one) == 1.5
    with pytest.raises(ValueError, match="square"):
        metrics.learned_loss([[1.0, 2.0]])


def test_summary_keys_and_perplexities():
    s = metrics.summary(R, B, START)
    assert set(s) == {"learned_loss", "learned_ppl", "retained_loss", "retained_ppl",
                      "final_loss_all", "final_ppl_all", "forgetting", "forgetting_last",
                      "bwt", "fwt", "init_loss_random", "init_ppl_random",
                      "init_loss_start", "init_ppl_start"}
    for k in [k for k in s if "loss" in k.split("_")]:
        assert s[k.replace("loss", "ppl")] == pytest.approx(math.exp(s[k]))
    assert s["retained_loss"] == pytest.approx(3.0)
    assert s["final_loss_all"] == pytest.approx(7.0 / 3)
    assert s["fwt"] == pytest.approx(4.5)
    assert s["init_loss_random"] == pytest.approx((7.0 + 8.0 + 9.0) / 3)
    assert s["init_loss_start"] == pytest.approx((2.5 + 3.2 + 6.5) / 3)
    # unknown b or start: those metrics and their perplexities are None
    s = metrics.summary(R)
    assert s["fwt"] is None and s["init_loss_random"] is None and s["init_ppl_start"] is None
    # one task: no retained loss; a diverged run: perplexity inf, not an OverflowError
    s = metrics.summary([[1e4]])
    assert s["retained_loss"] is None and s["retained_ppl"] is None
    assert s["final_ppl_all"] == math.inf


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


def _results(R, init_losses, init_losses_random=None, init=None):
    """A results.json dict for tasks a, b, c (eval curve: start and end points only)."""
    res = {"domains": ["a", "b", "c"], "tasks": ["a", "b", "c"], "loss_matrix": R,
           "init_losses": dict(zip("abc", init_losses)),
           "eval_curve": [{"step": 0, "losses": dict(zip("abc", init_losses))},
                          {"step": 10, "losses": dict(zip("abc", R[-1]))}],
           "config": {"init": dict(dict(hf="", orbax="", checkpoint=""), **(init or {}))}}
    if init_losses_random is not None:
        res["init_losses_random"] = dict(zip("abc", init_losses_random))
    return res


def test_metrics_from_results_uses_random_init_losses_for_fwt():
    # a run from a pre-trained checkpoint records both: FWT uses the random ones
    m = metrics.metrics_from_results(_results(R, START, B, init={"hf": "/ckpt/llama"}))
    assert m["fwt"] == pytest.approx((8.0 - 3.0 + 9.0 - 5.0) / 2)    # not 0.85 (START)
    assert m["init_loss_random"] == pytest.approx((7.0 + 8.0 + 9.0) / 3)
    assert m["init_loss_start"] == pytest.approx((2.5 + 3.2 + 6.5) / 3)
    assert m["retained_loss"] == pytest.approx((2.4 + 3.6) / 2)
    assert m["forgetting"] == pytest.approx((0.4 + 0.1) / 2)
    # curve: a from 2.5 to 2.4, b 3.2 -> 3.6, c 6.5 -> 1.0, each a straight line: mean = midpoint
    assert m["curve_area"] == {"a": pytest.approx(2.45), "b": pytest.approx(3.4),
                               "c": pytest.approx(3.75)}
    assert m["curve_area_mean"] == pytest.approx((2.45 + 3.4 + 3.75) / 3)


def test_metrics_from_old_results_without_random_init_losses():
    # fresh init (config.init all empty, or no config at all): init_losses ARE random-init
    fresh = _results(R, B)
    m = metrics.metrics_from_results(fresh)
    assert m["fwt"] == pytest.approx((8.0 - 3.0 + 9.0 - 5.0) / 2)
    assert m["init_loss_random"] == m["init_loss_start"] == pytest.approx(8.0)
    del fresh["config"]
    assert metrics.metrics_from_results(fresh)["fwt"] == pytest.approx(4.5)
    # pre-trained start: init_losses are not random-init losses, so no FWT
    for source in ("hf", "orbax", "checkpoint"):
        m = metrics.metrics_from_results(_results(R, START, init={source: "/somewhere"}))
        assert m["fwt"] is None and m["init_loss_random"] is None
        assert m["init_loss_start"] == pytest.approx((2.5 + 3.2 + 6.5) / 3)
        assert m["learned_loss"] == pytest.approx((2.0 + 3.5 + 1.0) / 3)


def test_metrics_from_results_of_a_partial_run():
    # stopped after task 1: the finished 2 x 2 part, R[:2, :2] = [[2.0, 3.0], [2.2, 3.5]]
    m = metrics.metrics_from_results(_results(R[:2], B, B))
    assert m["retained_loss"] == pytest.approx(2.2)
    assert m["final_loss_all"] == pytest.approx((2.2 + 3.5) / 2)
    assert m["forgetting"] == pytest.approx(2.2 - 2.0)
    assert m["fwt"] == pytest.approx(8.0 - 3.0)
    assert m["init_loss_random"] == pytest.approx((7.0 + 8.0) / 2)


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
    # joint training: one task over all data, evaluated on every configured domain; the last
    # configured domain (c) is far from the others, so "earlier domains" matters
    res = {"domains": ["a", "b", "c"], "tasks": ["joint"], "loss_matrix": [[2.0, 3.0, 0.5]],
           "init_losses": {"a": 6.0, "b": 7.0, "c": 8.0},
           "config": {"tasks": [{"domain": d, "steps": 4} for d in "abc"]},
           "eval_curve": [{"step": 0, "losses": {"a": 6.0, "b": 7.0, "c": 8.0}},
                          {"step": 12, "losses": {"a": 2.0, "b": 3.0, "c": 0.5}}]}
    assert metrics.loss_matrix_columns(res) == ["a", "b", "c"]
    m = metrics.metrics_from_results(res)
    assert m["retained_loss"] == pytest.approx((2.0 + 3.0) / 2)   # all domains: 5.5 / 3
    assert m["retained_ppl"] == pytest.approx(math.exp(2.5))
    assert m["final_loss_all"] == pytest.approx((2.0 + 3.0 + 0.5) / 3)
    assert m["init_loss_random"] == m["init_loss_start"] == pytest.approx(7.0)
    assert set(m) == {"retained_loss", "retained_ppl", "final_loss_all", "final_ppl_all",
                      "init_loss_random", "init_ppl_random", "init_loss_start",
                      "init_ppl_start", "curve_area", "curve_area_mean"}
    assert m["curve_area"] == {"a": pytest.approx(4.0), "b": pytest.approx(5.0),
                               "c": pytest.approx(4.25)}
