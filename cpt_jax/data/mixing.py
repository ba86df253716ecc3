"""What each task's batches mix: replay-rate schedules, and the union of all tasks' data.

``replay_rate_schedule`` builds the ``step -> rate`` decay from which the loop makes the
per-task callables that ``ReplaySampler(rate=...)`` accepts (the fraction of each batch replayed from earlier
tasks, Abbes et al. 2025, "Revisiting Replay and Gradient Alignment for Continual
Pre-Training of LLMs"), including mix-review's decaying share (He et al. 2021).

``ConcatRows`` presents several prepared splits as one, for joint training on the union of
all tasks' data: the usual upper reference of continual learning, where nothing is
forgotten because nothing is sequential.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

RATE_SCHEDULES = ("constant", "linear_decay", "exp_decay")


def replay_rate_schedule(kind: str, rate: float, span_steps: int,
                         end_rate: float = 0.0) -> Callable[[int], float]:
    """``step -> replay fraction`` in [0, 1]; pure and deterministic.

    ``step`` counts from the start of the span the schedule decays over (the loop spans
    every task that can replay, so the decay does not restart at a task boundary). With
    progress ``x = min(step / span_steps, 1)`` (so the rate reaches ``end_rate`` at the
    span's end and stays there if training runs longer, as it may under "additive"
    accounting, where the step count depends on the schedule itself):

    - ``"constant"``: ``rate`` (``end_rate`` is ignored);
    - ``"linear_decay"``: ``rate + (end_rate - rate) * x``;
    - ``"exp_decay"``: ``rate * (end_rate / rate) ** x``, a geometric decay by the same
      factor every step; needs ``0 < end_rate <= rate``. This is mix-review (He et al. 2021,
      "Analyzing the Forgetting Problem in Pretrain-Finetuning of Open-domain Dialogue
      Response Models"), which mixes pre-training data into fine-tuning with a mix ratio
      ``mix_ratio * mix_decay ** epoch``. In their units a ratio m (pre-training data per
      unit of target data) is a batch fraction ``m / (1 + m)``; ``mix_decay`` d applied over
      E epochs corresponds to ``end_rate = rate * d ** E`` here, with the decay spread
      smoothly over the steps rather than applied once per epoch.

    Args:
      span_steps: the length of the decay in nominal (replay-free) steps, >= 1.
    """
    if kind not in RATE_SCHEDULES:
        raise ValueError(f"replay.schedule={kind!r} is not a known replay schedule; use one "
                         f"of {list(RATE_SCHEDULES)}.")
    rate, end_rate, n = float(rate), float(end_rate), int(span_steps)
    for name, value in (("rate", rate), ("end_rate", end_rate)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"replay.{name}={value} must be in [0, 1].")
    if n < 1:
        raise ValueError(f"span_steps={span_steps} must be >= 1.")
    if kind == "exp_decay" and not 0.0 < end_rate <= rate:
        raise ValueError(f"exp_decay needs 0 < replay.end_rate <= replay.rate, got rate="
                         f"{rate}, end_rate={end_rate} (an exponential never reaches 0; for "
                         f"mix-review's per-epoch decay d over E epochs use rate * d**E).")
    lo, hi = min(rate, end_rate), max(rate, end_rate)

    def schedule(step: int) -> float:
        if int(step) < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        x = min(int(step) / n, 1.0)
        if kind == "constant":
            return rate
        if kind == "linear_decay":
            value = rate + (end_rate - rate) * x
        else:
            value = rate * math.exp(math.log(end_rate / rate) * x)
        return min(max(value, lo), hi)  # guard against rounding past the end points

    return schedule


def read_rows(sources: Sequence, domain: np.ndarray, row: np.ndarray):
    """tokens, segment_ids [N, L+1] for rows `row` of sources[domain] (one read per source)."""
    n, row_len = len(row), sources[0].row_len
    tokens = np.empty((n, row_len), np.int32)
    segs = np.empty((n, row_len), np.int32)
    for d in np.unique(domain):
        sel = np.flatnonzero(domain == d)
        tokens[sel], segs[sel] = sources[int(d)].read(row[sel])
    return tokens, segs


class ConcatRows:
    """The rows of several ``PackedRows`` (or objects with its interface) as one split.

    Global row ``i`` is row ``i - starts[s]`` of source ``s``, with ``starts`` the
    cumulative row counts, in the order given: sources are concatenated, not interleaved
    (the sampler's permutation does the mixing). For joint training pass every task's train
    split and treat the result as a single task whose budget is the sum of the tasks'
    budgets; evaluate on the parts as usual.

    ``read(indices)`` returns (tokens [N, row_len] int32, segment_ids [N, row_len] int32) in
    the order of ``indices`` (repeats allowed), with one ``read`` call per source that owns
    any of them.
    """

    def __init__(self, sources: Sequence):
        self.sources = list(sources)
        if not self.sources:
            raise ValueError("ConcatRows needs at least one source.")
        lens = {(int(s.seq_len), int(s.row_len)) for s in self.sources}
        if len(lens) != 1:
            raise ValueError(f"ConcatRows sources differ in (seq_len, row_len): "
                             f"{sorted(lens)}; prepare every domain with the same seq_len.")
        self.seq_len, self.row_len = lens.pop()
        self.starts = np.concatenate([[0], np.cumsum([len(s) for s in self.sources])]
                                     ).astype(np.int64)  # [S + 1]
        self.num_rows = int(self.starts[-1])

    def __len__(self) -> int:
        return self.num_rows

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(source [N] int64, local row [N] int64) of global row ids."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(f"Row indices must be in [0, {self.num_rows}) for {self!r}, got "
                             f"min {idx.min()} max {idx.max()}.")
        source = np.searchsorted(self.starts, idx, side="right") - 1
        return source, idx - self.starts[source]

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        return read_rows(self.sources, *self.locate(indices))

    def __repr__(self):
        return f"ConcatRows({len(self.sources)} sources, rows={self.num_rows}, " \
               f"seq_len={self.seq_len})"
