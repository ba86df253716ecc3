"""Replay sampler: exact replay counts, purity, epochs, permutations, step budgets."""

import numpy as np
import pytest

from cpt_jax.replay.permutation import feistel_permute
from cpt_jax.replay.sampler import BatchIndex, ReplaySampler

ROWS = [37, 23, 11]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 100, 1000, 4097])
def test_permutation_is_a_bijection(n):
    keys = np.arange(6, dtype=np.uint64) * 12345
    perm = feistel_permute(np.arange(n), n, keys)
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
    np.testing.assert_array_equal(feistel_permute(np.arange(n)[::-1], n, keys), perm[::-1])
    if n >= 100:
        assert (perm != np.arange(n)).mean() > 0.9  # actually shuffles


def test_permutation_of_a_huge_range_is_random_access():
    n = 10**9
    idx = np.array([0, 1, n - 1, 123_456_789])
    out = feistel_permute(idx, n, np.arange(6, dtype=np.uint64))
    assert ((0 <= out) & (out < n)).all() and len(set(out.tolist())) == 4


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.3, 0.5, 1.0])
def test_exact_replay_count_and_only_earlier_tasks(rate):
    sampler = ReplaySampler(ROWS, global_batch=8, rate=rate, seed=0)
    expected = int(np.floor(rate * 8 + 0.5))
    for task in range(3):
        for step in range(20):
            b = sampler.batch(task, step)
            assert isinstance(b, BatchIndex) and len(b) == 8
            assert b.domain.dtype == np.int32 and b.row.dtype == np.int64
            n_rep = 0 if task == 0 else expected
            assert b.is_replay.sum() == n_rep == sampler.n_replay(task, step)
            assert (b.domain[~b.is_replay] == task).all()
            assert (b.domain[b.is_replay] < task).all()
            assert (b.row < np.array(ROWS)[b.domain]).all() and (b.row >= 0).all()


def test_replay_rows_are_spread_over_shards():
    sampler = ReplaySampler([1000, 1000], global_batch=16, rate=0.25, seed=0)
    b = sampler.batch(1, 0)
    for i in range(4):  # each contiguous quarter (a data-parallel shard) holds one
        assert b.shard_range(4 * i, 4 * i + 4).is_replay.sum() == 1
    assert len(b.shard_range(12, 16)) == 4


def test_batches_are_a_pure_function_of_seed_task_step():
    a = ReplaySampler(ROWS, 8, 0.5, seed=1)
    b = ReplaySampler(ROWS, 8, 0.5, seed=1)
    c = ReplaySampler(ROWS, 8, 0.5, seed=2)
    later_first = b.batch(2, 9)  # computed directly, no earlier steps
    for step in range(10):
        a.batch(2, step)
    for field in ("domain", "row", "is_replay"):
        np.testing.assert_array_equal(getattr(a.batch(2, 9), field),
                                      getattr(later_first, field))
    differ = [not np.array_equal(a.batch(2, s).row, c.batch(2, s).row) for s in range(10)]
    assert sum(differ) >= 8
    assert not np.array_equal(a.batch(1, 0).row, a.batch(2, 0).row)


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5])
def test_each_new_row_seen_once_per_epoch(rate):
    sampler = ReplaySampler(ROWS, global_batch=8, rate=rate, seed=3)
    task, n = 1, ROWS[1]
    new = np.concatenate([sampler.batch(task, s).row[~sampler.batch(task, s).is_replay]
                          for s in range(40)])
    epochs = len(new) // n
    assert epochs >= 2
    orders = [new[e * n:(e + 1) * n] for e in range(epochs)]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
    assert not np.array_equal(orders[0], orders[1])  # a new permutation every epoch


