"""What may be replayed: a ``ReplayPool`` of earlier rows, chosen by a ``ReplayPolicy``.

At the start of every task k >= 1 (and of task 0 when replay sources exist) the loop asks the run's policy (``cpt_jax.replay.
policies``) for task k's pool: the rows of tasks < k that may be replayed, in groups, each
group with its share of every step's replay rows. A pool is small (row ids, shares,
weights), checkpointed with the run, so a batch stays a pure function of (seed, task,
step, pool) and a resumed run replays exactly what an uninterrupted one would.

Row ids are global: row r of task j is ``starts[j] + r``, with ``starts`` the cumulative
train-row counts of the tasks in order (``ReplaySampler.starts``).

A group is either explicit rows (a buffer) or a contiguous span of ids (a whole domain, or
every earlier row), and says how the sampler walks it (``cpt_jax.replay.sampler``):

- permuted (default): epoch by epoch, each row once per epoch before any repeats;
- ``ordered``: in the stored order, cycling (a curriculum);
- ``resample_every`` / ``resample_rows``: every ``resample_every`` steps a fresh buffer of
  ``resample_rows`` rows is drawn from the group without replacement across windows
  (window w holds items [w R, (w + 1) R) of a permuted stream of the group), and replay
  walks that buffer: a small memory that cycles through all of the group over time.

``weights`` (explicit rows only) are per-row loss weights, e.g. a coreset's: the replay
loss weights a replayed row by ``weight * size / sum(weights)`` (mean 1 over the group),
so the weighted replay gradient estimates the gradient the coreset stands for.

A ``ReplayPolicy`` (the concrete ones: ``cpt_jax.replay.policies``) makes task k's pool
from a ``Boundary``: what the run can tell it at the start of task k.

``uniform`` (Abbes et al. 2025: every row of every earlier task, uniformly) is the pool
``None``: nothing is stored; the sampler reads it as one span group ``[0, starts[k])``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np



@dataclasses.dataclass(frozen=True)
class PoolGroup:
    """Replayable rows: explicit global ``rows`` [n] or a ``span`` [lo, hi) of ids."""

    rows: np.ndarray | None = None
    span: tuple[int, int] | None = None
    weights: np.ndarray | None = None  # [n] loss weights >= 0 (explicit rows only)
    ordered: bool = False
    resample_every: int = 0  # 0: the whole group is the buffer
    resample_rows: int = 0

    def __post_init__(self):
        if (self.rows is None) == (self.span is None):
            raise ValueError("a pool group holds either explicit rows or a span, not both")
        if self.rows is not None:
            rows = np.asarray(self.rows, np.int64).reshape(-1)
            object.__setattr__(self, "rows", rows)
        else:
            lo, hi = (int(x) for x in self.span)
            object.__setattr__(self, "span", (lo, hi))
            if self.weights is not None:
                raise ValueError("a span group has no per-row weights")
        if self.size == 0:
            raise ValueError("a replay pool group needs at least one row")
        if self.weights is not None:
            w = np.asarray(self.weights, np.float64).reshape(-1)
            if w.shape != (self.size,) or not np.all(np.isfinite(w)) or w.min() < 0 \
                    or w.sum() <= 0:
                raise ValueError(f"replay pool weights must be {self.size} finite numbers "
                                 ">= 0 with a positive sum")
            object.__setattr__(self, "weights", w)
        if (self.resample_every > 0) != (self.resample_rows > 0):
            raise ValueError("resample_every and resample_rows go together (both >= 1)")

    @property
    def size(self) -> int:
        return int(self.rows.size) if self.rows is not None else self.span[1] - self.span[0]

    def ids(self, positions: np.ndarray) -> np.ndarray:
        """Global row ids of the group's items at ``positions`` [n] in [0, size)."""
        return self.rows[positions] if self.rows is not None else self.span[0] + positions

    def loss_weights(self, positions: np.ndarray) -> np.ndarray:
        """Loss weights [n] of the items at ``positions``, mean 1 over the group."""
        if self.weights is None:
            return np.ones(len(positions), np.float32)
        return (self.weights[positions] * self.size / self.weights.sum()).astype(np.float32)

    def memory_rows(self) -> int:
        """Rows this group keeps in memory (a span is read from the stored data instead)."""
        if self.resample_rows:
            return min(self.resample_rows, self.size)
        return self.size if self.rows is not None else 0


