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
