"""Which rows make the global batch of step t: a pure function of (seed, task, step).

During task k each global batch of ``B`` rows holds ``n_replay = round(rate * B)`` rows
replayed from the training rows of tasks ``< k`` (uniform over their union, the replay
buffer of Abbes et al. 2025, "Revisiting Replay and Gradient Alignment for Continual
Pre-Training of LLMs") and ``B - n_replay`` new rows of task k. Task 0 has no earlier data
and never replays. ``round`` rounds halves up.

Both streams walk without-replacement permutations: the new rows of task k in epoch e are
``perm(seed, "new", k, e)`` of ``[0, N_k)``, so every row is seen exactly once per epoch
before any repeats; replay walks ``perm(seed, "replay", k, e)`` of the union of earlier rows
the same way. The permutations are keyed Feistel networks with cycle walking: O(1) memory
for any number of rows and random access, so step t's rows are computed directly (position
in the stream = rows consumed by steps < t) rather than by replaying earlier steps.

Order within the batch: replay rows sit at evenly spread positions
``floor((j + 1/2) * B / n_replay)``, new rows fill the rest. Any contiguous slice of the
batch (a data-parallel shard, a gradient-accumulation micro-batch) therefore gets its
proportional share of replay rows, +-1, which a random shuffle would not guarantee and
"replay first" would violate entirely; the rows within each stream are already random.

Accounting (``steps_in_task``):

- ``"additive"`` (Abbes et al. 2025): the task keeps its full budget of *new* tokens and
  replay comes on top: steps run until the new rows cover the budget (25% replay =
  1.33x the compute of no replay).
- ``"compute_equivalent"`` (Ibrahim et al. 2024, "Simple and Scalable Strategies to
  Continually Pre-train LLMs"): the number of steps is the budget divided by the batch
  tokens; replayed rows replace new rows.

``rate`` may be a float or a schedule ``step -> float`` (step within the task), e.g. a
mix-review share that decays over the task. Steps are counted within a task, from 0.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np

ACCOUNTINGS = ("additive", "compute_equivalent")
_ROUNDS = 6


# ---------------------------------------------------------------------------------------
# Random-access permutation


@functools.lru_cache(maxsize=4096)
def _round_keys(seed: int, stream: str, task: int, epoch: int) -> np.ndarray:
    digest = hashlib.blake2b(f"{seed}/{stream}/{task}/{epoch}".encode(),
                             digest_size=8 * _ROUNDS).digest()
    return np.frombuffer(digest, dtype=np.uint64).copy()


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer (uint64 arithmetic wraps)."""
    x = x * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def feistel_permute(i, n: int, keys: np.ndarray) -> np.ndarray:
    """Maps indices ``i`` in [0, n) through a keyed pseudo-random bijection of [0, n).

    A balanced Feistel network over 2h bits (4^h >= n, so fewer than 4n states) is a
    bijection of [0, 4^h); cycle walking (re-applying it until the value is < n) restricts
    it to a bijection of [0, n). O(1) memory; expected fewer than 4 walks per index.
    """
    i = np.asarray(i, dtype=np.int64)
    if n < 1:
        raise ValueError(f"Cannot permute an empty range (n={n}).")
    if i.size and (i.min() < 0 or i.max() >= n):
        raise IndexError(f"Permutation indices must be in [0, {n}).")
    if n == 1:
        return np.zeros_like(i)
    half = max(1, math.ceil(math.ceil(math.log2(n)) / 2))
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)

    def encrypt(x):
        left, right = x >> shift, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << shift) | right

    x = encrypt(i.astype(np.uint64))
    out = x >= np.uint64(n)
    while out.any():
        x[out] = encrypt(x[out])
        out = x >= np.uint64(n)
    return x.astype(np.int64)


