"""Which rows make the global batch of step t: a pure function of (seed, task, step, pool).

During task k each global batch of ``B`` rows holds ``n_replay`` rows replayed from the
task's replay pool (``cpt_jax.replay.buffer``; by default every training row of tasks < k,
the replay buffer of Abbes et al. 2025) and ``B - n_replay`` new rows of task k; how many
is ``cpt_jax.replay.rates``.

Both streams walk without-replacement permutations (``cpt_jax.replay.permutation``): the
new rows of task k in epoch e are ``perm(seed, "new", k, e)`` of ``[0, N_k)``, so every row
is seen exactly once per epoch before any repeats; replay walks ``perm(seed, "replay", k,
e)`` of the pool the same way (a weighted pool is drawn with replacement, from a generator
seeded by (seed, task, step)). Step t's rows are computed directly (position in the stream
= rows consumed by steps < t) rather than by replaying earlier steps.

Order within the batch: replay rows sit at evenly spread positions
``floor((j + 1/2) * B / n_replay)``, new rows fill the rest. Any contiguous slice of the
batch (a data-parallel shard, a gradient-accumulation micro-batch) therefore gets its
proportional share of replay rows, +-1, which a random shuffle would not guarantee and
"replay first" would violate entirely; the rows within each stream are already random.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from cpt_jax.replay.buffer import ReplayPool
from cpt_jax.replay.permutation import permuted_stream
from cpt_jax.replay.rates import Rate, ReplayCounts


@dataclasses.dataclass(frozen=True)
class BatchIndex:
    """Where the rows of one global batch come from (all arrays have shape [B]).

    ``domain``: index of the task whose training rows are read; ``row``: row index within
    that domain's train split; ``is_replay``: True for rows replayed from earlier tasks.
    """

    domain: np.ndarray  # [B] int32
    row: np.ndarray  # [B] int64
    is_replay: np.ndarray  # [B] bool

    def __len__(self) -> int:
        return int(self.row.shape[0])

    def shard_range(self, lo: int, hi: int) -> "BatchIndex":
        """Rows [lo, hi) of the batch (a process's share)."""
        return BatchIndex(self.domain[lo:hi], self.row[lo:hi], self.is_replay[lo:hi])


def replay_positions(batch: int, n_replay: int) -> np.ndarray:
    """Rows of a batch that hold replay: evenly spread, floor((2j + 1) * B / (2 n)).

    A function of (B, n) alone, so the train step can split a batch into its replay and
    current rows statically, and every contiguous data-parallel shard gets its share.
    """
    return (2 * np.arange(n_replay, dtype=np.int64) + 1) * batch // (2 * max(n_replay, 1))


class ReplaySampler:
    """Computes the global batch of any (task, step) directly; holds no iteration state.

    Args:
      train_rows: number of training rows of each task's domain, in task order.
      global_batch: rows per global batch (B).
      rate, accounting: the replay counts (``cpt_jax.replay.rates.ReplayCounts``).
      seed: the data order seed.
      names: optional task names, used in error messages.

    ``pools[k]``: task k's replay pool (None, the default: every row of tasks < k).
    """

    def __init__(self, train_rows: Sequence[int], global_batch: int, rate: Rate = 0.0,
                 accounting: str = "additive", seed: int = 0,
                 names: Sequence[str] | None = None):
        if len(train_rows) == 0:
            raise ValueError("ReplaySampler needs at least one task (train_rows is empty).")
        self.counts = ReplayCounts(len(train_rows), global_batch, rate, accounting, names)
        for k, n in enumerate(train_rows):
            if int(n) < 1:
                raise ValueError(f"The domain of {self.counts._labels[k]} has {n} training "
                                 "rows; it needs at least one (give it more text or lower "
                                 "val_fraction).")
        self.train_rows = [int(n) for n in train_rows]
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.starts = np.concatenate([[0], np.cumsum(self.train_rows)]).astype(np.int64)
        self.pools: dict[int, ReplayPool | None] = {}

    @property
    def num_tasks(self) -> int:
        return len(self.train_rows)

    def n_replay(self, task: int, step: int) -> int:
        return self.counts.n_replay(task, step)

    def replay_rows_before(self, task: int, step: int) -> int:
        return self.counts.replay_rows_before(task, step)

    def new_rows_before(self, task: int, step: int) -> int:
        return self.counts.new_rows_before(task, step)

    def steps_in_task(self, task: int, **budget) -> int:
        return self.counts.steps_in_task(task, **budget)

    def _replay_rows(self, task: int, step: int, n_rep: int) -> np.ndarray:
        """Global ids of the n_rep replay rows of (task, step)."""
        pool = self.pools.get(task)
        first = self.replay_rows_before(task, step)
        if pool is None:  # every row of tasks < task
            return permuted_stream(self.seed, "replay", task, first, n_rep,
                                   int(self.starts[task]))
        if pool.weights is None:
            pick = permuted_stream(self.seed, "replay", task, first, n_rep, len(pool.rows))
        else:
            rng = np.random.default_rng([self.seed, task, step, 0x5EED])
            pick = rng.choice(len(pool.rows), size=n_rep, p=pool.weights / pool.weights.sum())
        return pool.rows[pick]

    def batch(self, task: int, step: int) -> BatchIndex:
        """The rows of the global batch of (task, step); see the module docstring."""
        self.counts._check(task, step)
        task, step, size = int(task), int(step), self.global_batch
        n_rep = self.n_replay(task, step)
        n_new = size - n_rep
        domain = np.full(size, task, np.int32)
        row = np.empty(size, np.int64)
        is_replay = np.zeros(size, bool)
        if n_rep:
            flat = self._replay_rows(task, step, n_rep)
            owner = np.searchsorted(self.starts, flat, side="right") - 1
            pos = replay_positions(size, n_rep)
            is_replay[pos] = True
            domain[pos] = owner
            row[pos] = flat - self.starts[owner]
        if n_new:
            row[~is_replay] = permuted_stream(self.seed, "new", task,
                                              self.new_rows_before(task, step), n_new,
                                              self.train_rows[task])
        return BatchIndex(domain, row, is_replay)