def test_replay_walks_the_union_of_earlier_rows_without_replacement():
    sampler = ReplaySampler(ROWS, global_batch=6, rate=0.5, seed=0)
    pool = ROWS[0] + ROWS[1]
    draws = []
    for s in range(2 * pool // 3):
        b = sampler.batch(2, s)
        draws += list(zip(b.domain[b.is_replay].tolist(), b.row[b.is_replay].tolist()))
    assert len(draws) == 2 * pool
    union = sorted([(0, r) for r in range(ROWS[0])] + [(1, r) for r in range(ROWS[1])])
    assert sorted(draws[:pool]) == union and sorted(draws[pool:]) == union


def test_rate_schedule():
    def decay(step):
        return max(0.0, 0.5 - 0.125 * step)  # 4, 3, 2, 1, 0, 0, ... replay rows of 8
    sampler = ReplaySampler(ROWS, 8, decay, seed=0)
    assert [sampler.n_replay(1, s) for s in range(6)] == [4, 3, 2, 1, 0, 0]
    assert sampler.replay_rows_before(1, 6) == 10
    assert sampler.new_rows_before(1, 6) == 38
    assert sampler.n_replay(0, 0) == 0
    # Additive: new rows per step 4, 5, 6, 7, 8, 8, ... (cumulative 4, 9, 15, 22, 30, 38).
    assert sampler.steps_in_task(1, budget_tokens=30 * 10, seq_len=10) == 5
    assert sampler.steps_in_task(1, budget_tokens=31 * 10, seq_len=10) == 6
    assert sampler.steps_in_task(1, budget_tokens=22 * 10, seq_len=10) == 4
    assert sampler.steps_in_task(1, budget_tokens=221, seq_len=10) == 5  # 23 rows
    with pytest.raises(ValueError, match=r"at step 2 must be in \[0, 1\], got 1.5"):
        ReplaySampler(ROWS, 8, lambda s: 1.5 if s == 2 else 0.0).batch(1, 2)


def test_steps_in_task_by_hand():
    # Budget 1000 tokens, seq_len 10 -> 100 rows; batch 4 -> 25 replay-free steps.
    add = ReplaySampler([100, 100], global_batch=4, rate=0.25, accounting="additive")
    ce = ReplaySampler([100, 100], global_batch=4, rate=0.25,
                       accounting="compute_equivalent")
    # Additive: 3 new rows per step -> ceil(100 / 3) = 34 steps (1.33x compute).
    assert add.steps_in_task(1, budget_tokens=1000, seq_len=10) == 34
    # Compute-equivalent: 100 / 4 = 25 steps; replay replaces new rows.
    assert ce.steps_in_task(1, budget_tokens=1000, seq_len=10) == 25
    # Task 0 has nothing to replay: both give 25.
    assert add.steps_in_task(0, budget_tokens=1000, seq_len=10) == 25
    # Budget in replay-free steps.
    assert add.steps_in_task(1, budget_steps=30) == 40
    assert ce.steps_in_task(1, budget_steps=30) == 30
    half = ReplaySampler([100, 100], global_batch=4, rate=0.5)
    assert half.steps_in_task(1, budget_steps=30) == 60


def test_errors():
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\], got 1.25"):
        ReplaySampler(ROWS, 8, 1.25)
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\], got -0.1"):
        ReplaySampler(ROWS, 8, -0.1)
    with pytest.raises(ValueError, match=r"accounting must be one of"):
        ReplaySampler(ROWS, 8, 0.1, accounting="free")
    with pytest.raises(ValueError, match=r"task 1 \('fr'\) has 0 training rows"):
        ReplaySampler([5, 0], 8, 0.1, names=["en", "fr"])
    s = ReplaySampler(ROWS, 8, 0.25)
    with pytest.raises(ValueError, match=r"budget_tokens must be positive, got 0"):
        s.steps_in_task(1, budget_tokens=0, seq_len=8)
    with pytest.raises(ValueError, match=r"budget_steps must be positive, got -3"):
        s.steps_in_task(1, budget_steps=-3)
    with pytest.raises(ValueError, match=r"exactly one"):
        s.steps_in_task(1)
    with pytest.raises(ValueError, match=r"needs seq_len"):
        s.steps_in_task(1, budget_tokens=100)
    with pytest.raises(ValueError, match=r"task must be in \[0, 3\)"):
        s.batch(3, 0)
    with pytest.raises(ValueError, match=r"never covers the budget"):
        ReplaySampler(ROWS, 8, 1.0).steps_in_task(1, budget_steps=5)
    assert ReplaySampler(ROWS, 8, 1.0).steps_in_task(0, budget_steps=5) == 5
    with pytest.raises(ValueError, match=r"leaves almost no new rows"):
        ReplaySampler(ROWS, 8, lambda s: 1.0).steps_in_task(1, budget_steps=5)