# ---------------------------------------------------------------------------------------
# Batches


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

    def shard(self, index: int, count: int) -> "BatchIndex":
        """The ``index``-th of ``count`` contiguous equal slices (a data-parallel shard)."""
        size = len(self)
        if count < 1 or size % count or not 0 <= index < count:
            raise ValueError(f"Cannot take shard {index} of {count} of a batch of {size} "
                             f"rows; the global batch must be a multiple of the shards.")
        s = slice(index * size // count, (index + 1) * size // count)
        return BatchIndex(self.domain[s], self.row[s], self.is_replay[s])


Rate = float | Callable[[int], float]


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
      rate: replay fraction in [0, 1], or a schedule ``step_within_task -> fraction``,
        or a list with one of those per task (e.g. a mix-review decay over each task).
      accounting: "additive" or "compute_equivalent" (see the module docstring).
      seed: the data order seed.
      names: optional task names, used in error messages.
    """

    def __init__(self, train_rows: Sequence[int], global_batch: int, rate: Rate = 0.0,
                 accounting: str = "additive", seed: int = 0,
                 names: Sequence[str] | None = None):
        if len(train_rows) == 0:
            raise ValueError("ReplaySampler needs at least one task (train_rows is empty).")
        self._labels = [f"task {k} ({name!r})" for k, name in enumerate(names)] if names \
            else [f"task {k}" for k in range(len(train_rows))]
        if len(self._labels) != len(train_rows):
            raise ValueError(f"{len(self._labels)} names for {len(train_rows)} tasks.")
        for name, n in zip(self._labels, train_rows):
            if int(n) < 1:
                raise ValueError(f"The domain of {name} has {n} training rows; it needs at "
                                 f"least one (give it more text or lower val_fraction).")
        if int(global_batch) < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}.")
        if accounting not in ACCOUNTINGS:
            raise ValueError(f"accounting must be one of {ACCOUNTINGS}, got {accounting!r}.")
        self.train_rows = [int(n) for n in train_rows]
        self.global_batch = int(global_batch)
        self.rate = rate
        if isinstance(rate, (list, tuple)) and len(rate) != len(train_rows):
            raise ValueError(f"{len(rate)} replay rates for {len(train_rows)} tasks; give one "
                             "rate (or schedule) per task.")
        self.accounting = accounting
        self.seed = int(seed)
        self._starts = np.concatenate([[0], np.cumsum(self.train_rows)]).astype(np.int64)
        for k in range(len(train_rows)):
            if not callable(self._rate_of(k)):
                self._check_rate(self._rate_of(k), None)
        self._replay_cum = {}  # task -> cumulative replay rows under a rate schedule

    @property
    def num_tasks(self) -> int:
        return len(self.train_rows)

    # -- replay counts --------------------------------------------------------------

    @staticmethod
    def _check_rate(value, step) -> float:
        where = "" if step is None else f" at step {step}"
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"Replay rate{where} must be a number in [0, 1], got "
                             f"{value!r}.") from None
        if not 0.0 <= value <= 1.0:  # also rejects NaN
            raise ValueError(f"Replay rate{where} must be in [0, 1], got {value}.")
        return value

    def _rate_of(self, task: int):
        return self.rate[task] if isinstance(self.rate, (list, tuple)) else self.rate

    def _count(self, rate: float) -> int:
        return int(math.floor(rate * self.global_batch + 0.5))

    def _check(self, task: int, step: int | None = None) -> None:
        if not 0 <= int(task) < self.num_tasks:
            raise ValueError(f"task must be in [0, {self.num_tasks}), got {task}.")
        if step is not None and int(step) < 0:
            raise ValueError(f"step must be >= 0, got {step}.")

    def n_replay(self, task: int, step: int) -> int:
        """Replay rows in the batch of (task, step): round(rate(step) * B), 0 for task 0."""
        self._check(task, step)
        return 0 if task == 0 else self._scheduled_count(int(task), int(step))

    def _scheduled_count(self, task: int, step: int) -> int:
        rate = self._rate_of(task)
        rate = rate(step) if callable(rate) else rate
        return self._count(self._check_rate(rate, step))

    def replay_rows_before(self, task: int, step: int) -> int:
        """Replay rows used by steps [0, step) of ``task``."""
        self._check(task, step)
        if task == 0 or step == 0:
            return 0
        rate = self._rate_of(task)
        if not callable(rate):
            return int(step) * self._count(rate)
        cum = self._replay_cum.get(task, np.zeros(1, np.int64))
        if len(cum) <= step:  # memoised prefix sums of the schedule (a pure function)
            upto = max(int(step) + 1, 2 * len(cum))
            counts = [self._scheduled_count(task, s) for s in range(len(cum) - 1, upto - 1)]
            cum = np.concatenate([cum, cum[-1] + np.cumsum(counts, dtype=np.int64)])
            self._replay_cum[task] = cum
        return int(cum[step])

    def new_rows_before(self, task: int, step: int) -> int:
        """New (task ``task``) rows used by steps [0, step)."""
        return int(step) * self.global_batch - self.replay_rows_before(task, step)

    # -- batches ----------------------------------------------------------------------

    def _stream(self, stream: str, task: int, first: int, count: int, n: int) -> np.ndarray:
        """Items [first, first + count) of the epoch-wise permuted stream over [0, n)."""
        pos = np.arange(first, first + count, dtype=np.int64)
        epoch, offset = np.divmod(pos, n)
        out = np.empty(count, np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = feistel_permute(offset[sel], n,
                                       _round_keys(self.seed, stream, int(task), int(e)))
        return out

    def batch(self, task: int, step: int) -> BatchIndex:
        """The rows of the global batch of (task, step); see the module docstring."""
        self._check(task, step)
        task, step, size = int(task), int(step), self.global_batch
        n_rep = self.n_replay(task, step)
        n_new = size - n_rep
        domain = np.full(size, task, np.int32)
        row = np.empty(size, np.int64)
        is_replay = np.zeros(size, bool)
        if n_rep:
            pool = int(self._starts[task])  # rows of tasks < task
            flat = self._stream("replay", task, self.replay_rows_before(task, step), n_rep,
                                pool)
            owner = np.searchsorted(self._starts, flat, side="right") - 1
            pos = replay_positions(size, n_rep)
            is_replay[pos] = True
            domain[pos] = owner
            row[pos] = flat - self._starts[owner]
        if n_new:
            row[~is_replay] = self._stream("new", task, self.new_rows_before(task, step),
                                           n_new, self.train_rows[task])
        return BatchIndex(domain, row, is_replay)

    # -- budgets ----------------------------------------------------------------------

    def steps_in_task(self, task: int, budget_tokens: int | None = None,
                      budget_steps: int | None = None, seq_len: int | None = None) -> int:
        """Optimizer steps of ``task`` for its budget under the sampler's accounting.

        Give the budget as ``budget_tokens`` (with ``seq_len``; a row holds seq_len target
        tokens) or as ``budget_steps`` (the steps a replay-free run would take). Additive:
        the fewest steps whose new rows cover the budget. Compute-equivalent: the budget
        in steps, rounded up. Either way every budget token is covered.
        """
        self._check(task)
        if (budget_tokens is None) == (budget_steps is None):
            raise ValueError("Give exactly one of budget_tokens and budget_steps.")
        size = self.global_batch
        if budget_tokens is not None:
            if seq_len is None or int(seq_len) < 1:
                raise ValueError(f"budget_tokens needs seq_len >= 1, got {seq_len}.")
            if not budget_tokens > 0:
                raise ValueError(f"{self._labels[task]}: budget_tokens must be positive, got "
                                 f"{budget_tokens}.")
            rows = math.ceil(budget_tokens / int(seq_len))
        else:
            if not budget_steps > 0:
                raise ValueError(f"{self._labels[task]}: budget_steps must be positive, got "
                                 f"{budget_steps}.")
            rows = int(math.ceil(budget_steps)) * size
        if self.accounting == "compute_equivalent" or task == 0:
            return math.ceil(rows / size)
        if not callable(self._rate_of(task)):
            n_new = size - self._count(self._rate_of(task))
            if n_new == 0:
                raise ValueError(f"{self._labels[task]}: replay rate {self._rate_of(task)} leaves no new "
                                 f"rows in a batch of {size}, so additive accounting never "
                                 f"covers the budget; lower the rate or use "
                                 f"accounting='compute_equivalent'.")
            return math.ceil(rows / n_new)
        lo, hi = math.ceil(rows / size), math.ceil(rows / size)
        while self.new_rows_before(task, hi) < rows:  # exponential then binary search
            lo, hi = hi, 2 * hi
            if hi > 64 * math.ceil(rows / size):
                raise ValueError(f"{self._labels[task]}: the replay schedule leaves almost no "
                                 f"new rows (rate near 1), so additive accounting does not "
                                 f"cover the budget of {rows} rows; lower the rate or use "
                                 f"accounting='compute_equivalent'.")
        while lo < hi:
            mid = (lo + hi) // 2
            if self.new_rows_before(task, mid) >= rows:
                hi = mid
            else:
                lo = mid + 1
        return lo