@dataclasses.dataclass(frozen=True)
class ReplayPool:
    """Groups of replayable rows and their ``shares`` [G] of each step's replay rows (any
    positive scale; normalised). ``parts`` [G]: which sub-policy of a hybrid made each
    group (0 otherwise)."""

    groups: tuple[PoolGroup, ...]
    shares: np.ndarray | None = None
    parts: np.ndarray | None = None

    def __post_init__(self):
        groups = tuple(self.groups)
        if not groups:
            raise ValueError("a replay pool needs at least one group")
        object.__setattr__(self, "groups", groups)
        shares = np.ones(len(groups)) if self.shares is None else np.asarray(self.shares,
                                                                           np.float64)
        if shares.shape != (len(groups),) or not np.all(np.isfinite(shares)) \
                or shares.min() < 0 or shares.sum() <= 0:
            raise ValueError(f"replay pool shares must be {len(groups)} finite numbers >= 0 "
                             "with a positive sum")
        object.__setattr__(self, "shares", shares / shares.sum())
        parts = np.zeros(len(groups), np.int64) if self.parts is None else np.asarray(
            self.parts, np.int64)
        object.__setattr__(self, "parts", parts)

    @classmethod
    def of_rows(cls, rows, weights=None, ordered: bool = False) -> "ReplayPool":
        """A pool of one explicit group."""
        return cls((PoolGroup(rows=rows, weights=weights, ordered=ordered),))

    @property
    def weighted(self) -> bool:
        return any(g.weights is not None for g in self.groups)

    def memory_rows(self) -> int:
        return sum(g.memory_rows() for g in self.groups)

    def all_rows(self) -> np.ndarray:
        """Every explicit row id, group by group (spans excluded)."""
        rows = [g.rows for g in self.groups if g.rows is not None]
        return np.concatenate(rows) if rows else np.zeros(0, np.int64)

    def part(self, i: int) -> "ReplayPool | None":
        """The groups made by sub-policy ``i`` (shares renormalised), or None."""
        keep = np.flatnonzero(self.parts == i)
        if keep.size == 0:
            return None
        return ReplayPool(tuple(self.groups[j] for j in keep), self.shares[keep])

    @classmethod
    def combine(cls, pools, shares) -> "ReplayPool":
        """A hybrid: pool i gets ``shares[i]`` of the replay rows, split over its groups by
        its own shares."""
        groups, out_shares, parts = [], [], []
        for i, (pool, share) in enumerate(zip(pools, shares)):
            groups += pool.groups
            out_shares += list(share * pool.shares)
            parts += [i] * len(pool.groups)
        return cls(tuple(groups), np.asarray(out_shares), np.asarray(parts))

    def to_arrays(self) -> dict:
        """Named arrays for the run checkpoint."""
        out = {"shares": self.shares, "parts": self.parts}
        for g, group in enumerate(self.groups):
            if group.rows is not None:
                out[f"g{g}_rows"] = group.rows
            else:
                out[f"g{g}_span"] = np.asarray(group.span, np.int64)
            if group.weights is not None:
                out[f"g{g}_weights"] = group.weights
            out[f"g{g}_walk"] = np.asarray([group.ordered, group.resample_every,
                                            group.resample_rows], np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict) -> "ReplayPool":
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        groups = []
        for g in range(len(arrays["shares"])):
            ordered, every, rows = (int(x) for x in arrays[f"g{g}_walk"])
            span = arrays.get(f"g{g}_span")
            groups.append(PoolGroup(rows=arrays.get(f"g{g}_rows"),
                                    span=None if span is None else tuple(span),
                                    weights=arrays.get(f"g{g}_weights"), ordered=bool(ordered),
                                    resample_every=every, resample_rows=rows))
        return cls(tuple(groups), arrays["shares"], arrays["parts"])


def buffer_bytes(rows: int, seq_len: int) -> int:
    """Bytes of a buffer of ``rows`` rows: int32 tokens [seq_len + 1], an int64 global row
    id and a float32 loss weight per row."""
    return int(rows) * ((seq_len + 1) * 4 + 8 + 4)


ScoreRows = Callable[[np.ndarray], np.ndarray]


def largest_remainder(total: int, shares) -> np.ndarray:
    """Integers [G] >= 0 summing to ``total``, each floor or ceil of ``total * share``
    (Hamilton's method; ties to the lower index): how a buffer of ``total`` rows is split."""
    shares = np.asarray(shares, np.float64)
    exact = total * shares / shares.sum()
    out = np.floor(exact).astype(np.int64)
    extra = int(total - out.sum())
    if extra:
        order = np.argsort(-(exact - out), kind="stable")
        out[order[:extra]] += 1
    return out


FeatureRows = Callable[..., np.ndarray]  # (ids [N], init: int | None) -> [N, d]


@dataclasses.dataclass
class Boundary:
    """What a policy sees at the start of task ``task`` (>= 1, or 0 when the run has replay
    sources). Domains are the sampler's slots (``cpt_jax.data.recipe``): ``earlier`` is the
    number of slots before the task (replay sources, then earlier tasks' components; equal
    to ``task`` in a run without sources or mixtures), ``finished`` the slots that joined
    them since the previous boundary."""

    task: int
    sampler: object  # cpt_jax.replay.sampler.ReplaySampler
    steps: Sequence[int]  # steps of every task
    previous: ReplayPool | None = None
    score_rows: ScoreRows | None = None
    feature_rows: FeatureRows | None = None

    @property
    def starts(self) -> np.ndarray:
        return self.sampler.starts

    @property
    def earlier(self) -> int:
        return self.sampler.first_slot[self.task]

    @property
    def finished(self) -> range:
        lo = self.sampler.first_slot[self.task - 1] if self.task else 0
        return range(lo, self.earlier)

    def domain_rows(self, d: int) -> int:
        return self.sampler.train_rows[d]

    def trained_count(self, j: int) -> int:
        """Rows of slot j trained on (a replay source: all of its rows, once)."""
        return self.sampler.slot_trained_count(j, self.steps)

    def trained_items(self, j: int, positions) -> np.ndarray:
        """Global ids of slot j's rows at stream ``positions``, in training order."""
        return self.sampler.slot_trained_items(j, positions)


class ReplayPolicy(abc.ABC):
    """Decides, at the start of each task k >= 1, which earlier rows may be replayed.
    ``bounded``: the policy keeps at most ``buffer_rows`` rows (>= 1 required)."""

    name: str = ""
    bounded: bool = True

    def __init__(self, config, buffer_rows: int | None = None):
        self.config = config
        self.seed = int(config.seed)
        self.buffer_rows = int(config.replay.buffer_rows if buffer_rows is None
                               else buffer_rows)

    @abc.abstractmethod
    def pool(self, b: Boundary) -> ReplayPool | None:
        """Task ``b.task``'s pool; None = every row of the earlier tasks, uniformly."""
