"""Replay policies: which earlier rows a task may replay, and in what proportions.

Each policy turns the finished domains into task k's ``ReplayPool`` (``cpt_jax.replay.
buffer``) at the start of task k >= 1 (and of task 0 when ``replay.sources`` lists
domains replayable from the start, which every policy treats as earlier domains), from what it is given in a ``Boundary``: the
sampler (row counts, seed, the stream of rows each task trained on), the previous task's
pool and, for the policies that need the model, ``score_rows`` (mean token loss under the
current weights) and ``feature_rows`` (projected last-layer gradient features,
``cpt_jax.replay.features``). Every choice is keyed by the run's seed, so a pool is a pure
function of the run so far; the pool is checkpointed with the run.

``replay.buffer_rows`` (K) bounds the rows a policy keeps in memory; the bounded policies
split it over the finished domains.

- ``uniform``: every row of every earlier task (Abbes et al. 2025); no buffer.
- ``reservoir``: a buffer of at most K rows filled by reservoir sampling (Vitter 1985,
  Algorithm R) over the stream of rows in the order they were trained on: after n rows
  every trained row is in the buffer with probability K / n.
- ``domains`` (E1): step t's replay rows split across earlier domains d by
  ``p_d ~ n_d ** tau`` (tau = 1: by size; tau = 0: uniform over domains) or, with
  ``recency`` lambda > 0, ``p_d ~ lambda ** (k - 1 - d)``, with exact integer counts
  per step (``cpt_jax.replay.sampler``). With K > 0 each domain keeps
  ``largest_remainder(K, p)_d`` rows, a uniform sample; with K = 0 whole domains.
- ``resample`` (E2): a buffer of K rows re-drawn every ``every`` steps from all earlier
  rows, without replacement across windows until every row was drawn: a small memory
  that cycles through the old data.
- ``curriculum`` (E3): a size-proportional buffer of K rows, replayed in order of their
  loss under the model at the task boundary: ``easy_first`` or ``hard_first``.
- ``craig`` / ``grad_match``: at each boundary the finished task's K / k share of the
  buffer is a gradient coreset (``cpt_jax.replay.coresets``) of ``candidates`` rows drawn
  from it, selected on their projected last-layer gradient features (taken at the current
  weights and, with ``random_inits`` > 0, at that many random initialisations too, so the
  subset is good beyond one point: Balles et al. 2022); replayed rows are weighted in the
  loss by their coreset weights. Earlier domains' coresets shrink to their greedy prefix.
- ``hybrid`` (E4): a weighted mix of other policies' pools (e.g. 50% ``craig``, 50%
  ``reservoir``): each gets its share of the buffer and of every step's replay rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from cpt_jax.replay import coresets
from cpt_jax.replay.features import trajectory_features
from cpt_jax.replay.buffer import (Boundary, PoolGroup, ReplayPolicy, ReplayPool,
                                   largest_remainder)
from cpt_jax.replay.permutation import draw_rows

class UniformPolicy(ReplayPolicy):
    """Every row of every earlier task, uniformly (Abbes et al. 2025): stores nothing."""

    name, bounded = "uniform", False

    def pool(self, b):
        return None


def reservoir_update(buffer: np.ndarray, capacity: int, seen: int, count: int,
                     items: Callable[[np.ndarray], np.ndarray], rng,
                     chunk: int = 1 << 20) -> np.ndarray:
    """Algorithm R over ``count`` more stream items after ``seen``: item number c
    (1-based over the whole stream) fills slot c - 1 while c <= capacity, and afterwards
    replaces a uniform slot with probability capacity / c. ``items(positions)`` gives the
    items at stream positions (0-based within this call); only the accepted ones are read.
    Returns the buffer [min(capacity, seen + count)] in slot order."""
    out = np.empty(min(capacity, seen + count), np.int64)
    out[:len(buffer)] = buffer
    for lo in range(0, count, chunk):
        pos = np.arange(lo, min(lo + chunk, count), dtype=np.int64)
        c = seen + pos + 1
        accept = rng.random(pos.size) * c < capacity  # always while c <= capacity
        slot = np.where(c <= capacity, c - 1, rng.integers(0, capacity, pos.size))
        pos, slot = pos[accept], slot[accept]
        # the last item written to a slot is the one it keeps
        last = pos.size - 1 - np.unique(slot[::-1], return_index=True)[1]
        out[slot[last]] = items(pos[last])
    return out


class ReservoirPolicy(ReplayPolicy):
    name = "reservoir"

    def pool(self, b):
        rows = b.previous.groups[0].rows if b.previous is not None else np.zeros(0, np.int64)
        for j in b.finished:  # the domains just finished: their rows enter the stream
            seen = sum(b.trained_count(i) for i in range(j))
            rng = np.random.default_rng([self.seed, j, 0x5E5E])
            rows = reservoir_update(rows, self.buffer_rows, seen, b.trained_count(j),
                                    lambda pos, j=j: b.trained_items(j, pos), rng)
        return ReplayPool.of_rows(rows)


def domain_shares(task: int, sizes: Sequence[int], tau: float, recency: float) -> np.ndarray:
    """p_d over the domains d < task: ``sizes[d] ** tau``, or ``recency ** (task - 1 - d)``
    when recency > 0; normalised."""
    d = np.arange(task)
    p = (recency ** (task - 1.0 - d) if recency > 0
         else np.asarray(sizes[:task], np.float64) ** tau)
    return p / p.sum()


def domain_sample(seed: int, b: Boundary, quotas: Sequence[int]) -> list[np.ndarray]:
    """Per domain d, ``quotas[d]`` global ids drawn uniformly without replacement (a prefix
    of a fixed permutation of the domain, so a smaller quota keeps a subset)."""
    return [b.starts[d] + draw_rows(seed, "buffer", d, q, b.domain_rows(d))
            for d, q in enumerate(quotas)]


class DomainsPolicy(ReplayPolicy):
    name, bounded = "domains", False

    def pool(self, b):
        c = self.config.replay.domains
        p = domain_shares(b.earlier, b.sampler.train_rows, c.tau, c.recency)
        if not self.buffer_rows:
            groups = [PoolGroup(span=(b.starts[d], b.starts[d + 1])) for d in range(b.earlier)]
            return ReplayPool(tuple(groups), p)
        quotas = largest_remainder(self.buffer_rows, p)
        keep = np.flatnonzero(quotas)
        rows = domain_sample(self.seed, b, quotas)
        return ReplayPool(tuple(PoolGroup(rows=rows[d]) for d in keep), p[keep])


class ResamplePolicy(ReplayPolicy):
    name = "resample"

    def pool(self, b):
        return ReplayPool((PoolGroup(span=(0, b.starts[b.earlier]),
                                     resample_every=self.config.replay.resample.every,
                                     resample_rows=self.buffer_rows),))


class CurriculumPolicy(ReplayPolicy):
    name = "curriculum"

    def pool(self, b):
        sizes = np.asarray(b.sampler.train_rows[:b.earlier], np.float64)
        rows = np.concatenate(domain_sample(self.seed, b,
                                            largest_remainder(self.buffer_rows, sizes)))
        loss = b.score_rows(rows)
        order = np.argsort(loss if self.config.replay.curriculum.order == "easy_first"
                           else -loss, kind="stable")
        return ReplayPool.of_rows(rows[order], ordered=True)


class CoresetPolicy(ReplayPolicy):
    """``craig`` or ``grad_match`` (see the module docstring)."""

    select = None

    def pool(self, b):
        c = self.config.replay.coreset
        quotas = largest_remainder(self.buffer_rows, np.ones(b.earlier))
        previous = [] if b.previous is None else b.previous.groups
        groups = [dataclasses.replace(g, rows=g.rows[:q], weights=g.weights[:q])
                  for g, q in zip(previous, quotas) if q]  # greedy prefixes
        for j in b.finished:
            cand = b.starts[j] + draw_rows(self.seed, "candidates", j, c.candidates,
                                           b.domain_rows(j))
            k = min(int(quotas[j]), cand.size)
            if k:
                features = [b.feature_rows(cand)] + [b.feature_rows(cand, init=i)
                                                     for i in range(c.random_inits)]
                picked, weights = type(self).select(trajectory_features(features), k)
                picked, weights = np.asarray(picked), np.asarray(weights, np.float64)
                keep = weights > 0  # a row of weight 0 would be replayed for nothing
                groups.append(PoolGroup(rows=cand[picked[keep]], weights=weights[keep]))
        return ReplayPool(tuple(groups), [g.size for g in groups])


class CraigPolicy(CoresetPolicy):
    name, select = "craig", staticmethod(coresets.craig)


class GradMatchPolicy(CoresetPolicy):
    name, select = "grad_match", staticmethod(coresets.grad_match)


class HybridPolicy(ReplayPolicy):
    name = "hybrid"

    def __init__(self, config, buffer_rows=None):
        super().__init__(config, buffer_rows)
        h = config.replay.hybrid
        self.shares = np.asarray(h.shares, np.float64)
        quotas = largest_remainder(self.buffer_rows, self.shares)
        self.parts = [POLICIES[name](config, int(q)) for name, q in zip(h.policies, quotas)]

    def pool(self, b):
        pools = []
        for i, policy in enumerate(self.parts):
            sub = dataclasses.replace(b, previous=None if b.previous is None
                                      else b.previous.part(i))
            pool = policy.pool(sub)
            pools.append(pool if pool is not None else
                         ReplayPool((PoolGroup(span=(0, b.starts[b.earlier])),)))
        return ReplayPool.combine(pools, self.shares)


POLICIES: dict[str, type[ReplayPolicy]] = {
    p.name: p for p in (UniformPolicy, ReservoirPolicy, DomainsPolicy, ResamplePolicy,
                        CurriculumPolicy, CraigPolicy, GradMatchPolicy, HybridPolicy)}
NEEDS_FEATURES = ("craig", "grad_match")


def make_policy(config) -> ReplayPolicy:
    """The policy named by ``config.replay.policy`` (checked by ``check``)."""
    return POLICIES[config.replay.policy](config)


def policy_names(config) -> list[str]:
    """The run's policy and, for a hybrid, its parts."""
    r = config.replay
    return [r.policy] + (list(r.hybrid.policies) if r.policy == "hybrid" else [])


