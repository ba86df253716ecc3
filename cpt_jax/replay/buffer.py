"""What may be replayed: a ``ReplayPolicy`` turns the finished tasks into a replay pool.

At the start of every task k >= 1 the loop asks the run's policy for task k's pool: the
rows of tasks < k that may be replayed, and with what weights. A pool is a small array
(row ids, optional weights) checkpointed with the run, so a batch stays a pure function of
(seed, task, step, pool) and a resumed run replays exactly what an uninterrupted one would.

Row ids are global: row r of task j is ``starts[j] + r``, with ``starts`` the cumulative
train-row counts of the tasks in order (``ReplaySampler.starts``).

``uniform`` (the replay of Abbes et al. 2025: every row of every earlier task, uniformly)
is the pool ``None``: nothing is stored, and the sampler walks the union of earlier rows
directly. Further policies (a bounded buffer, domain weights, loss-ordered curricula,
coresets) return explicit pools; the ones that need the current model get ``score_rows``,
a function from global row ids [N] to per-row numbers [N] computed with it.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class ReplayPool:
    """The replayable rows of one task: global ``rows`` [P] int64 and optional sampling
    ``weights`` [P] (>= 0, any scale; None = uniform, without replacement per epoch)."""

    rows: np.ndarray
    weights: np.ndarray | None = None

    def __post_init__(self):
        rows = np.asarray(self.rows, np.int64).reshape(-1)
        object.__setattr__(self, "rows", rows)
        if rows.size == 0:
            raise ValueError("a replay pool needs at least one row")
        if self.weights is not None:
            w = np.asarray(self.weights, np.float64).reshape(-1)
            if w.shape != rows.shape or not np.all(np.isfinite(w)) or w.min() < 0 or w.sum() <= 0:
                raise ValueError(f"replay pool weights must be {rows.size} finite numbers >= 0 "
                                 "with a positive sum")
            object.__setattr__(self, "weights", w)

    def to_arrays(self) -> dict:
        """For the run checkpoint."""
        out = {"rows": self.rows}
        if self.weights is not None:
            out["weights"] = self.weights
        return out

    @classmethod
    def from_arrays(cls, arrays: dict) -> "ReplayPool":
        return cls(np.asarray(arrays["rows"]), arrays.get("weights"))


ScoreRows = Callable[[np.ndarray], np.ndarray]


class ReplayPolicy(abc.ABC):
    """Decides, at the start of each task k >= 1, which earlier rows may be replayed."""

    name: str = ""

    @abc.abstractmethod
    def pool(self, task: int, starts: np.ndarray, previous: ReplayPool | None,
             score_rows: ScoreRows | None = None) -> ReplayPool | None:
        """Task ``task``'s pool, given the cumulative train-row counts ``starts`` [T + 1]
        (task j's rows are ``[starts[j], starts[j + 1])``), the previous task's pool and,
        for policies that need the model, ``score_rows``. None = every row of tasks < task,
        uniformly."""


class UniformPolicy(ReplayPolicy):
    """Every row of every earlier task, uniformly (Abbes et al. 2025): stores nothing."""

    name = "uniform"

    def pool(self, task, starts, previous, score_rows=None):
        del task, starts, previous, score_rows
        return None


POLICIES: dict[str, type[ReplayPolicy]] = {"uniform": UniformPolicy}


def make_policy(config) -> ReplayPolicy:
    """The policy named by ``config.replay.policy`` (checked by ``run_config.check_config``)."""
    return POLICIES[config.replay.policy]()
