"""Replay policies and the pools they give the sampler: every sampling distribution is
checked against its intended probabilities (counts over many steps within a binomial
bound, or exact where the rule is exact), and every policy against an expectation built
from its definition."""

import numpy as np
import pytest

from cpt_jax.replay import policies
from cpt_jax.replay.buffer import Boundary, PoolGroup, ReplayPool, largest_remainder
from cpt_jax.replay.sampler import ReplaySampler
from cpt_jax.run_config import default_config


def _sampler(train_rows=(40, 30, 50), batch=20, rate=0.25, seed=0):
    return ReplaySampler(list(train_rows), batch, rate, seed=seed)


def _replayed(sampler, task, steps):
    """Global ids [steps, n_replay] and weights of the replayed rows of steps [0, steps)."""
    ids, weights = [], []
    for t in range(steps):
        idx = sampler.batch(task, t)
        ids.append(sampler.starts[idx.domain[idx.is_replay]] + idx.row[idx.is_replay])
        if idx.weight is not None:
            weights.append(idx.weight[idx.is_replay])
    return np.stack(ids), (np.stack(weights) if weights else None)


def test_largest_remainder_by_hand():
    np.testing.assert_array_equal(largest_remainder(10, [0.5, 0.3, 0.2]), [5, 3, 2])
    np.testing.assert_array_equal(largest_remainder(7, [1, 1, 1]), [3, 2, 2])
    np.testing.assert_array_equal(largest_remainder(5, [0.15, 0.35, 0.5]), [1, 2, 2])


def test_group_counts_are_exact_per_step_and_unbiased():
    """Shares (0.5, 0.3, 0.2) of 5 replay rows: each step's counts are floor or ceil of
    5 p_g and sum to 5; over 4000 steps the totals are 20000 p_g within a binomial bound.
    A fixed largest-remainder rounding would give group 0 three rows every step (1.2x)."""
    s = _sampler()
    shares = np.array([0.5, 0.3, 0.2])
    s.pools[2] = ReplayPool(tuple(PoolGroup(span=(lo, lo + 10)) for lo in (0, 10, 20)),
                            shares)
    counts = s.group_counts(2, np.arange(4000))
    assert (counts.sum(1) == 5).all()
    assert ((counts == np.floor(5 * shares)) | (counts == np.ceil(5 * shares))).all()
    total, n = counts.sum(0), 4000 * 5
    bound = 4 * np.sqrt(n * shares * (1 - shares))
    assert (np.abs(total - n * shares) < bound).all(), (total, n * shares)
    # the batches agree with the counts, and group g's rows are its own
    ids, _ = _replayed(s, 2, 200)
    for g, lo in enumerate((0, 10, 20)):
        np.testing.assert_array_equal(((ids >= lo) & (ids < lo + 10)).sum(1), counts[:200, g])


def test_a_group_is_walked_without_replacement_per_epoch():
    """7 rows, 5 replayed per step: after 7 steps (35 draws) every row was drawn 5 times."""
    s = _sampler()
    rows = np.array([3, 9, 17, 25, 31, 44, 60])
    s.pools[2] = ReplayPool.of_rows(rows)
    ids, weights = _replayed(s, 2, 7)
    assert weights is None
    np.testing.assert_array_equal(np.unique(ids, return_counts=True)[1], [5] * 7)
    assert set(ids.ravel()) == set(rows)


def test_an_ordered_group_is_walked_in_its_order():
    s = _sampler()
    rows = np.array([50, 3, 17, 9, 64, 21])
    s.pools[2] = ReplayPool.of_rows(rows, ordered=True)
    ids, _ = _replayed(s, 2, 3)  # 15 draws: the order, cycling
    np.testing.assert_array_equal(ids.ravel(), np.resize(rows, 15))


def test_resampled_buffer_cycles_through_the_group():
    """A buffer of 10 rows re-drawn every 4 steps from 70 rows: each window replays only its
    buffer, and the first 7 windows' buffers are disjoint and cover all 70 rows."""
    s = _sampler()
    s.pools[2] = ReplayPool((PoolGroup(span=(0, 70), resample_every=4, resample_rows=10),))
    ids, _ = _replayed(s, 2, 28)
    buffers = [set(ids[4 * w:4 * w + 4].ravel()) for w in range(7)]
    assert all(len(b) == 10 for b in buffers)  # 20 draws from 10 rows: each twice
    assert set().union(*buffers) == set(range(70))


def test_coreset_weights_become_loss_weights_with_mean_one():
    s = _sampler()
    s.pools[2] = ReplayPool.of_rows([5, 6, 7, 8], weights=[1.0, 3.0, 0.0, 4.0])
    ids, weights = _replayed(s, 2, 4)  # 20 draws: every row 5 times
    want = {5: 0.5, 6: 1.5, 7: 0.0, 8: 2.0}  # w * 4 / 8
    np.testing.assert_allclose(weights, np.vectorize(want.get)(ids))
    idx = s.batch(2, 0)
    assert (idx.weight[~idx.is_replay] == 1).all()


