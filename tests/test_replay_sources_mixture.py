"""Weighted mixture tasks and replay sources in the sampler and every replay policy.

Slots (``cpt_jax.data.recipe``): 0 = replay source "src", 1 = task 0's domain "a", 2 and
3 = task 1's mixture {"b1": 0.7, "b2": 0.3}."""

import numpy as np
import pytest

from cpt_jax.data.recipe import Recipe
from cpt_jax.replay import policies
from cpt_jax.replay.buffer import Boundary
from cpt_jax.replay.sampler import ReplaySampler
from cpt_jax.run_config import default_config

ROWS = [30, 40, 50, 20]
SLOTS = [{1: 1.0}, {2: 0.7, 3: 0.3}]
STEPS = [10, 10]


def _sampler(rate=0.25, batch=20):
    return ReplaySampler(ROWS, batch, rate, seed=3, task_slots=SLOTS)


def test_recipe_gives_the_slots():
    r = Recipe.build([{"domain": "a", "steps": 1},
                      {"domains": {"b1": 7, "b2": 3}, "steps": 1}],
                     ["a", "held", "b1", "b2", "src"], ["src"])
    assert r.slots == ("src", "a", "b1", "b2")
    assert r.task_slots == [{1: 1.0}, {2: 0.7, 3: 0.3}]
    assert r.heldout == ("held",) and r.task_names == ("a", "b1+b2")


def test_mixture_counts_are_exact_per_step_and_match_the_weights():
    """15 new rows per step split 0.7 / 0.3: each step floor or ceil of 15 w and exactly
    15 in sum; over 3000 steps the totals are within a binomial bound of 45000 w."""
    s = _sampler()
    w = np.array([0.7, 0.3])
    counts = s.new_counts(1, np.arange(3000))
    assert (counts.sum(1) == 15).all()
    assert ((counts == np.floor(15 * w)) | (counts == np.ceil(15 * w))).all()
    n = 3000 * 15
    assert (np.abs(counts.sum(0) - n * w) < 4 * np.sqrt(n * w * (1 - w))).all()
    seen = {2: [], 3: []}
    for t in range(40):
        idx = s.batch(1, t)
        new = ~idx.is_replay
        for c, slot in enumerate((2, 3)):
            assert (idx.domain[new] == slot).sum() == counts[t, c]
            seen[slot].extend(idx.row[new & (idx.domain == slot)])
        assert not (idx.domain[new] == 0).any() and not (idx.domain[new] == 1).any()
    # each component walks its own rows without replacement per epoch
    assert sorted(seen[3][:20]) == list(range(20))
    assert sorted(seen[2][:50]) == list(range(50))
    # stateless in (seed, task, step): a fresh sampler gives the same batch
    fresh = _sampler().batch(1, 37)
    again = s.batch(1, 37)
    np.testing.assert_array_equal(fresh.row, again.row)
    np.testing.assert_array_equal(fresh.domain, again.domain)
    assert s.new_rows_before_by_slot(1, 3000).tolist() == counts.sum(0).tolist()


def test_a_one_task_run_with_a_source_replays_it():
    s = ReplaySampler([30, 40], 20, 0.25, seed=0, task_slots=[{1: 1.0}])
    idx = s.batch(0, 0)
    assert idx.is_replay.sum() == 5 and (idx.domain[idx.is_replay] == 0).all()
    assert (idx.domain[~idx.is_replay] == 1).all()
    assert s.steps_in_task(0, budget_steps=15) == 20  # additive: 15 x 20 new rows / 15


def _clustered(ids, init=None):
    del init
    ids = np.asarray(ids)
    return np.eye(4, 8)[ids % 4] * 10.0 + np.sin(ids[:, None] * np.arange(1, 9)) * 0.01


@pytest.mark.parametrize("policy", sorted(policies.POLICIES))
def test_every_policy_replays_the_source_from_task_0_and_never_trains_it(policy):
    c = default_config()
    c.data.domains = [{"name": n, "kind": "demo", "demo": "python_docs"}
                      for n in ("src", "a", "b1", "b2")]
    c.tasks = [{"domain": "a", "steps": 10}, {"domains": {"b1": 0.7, "b2": 0.3}, "steps": 10}]
    c.replay.update(dict(policy=policy, rate=0.25, sources=["src"],
                         buffer_rows=0 if policy in ("uniform", "domains") else 12))
    c.replay.coreset.candidates = 16
    policies.check(c)
    s, p = _sampler(), policies.make_policy(c)
    replayed = {0: set(), 1: set()}
    for k in (0, 1):
        s.pools[k] = p.pool(Boundary(k, s, STEPS, previous=s.pools.get(k - 1),
                                     score_rows=lambda ids: (np.asarray(ids) % 7) * 1.0,
                                     feature_rows=_clustered))
        for t in range(STEPS[k]):
            idx = s.batch(k, t)
            assert idx.is_replay.sum() == 5
            assert not (idx.domain[~idx.is_replay] == 0).any()  # the source is never new
            replayed[k].update(idx.domain[idx.is_replay].tolist())
    assert replayed[0] == {0}  # task 0 replays only the source
    assert 0 in replayed[1] and replayed[1] <= {0, 1}  # then the source and task 0's domain