def _earlier_domains(config) -> int:
    """Domains before the last task: replay sources and every earlier task's components."""
    tasks = list(config.tasks)[:-1]
    return len(config.replay.get("sources") or []) + sum(
        len(dict(t).get("domains") or [None]) for t in tasks)


def check(config) -> None:
    """Refuse replay-policy settings that cannot run or would be ignored, naming the fix."""
    r = config.replay

    def need(ok, message):
        if not ok:
            raise ValueError(message)

    need(r.policy in POLICIES, f"replay.policy={r.policy!r}: use one of {sorted(POLICIES)}")
    need(isinstance(r.buffer_rows, int) and r.buffer_rows >= 0,
         f"replay.buffer_rows={r.buffer_rows!r} must be an integer >= 0")
    policy = POLICIES[r.policy]
    if policy.bounded:
        earlier = max(_earlier_domains(config), 1)
        need(r.buffer_rows >= earlier, f"replay.policy={r.policy!r} keeps a buffer: set "
             f"replay.buffer_rows to its size in rows, at least one per earlier domain "
             f"(>= {earlier})")
    elif r.policy == "uniform":
        need(r.buffer_rows == 0, f"replay.buffer_rows={r.buffer_rows} has no effect with "
             "replay.policy='uniform' (every earlier row); choose a bounded policy, e.g. "
             "replay.policy=reservoir")
    d = r.domains
    need(d.tau >= 0 and 0 <= d.recency <= 1,
         f"replay.domains: tau={d.tau} must be >= 0 and recency={d.recency} in [0, 1]")
    need(r.resample.every >= 1, f"replay.resample.every={r.resample.every} must be >= 1")
    need(r.curriculum.order in ("easy_first", "hard_first"),
         f"replay.curriculum.order={r.curriculum.order!r}: use 'easy_first' or 'hard_first'")
    cs = r.coreset
    need(cs.candidates >= 1 and cs.feature_dim >= 1 and cs.random_inits >= 0,
         f"replay.coreset: candidates={cs.candidates} and feature_dim={cs.feature_dim} must "
         f"be >= 1, random_inits={cs.random_inits} >= 0")
    if r.policy == "hybrid":
        h = r.hybrid
        bad = [p for p in h.policies if p not in POLICIES or p == "hybrid"]
        need(len(h.policies) >= 2 and not bad and len(h.shares) == len(h.policies)
             and min(h.shares) > 0,
             f"replay.hybrid: policies={list(h.policies)} must name >= 2 policies other than "
             f"hybrid (from {sorted(set(POLICIES) - {'hybrid'})}) and shares={list(h.shares)}"
             " one positive number each")
