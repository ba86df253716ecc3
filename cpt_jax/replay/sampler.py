"""Which rows make the global batch of step t: a pure function of (seed, task, step, pool).

During task k each global batch of ``B`` rows holds ``n_replay`` rows replayed from the
task's replay pool (``cpt_jax.replay.buffer``; by default every training row of tasks < k,
the replay buffer of Abbes et al. 2025) and ``B - n_replay`` new rows of task k; how many
is ``cpt_jax.replay.rates``.

Both streams walk without-replacement permutations (``cpt_jax.replay.permutation``): the
new rows of task k in epoch e are ``perm(seed, "new", k, e)`` of ``[0, N_k)``, so every row
is seen exactly once per epoch before any repeats. Replay walks each group of the task's
pool the same way (or as the group says: in order, or through a resampled buffer; see
``cpt_jax.replay.buffer``). A pool of several groups splits every step's ``n`` replay rows
by their shares p_g with exact integer counts: systematic rounding, ``c_g = floor(n P_g +
u) - floor(n P_{g-1} + u)`` with ``P`` the cumulative shares and ``u`` uniform, keyed by
(seed, task, step); each count is floor or ceil of ``n p_g``, they sum to ``n``, and
their mean is exactly ``n p_g`` (a fixed largest-remainder rounding would give the same
group every leftover row). Step t's rows are computed directly (position in each stream
= rows the group gave to steps < t; a per-task table of those counts is cached) rather
than by replaying earlier steps.

Slots, mixtures and replay sources (``cpt_jax.data.recipe``): the sampler reads *slots*,
the training-row sets of the run in order (replay sources first, then each task's
components). Task k's new rows come from its slots ``task_slots[k]`` ({slot: weight});
a mixture splits each step's new rows over its components with the same systematic
rounding, keyed by (seed, task, step), and each component walks its own permutation
stream. Task k's default pool is every row of the slots before its first one, so replay
sources are replayable from task 0 on. With one slot per task and no sources, slot k is
task k and every batch is what it was before slots existed.

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

from cpt_jax.replay.buffer import PoolGroup, ReplayPool
from cpt_jax.replay.permutation import feistel_permute, permuted_stream, round_keys, stream_items
from cpt_jax.replay.rates import Rate, ReplayCounts


@dataclasses.dataclass(frozen=True)
class BatchIndex:
    """Where the rows of one global batch come from (all arrays have shape [B]).

    ``domain``: index of the task whose training rows are read; ``row``: row index within
    that domain's train split; ``is_replay``: True for rows replayed from earlier tasks;
    ``weight``: the rows' loss weights (1 for new rows), or None when the pool has none.
    """

    domain: np.ndarray  # [B] int32
    row: np.ndarray  # [B] int64
    is_replay: np.ndarray  # [B] bool
    weight: np.ndarray | None = None  # [B] float32

    def __len__(self) -> int:
        return int(self.row.shape[0])

    def shard_range(self, lo: int, hi: int) -> "BatchIndex":
        """Rows [lo, hi) of the batch (a process's share)."""
        return BatchIndex(self.domain[lo:hi], self.row[lo:hi], self.is_replay[lo:hi],
                          None if self.weight is None else self.weight[lo:hi])


def replay_positions(batch: int, n_replay: int) -> np.ndarray:
    """Rows of a batch that hold replay: evenly spread, floor((2j + 1) * B / (2 n)).

    A function of (B, n) alone, so the train step can split a batch into its replay and
    current rows statically, and every contiguous data-parallel shard gets its share.
    """
    return (2 * np.arange(n_replay, dtype=np.int64) + 1) * batch // (2 * max(n_replay, 1))


class ReplaySampler:
    """Computes the global batch of any (task, step) directly; holds no iteration state.

    Args:
      train_rows: number of training rows of each slot (by default: of each task's domain,
        in task order).
      global_batch: rows per global batch (B).
      rate, accounting: the replay counts (``cpt_jax.replay.rates.ReplayCounts``).
      seed: the data order seed.
      names: optional task names, used in error messages.
      task_slots: per task {slot: weight} (weights summing to 1); default slot k for task
        k. Slots before a task's first one are its replayable history.
      slot_names: optional slot names, used in error messages.

    ``pools[k]``: task k's replay pool (None, the default: every row of the slots before
    task k's first slot).
    """

    def __init__(self, train_rows: Sequence[int], global_batch: int, rate: Rate = 0.0,
                 accounting: str = "additive", seed: int = 0,
                 names: Sequence[str] | None = None,
                 task_slots: Sequence[dict] | None = None,
                 slot_names: Sequence[str] | None = None):
        if len(train_rows) == 0:
            raise ValueError("ReplaySampler needs at least one task (train_rows is empty).")
        one_per_task = task_slots is None
        if one_per_task:
            task_slots = [{k: 1.0} for k in range(len(train_rows))]
        self.task_slots = [(np.asarray(list(t), np.int64),
                            np.asarray(list(t.values()), np.float64)) for t in task_slots]
        self.first_slot = [int(slots.min()) for slots, _ in self.task_slots]
        self.counts = ReplayCounts(len(task_slots), global_batch, rate, accounting, names,
                                   history=[f > 0 for f in self.first_slot])
        labels = ([f"The domain of {label}" for label in self.counts._labels]
                  if one_per_task else [f"Domain {n!r}" for n in slot_names] if slot_names
                  else [f"Slot {k}" for k in range(len(train_rows))])
        for k, n in enumerate(train_rows):
            if int(n) < 1:
                raise ValueError(f"{labels[k]} has {n} training rows; it needs at least one "
                                 "(give it more text or lower val_fraction).")
        self.train_rows = [int(n) for n in train_rows]
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.starts = np.concatenate([[0], np.cumsum(self.train_rows)]).astype(np.int64)
        self.pools: dict[int, ReplayPool | None] = {}
        self._group_table: dict[int, tuple[ReplayPool, np.ndarray]] = {}
        self._new_table: dict[int, np.ndarray] = {}

    @property
    def num_tasks(self) -> int:
        return len(self.task_slots)

    def slot_owner(self, slot: int) -> tuple[int, int] | None:
        """(task, component) that trains ``slot``, or None for a replay source."""
        for k, (slots, _) in enumerate(self.task_slots):
            hit = np.flatnonzero(slots == slot)
            if hit.size:
                return k, int(hit[0])
        return None

    def slot_trained_count(self, slot: int, steps: Sequence[int]) -> int:
        """Rows of ``slot`` trained on by the end of its task (``steps``: every task's
        steps); a replay source counts as trained once through before task 0."""
        owner = self.slot_owner(slot)
        if owner is None:
            return self.train_rows[slot]
        k, c = owner
        return int(self.new_rows_before_by_slot(k, steps[k])[c])

    def slot_trained_items(self, slot: int, positions) -> np.ndarray:
        """Global ids of ``slot``'s rows at positions of the stream it was trained in (a
        replay source: one permutation of its rows)."""
        owner = self.slot_owner(slot)
        if owner is None:
            return self.starts[slot] + stream_items(self.seed, "source", slot, positions,
                                                    self.train_rows[slot])
        k, c = owner
        return self.starts[slot] + stream_items(self.seed, _new_stream(c), k, positions,
                                                self.train_rows[slot])

    def new_counts(self, task: int, steps) -> np.ndarray:
        """[len(steps), C] new rows each component of the task gives each step: systematic
        rounding of n_new * weights keyed by (seed, task, step), exact in sum."""
        steps = np.asarray(steps, np.int64).reshape(-1)
        n = np.asarray([self.global_batch - self.n_replay(task, int(t)) for t in steps],
                       np.int64)
        return _systematic(n, self.task_slots[task][1], self.seed, "mixture", task, steps)

    def new_rows_before_by_slot(self, task: int, step: int) -> np.ndarray:
        """[C] new rows each component of the task gave to steps < ``step`` (cached)."""
        if len(self.task_slots[task][0]) == 1:
            return np.asarray([self.new_rows_before(task, step)], np.int64)
        table = self._new_table.get(task)
        if table is None:
            table = np.zeros((1, len(self.task_slots[task][0])), np.int64)
        if step >= len(table):
            have, want = len(table) - 1, max(step, 2 * len(table), 1024)
            more = np.cumsum(self.new_counts(task, np.arange(have, want)), axis=0)
            table = np.concatenate([table, table[-1] + more])
            self._new_table[task] = table
        return table[step]

    def n_replay(self, task: int, step: int) -> int:
        return self.counts.n_replay(task, step)

    def replay_rows_before(self, task: int, step: int) -> int:
        return self.counts.replay_rows_before(task, step)

    def new_rows_before(self, task: int, step: int) -> int:
        return self.counts.new_rows_before(task, step)

    def steps_in_task(self, task: int, **budget) -> int:
        return self.counts.steps_in_task(task, **budget)

    def pool(self, task: int) -> ReplayPool:
        """Task ``task``'s pool; None in ``pools`` is every row of the slots before the
        task's first slot."""
        pool = self.pools.get(task)
        if pool is None:
            return ReplayPool((PoolGroup(span=(0, int(self.starts[self.first_slot[task]]))),))
        return pool

    def group_counts(self, task: int, steps) -> np.ndarray:
        """[len(steps), G] replay rows each group of the pool gives each step (systematic
        rounding of n_replay * shares, keyed by (seed, task, step); see the module)."""
        pool = self.pool(task)
        steps = np.asarray(steps, np.int64).reshape(-1)
        n = np.asarray([self.n_replay(task, int(t)) for t in steps], np.int64)
        if len(pool.groups) == 1:
            return n[:, None]
        return _systematic(n, pool.shares, self.seed, "shares", task, steps)

    def group_rows_before(self, task: int, step: int) -> np.ndarray:
        """[G] replay rows each group gave to steps < ``step`` of the task (cached)."""
        pool = self.pool(task)
        if len(pool.groups) == 1:
            return np.asarray([self.replay_rows_before(task, step)], np.int64)
        cached = self._group_table.get(task)
        if cached is None or cached[0] is not pool:
            cached = (pool, np.zeros((1, len(pool.groups)), np.int64))
        table = cached[1]
        if step >= len(table):  # extend by at least doubling
            have, want = len(table) - 1, max(step, 2 * len(table), 1024)
            more = np.cumsum(self.group_counts(task, np.arange(have, want)), axis=0)
            table = np.concatenate([table, table[-1] + more])
        self._group_table[task] = (pool, table)
        return table[step]

    def _group_items(self, task: int, step: int, g: int, count: int) -> np.ndarray:
        """Positions in group ``g`` of the task's pool of its ``count`` replay items of
        ``step``."""
        group = self.pool(task).groups[g]
        name = "replay" if g == 0 else f"replay/{g}"
        local = self.group_rows_before(task, step)[g] + np.arange(count, dtype=np.int64)
        if group.resample_every:
            window = step // group.resample_every
            base = self.group_rows_before(task, window * group.resample_every)[g]
            size = min(group.resample_rows, group.size)
            slot = stream_items(self.seed, f"{name}/w{window}", task, local - base, size)
            return stream_items(self.seed, f"{name}/resample", task,
                                window * group.resample_rows + slot, group.size)
        if group.ordered:
            return local % group.size
        return stream_items(self.seed, name, task, local, group.size)

    def replay_rows_of(self, task: int, step: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(global ids [n_replay], loss weights [n_replay] or None) of (task, step)."""
        pool = self.pool(task)
        counts = self.group_counts(task, [step])[0]
        ids, weights = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
        for g, group in enumerate(pool.groups):
            if counts[g]:
                pos = self._group_items(task, step, g, int(counts[g]))
                ids.append(group.ids(pos))
                weights.append(group.loss_weights(pos))
        return np.concatenate(ids), (np.concatenate(weights) if pool.weighted else None)

    def batch(self, task: int, step: int) -> BatchIndex:
        """The rows of the global batch of (task, step); see the module docstring."""
        self.counts._check(task, step)
        task, step, size = int(task), int(step), self.global_batch
        n_rep = self.n_replay(task, step)
        n_new = size - n_rep
        domain = np.full(size, task, np.int32)
        row = np.empty(size, np.int64)
        is_replay = np.zeros(size, bool)
        weight = None
        if n_rep:
            flat, rep_weight = self.replay_rows_of(task, step)
            owner = np.searchsorted(self.starts, flat, side="right") - 1
            pos = replay_positions(size, n_rep)
            is_replay[pos] = True
            domain[pos] = owner
            row[pos] = flat - self.starts[owner]
            if rep_weight is not None:
                weight = np.ones(size, np.float32)
                weight[pos] = rep_weight
        if n_new:
            slots, _ = self.task_slots[task]
            new_pos = np.flatnonzero(~is_replay)
            counts = self.new_counts(task, [step])[0]
            before = self.new_rows_before_by_slot(task, step)
            # components interleaved evenly, so every contiguous slice gets its share +-1
            comp = np.repeat(np.arange(len(slots)), counts)
            key = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c])
            comp = comp[np.argsort(key, kind="stable")]
            for c, slot in enumerate(slots):
                at = new_pos[comp == c]
                if at.size:
                    domain[at] = slot
                    row[at] = permuted_stream(self.seed, _new_stream(c), task, int(before[c]),
                                              at.size, self.train_rows[slot])
        return BatchIndex(domain, row, is_replay, weight)


def _new_stream(component: int) -> str:
    """The permutation stream of a task's component (``"new"`` for the first, as before
    mixtures existed)."""
    return "new" if component == 0 else f"new/{component}"


def _systematic(n: np.ndarray, shares, seed: int, name: str, task: int,
                steps: np.ndarray) -> np.ndarray:
    """[S, G] integer split of ``n`` [S] by ``shares`` [G]: systematic rounding
    ``floor(n P_g + u) - floor(n P_{g-1} + u)`` with ``u`` uniform, keyed by (seed, name,
    task, step); each count is floor or ceil of n p_g and the counts sum to n."""
    shares = np.asarray(shares, np.float64)
    if len(shares) == 1:
        return n[:, None].astype(np.int64)
    u = (feistel_permute(steps, 1 << 32, round_keys(seed, name, task, 0)) + 0.5) / (1 << 32)
    cum = np.cumsum(shares / shares.sum())
    cum[-1] = 1.0
    edges = np.floor(n[:, None] * cum[None, :] + u[:, None]).astype(np.int64)
    return np.diff(edges, axis=1, prepend=np.zeros((len(steps), 1), np.int64))
