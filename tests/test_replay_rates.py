"""Replay-rate schedules: hand values, bounds, and their use by the sampler."""

import math

import numpy as np
import pytest

from cpt_jax.replay import rates
from cpt_jax.replay.sampler import ReplaySampler

# ---------------------------------------------------------------------------------------
# Replay-rate schedules


def test_constant_and_linear_decay_values():
    f = rates.replay_rate_schedule("constant", 0.25, 100, end_rate=0.9)
    assert [f(s) for s in (0, 50, 100, 1000)] == [0.25] * 4
    f = rates.replay_rate_schedule("linear_decay", 0.5, 100)
    assert f(0) == 0.5
    assert f(25) == pytest.approx(0.375)
    assert f(50) == pytest.approx(0.25)
    assert f(100) == 0.0 and f(250) == 0.0
    f = rates.replay_rate_schedule("linear_decay", 0.2, 10, end_rate=0.6)  # may rise too
    assert f(5) == pytest.approx(0.4) and f(10) == pytest.approx(0.6)


def test_exp_decay_values():
    # rate 0.5 -> 0.05 over 100 steps: 0.5 * 0.1 ** (s / 100).
    f = rates.replay_rate_schedule("exp_decay", 0.5, 100, end_rate=0.05)
    assert f(0) == 0.5
    assert f(50) == pytest.approx(0.5 / math.sqrt(10))
    assert f(100) == pytest.approx(0.05) and f(10**6) == pytest.approx(0.05)
    # Constant factor per step.
    v = np.asarray([f(s) for s in range(101)])
    np.testing.assert_allclose(v[1:] / v[:-1], 0.1 ** 0.01)
    # Mix-review's per-epoch decay d over E epochs: end_rate = rate * d**E.
    g = rates.replay_rate_schedule("exp_decay", 0.8, 30, end_rate=0.8 * 0.7 ** 3)
    assert g(10) == pytest.approx(0.8 * 0.7) and g(20) == pytest.approx(0.8 * 0.49)


@pytest.mark.parametrize("kind", rates.RATE_SCHEDULES)
def test_schedules_stay_in_bounds_and_are_pure(kind):
    for rate, end in ((1.0, 1e-9), (0.3, 0.3), (1e-6, 1e-7)):
        f = rates.replay_rate_schedule(kind, rate, 7, end_rate=end)
        v = [f(s) for s in range(20)]
        assert all(0.0 <= x <= 1.0 and isinstance(x, float) for x in v)
        assert v == [f(s) for s in range(20)]


def test_schedule_bad_inputs():
    with pytest.raises(ValueError, match=r"replay.schedule='cosine'.*exp_decay"):
        rates.replay_rate_schedule("cosine", 0.5, 10)
    with pytest.raises(ValueError, match="replay.rate=1.5"):
        rates.replay_rate_schedule("constant", 1.5, 10)
    with pytest.raises(ValueError, match="end_rate"):
        rates.replay_rate_schedule("exp_decay", 0.5, 10)  # end_rate 0
    with pytest.raises(ValueError, match="span_steps"):
        rates.replay_rate_schedule("constant", 0.5, 0)
    with pytest.raises(ValueError, match=">= 0"):
        rates.replay_rate_schedule("linear_decay", 0.5, 10)(-1)


def test_schedule_drives_the_sampler():
    f = rates.replay_rate_schedule("linear_decay", 0.5, 8)
    sampler = ReplaySampler([40, 40], global_batch=8, rate=f)
    # round(rate * 8): 0.5 -> 4, step 4: 0.25 -> 2, step 8 on: 0.
    assert [sampler.n_replay(1, s) for s in (0, 4, 8, 9)] == [4, 2, 0, 0]
    assert sampler.n_replay(0, 0) == 0
    b = sampler.batch(1, 0)
    assert b.is_replay.sum() == 4 and (b.domain[b.is_replay] == 0).all()


def test_task_steps_of_a_config_follow_the_accounting():
    """The demo's budgets (240, 120, 120 replay-free steps of 16 rows) at 25% replay: 4 of
    16 rows replayed from task 1 on, so additive accounting needs 1920 / 12 = 160 steps to
    cover each later task's 1920 new rows; compute-equivalent keeps 120."""
    from cpt_jax.replay.rates import task_steps
    from configs.demo import get_config

    c = get_config("replay25")
    tasks = [dict(t) for t in c.tasks]
    assert task_steps(c, tasks) == [240, 160, 160]
    c.replay.accounting = "compute_equivalent"
    assert task_steps(c, tasks) == [240, 120, 120]