def test_pool_survives_the_checkpoint_arrays():
    s, t = _sampler(), _sampler()
    pool = ReplayPool.combine([ReplayPool.of_rows([1, 5, 9], weights=[1, 2, 3]),
                               ReplayPool((PoolGroup(span=(40, 70), resample_every=3,
                                                     resample_rows=4),))], [0.7, 0.3])
    s.pools[2] = pool
    t.pools[2] = ReplayPool.from_arrays(pool.to_arrays())
    a, b = _replayed(s, 2, 12), _replayed(t, 2, 12)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert ReplayPool.from_arrays(pool.to_arrays()).part(1).groups[0].span == (40, 70)


def _config(policy, buffer_rows=12, **replay):
    c = default_config()
    c.tasks = [{"domain": d, "steps": 10} for d in ("a", "b", "c")]
    c.replay.update(dict(policy=policy, buffer_rows=buffer_rows, rate=0.25))
    for key, value in replay.items():
        c.replay[key].update(value)
    return c


def _boundary(sampler, task, previous=None, **kw):
    return Boundary(task, sampler, [10, 10, 10], previous=previous, **kw)


def test_reservoir_keeps_every_trained_row_with_probability_k_over_n():
    """Algorithm R over two tasks' streams (the second call continues the first): each of
    the 50 items is kept with probability 10/50, within a binomial bound over 3000 seeds."""
    kept = np.zeros(50)
    trials = 3000
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        buf = policies.reservoir_update(np.zeros(0, np.int64), 10, 0, 20, lambda p: p, rng)
        buf = policies.reservoir_update(buf, 10, 20, 30, lambda p: 20 + p, rng)
        assert len(set(buf.tolist())) == 10
        kept[buf] += 1
    p = 10 / 50
    assert np.abs(kept - trials * p).max() < 4.5 * np.sqrt(trials * p * (1 - p)), kept


def test_reservoir_policy_buffers_trained_rows_of_finished_tasks():
    c = _config("reservoir", buffer_rows=12)
    s = _sampler()
    policy = policies.make_policy(c)
    pool1 = policy.pool(_boundary(s, 1))
    trained0 = set(Boundary(1, s, [10] * 3).trained_items(0, np.arange(
        s.new_rows_before(0, 10))).tolist())
    assert len(pool1.groups[0].rows) == 12 and set(pool1.groups[0].rows) <= trained0
    pool2 = policy.pool(_boundary(s, 2, pool1))
    assert len(pool2.groups[0].rows) == 12
    assert (pool2.groups[0].rows < s.starts[2]).all()
    assert pool2.memory_rows() == 12


def test_domain_shares_and_exact_domain_counts():
    """E1: tau = 1 splits by domain size, tau = 0 evenly, recency by lambda ** age; the
    replayed rows of task 2 follow p_d within a binomial bound, and the buffer is split by
    largest remainder."""
    sizes = [40, 30, 50]
    np.testing.assert_allclose(policies.domain_shares(2, sizes, 1.0, 0.0), [4 / 7, 3 / 7])
    np.testing.assert_allclose(policies.domain_shares(2, sizes, 0.0, 0.0), [0.5, 0.5])
    np.testing.assert_allclose(policies.domain_shares(3, sizes, 1.0, 0.5), [1 / 7, 2 / 7, 4 / 7])
    s = _sampler(sizes)
    for tau, buffer_rows in ((1.0, 0), (0.0, 0), (1.0, 14)):
        c = _config("domains", buffer_rows=buffer_rows, domains=dict(tau=tau))
        s.pools[2] = pool = policies.make_policy(c).pool(_boundary(s, 2))
        p = policies.domain_shares(2, sizes, tau, 0.0)
        ids, _ = _replayed(s, 2, 400)
        n = ids.size
        from_0 = (ids < s.starts[1]).sum()
        assert abs(from_0 - n * p[0]) < 4 * np.sqrt(n * p[0] * (1 - p[0])), (tau, from_0)
        if buffer_rows:
            assert [g.size for g in pool.groups] == [8, 6]  # 14 * (4/7, 3/7)
            assert len(np.unique(ids)) == 14


def test_curriculum_orders_the_buffer_by_loss():
    c = _config("curriculum", buffer_rows=10)
    s = _sampler()
    score = lambda ids: -np.asarray(ids, float)  # later rows are easier
    pool = policies.make_policy(c).pool(_boundary(s, 2, score_rows=score))
    rows = pool.groups[0].rows
    assert pool.groups[0].ordered and len(rows) == 10
    np.testing.assert_array_equal(rows, np.sort(rows)[::-1])  # easy (low loss) first
    c.replay.curriculum.order = "hard_first"
    rows = policies.make_policy(c).pool(_boundary(s, 2, score_rows=score)).groups[0].rows
    np.testing.assert_array_equal(rows, np.sort(rows))


def _clustered_features(ids, init=None):
    """Four tight clusters by id mod 4, of sizes set by the ids present."""
    del init
    centers = np.eye(4, 8) * 10.0
    ids = np.asarray(ids)
    jitter = np.sin(ids[:, None] * np.arange(1, 9)) * 0.01
    return centers[ids % 4] + jitter


@pytest.mark.parametrize("policy", ["craig", "grad_match"])
def test_coreset_policy_picks_one_row_per_cluster(policy):
    """Task 0's 40 rows form 4 equal clusters: a coreset of 4 takes one row of each, with
    equal weights (craig: 10 rows covered each; grad_match: matching the summed gradient
    needs weight ~10 on each); at the next boundary the buffer of 4 is split 2 + 2 and
    task 0's coreset shrinks to its first 2 picks."""
    c = _config(policy, buffer_rows=4, coreset=dict(candidates=64))
    s = _sampler()
    p = policies.make_policy(c)
    pool1 = p.pool(_boundary(s, 1, feature_rows=_clustered_features))
    g = pool1.groups[0]
    assert sorted(g.rows % 4) == [0, 1, 2, 3]
    np.testing.assert_allclose(g.weights, 10.0, rtol=0.02)
    pool2 = p.pool(_boundary(s, 2, pool1, feature_rows=_clustered_features))
    np.testing.assert_array_equal(pool2.groups[0].rows, g.rows[:2])
    assert [x.size for x in pool2.groups] == [2, 2]
    assert (pool2.groups[1].rows >= s.starts[1]).all()


def test_hybrid_splits_buffer_and_replay_between_its_policies():
    c = _config("hybrid", buffer_rows=10,
                hybrid=dict(policies=["reservoir", "domains"], shares=[0.6, 0.4]))
    s = _sampler()
    pool = policies.make_policy(c).pool(_boundary(s, 2))
    assert pool.part(0).memory_rows() == 6 and pool.part(1).memory_rows() == 4
    s.pools[2] = pool
    counts = s.group_counts(2, np.arange(2000)).sum(0)
    np.testing.assert_allclose(counts[0] / counts.sum(), 0.6, atol=0.01)


@pytest.mark.parametrize("edit, message", [
    (dict(policy="uniform", buffer_rows=8), "no effect"),
    (dict(policy="reservoir", buffer_rows=0), "buffer_rows"),
    (dict(policy="reservoir", buffer_rows=1), "at least one per earlier domain"),
    (dict(policy="hybrid", buffer_rows=8, hybrid=dict(policies=["craig"], shares=[1.0])),
     "replay.hybrid"),
    (dict(policy="curriculum", buffer_rows=8, curriculum=dict(order="sideways")), "order"),
])
def test_bad_policy_settings_are_refused(edit, message):
    c = _config("uniform", buffer_rows=0)
    for key, value in edit.items():
        if isinstance(value, dict):
            c.replay[key].update(value)
        else:
            c.replay[key] = value
    with pytest.raises(ValueError, match=message):
        policies.check(c)


def test_der_with_a_policy_that_replays_outside_its_buffer_is_refused():
    """DER's own check (``methods.der``), run with the selected methods' checks."""
    from cpt_jax import methods

    c = _config("resample", buffer_rows=8)
    c.model.vocab_size = 256
    c.method.name = "replay+der"
    c.method.der.weight = 0.5
    with pytest.raises(ValueError, match="DER with replay.policy='resample'"):
        methods.check(c)
    c.replay.update(dict(policy="reservoir"))  # a bounded buffer: DER keeps its logits
    methods.check(c)


def test_row_weights_scale_each_rows_loss_and_token_count():
    """A batch with ``row_weight`` [B]: the loss sum is sum_r w_r * (row r's loss sum) and
    the token count sum_r w_r n_r, from per-row losses computed without weights."""
    import jax
    from cpt_jax import model as model_lib
    from cpt_jax.core.losses import ce_loss_sum, token_losses

    mcfg = model_lib.LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2,
                                 n_kv_heads=1, d_ff=32, max_seq_len=16)
    params = model_lib.init_params(mcfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 32, (3, 9)).astype(np.int32)
    segs = np.ones((3, 9), np.int32)
    segs[2, 5:] = 0  # a padded row: fewer tokens
    losses, mask, _ = token_losses(mcfg, params, {"tokens": tokens, "segment_ids": segs})
    per_row, n_row = np.asarray((losses * mask).sum(1)), np.asarray(mask.sum(1))
    w = np.array([0.5, 0.0, 2.5], np.float32)
    total, aux = ce_loss_sum(mcfg, params, {"tokens": tokens, "segment_ids": segs,
                                            "row_weight": w})
    np.testing.assert_allclose(float(total), (w * per_row).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["tokens"]), (w * n_row).sum(), rtol=1e-6)
