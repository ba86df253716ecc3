"""How many replayed rows each step holds, and how many steps a task's budget takes.

The replay rate of a task is a fraction of each global batch of ``B`` rows: a constant, or
a schedule ``step -> fraction`` (``replay_rate_schedule``; the loop spans the decay over
the whole run, ``replay_rates``). Step ``t`` of task ``k`` replays ``round(rate(t) * B)``
rows (halves up); a task with no earlier data never replays: task 0, unless the run has
replay sources (``replay.sources``, replayable from task 0 on; ``replay_history``).

Accounting (``ReplayCounts.steps_in_task``):

- ``"additive"`` (Abbes et al. 2025, "Revisiting Replay and Gradient Alignment for
  Continual Pre-Training of LLMs"): the task keeps its full budget of *new* tokens and
  replay comes on top: steps run until the new rows cover the budget (25% replay =
  1.33x the compute of no replay).
- ``"compute_equivalent"`` (Ibrahim et al. 2024, "Simple and Scalable Strategies to
  Continually Pre-train LLMs"): the number of steps is the budget divided by the batch
  tokens; replayed rows replace new rows.

Which rows are replayed is the sampler's business (``cpt_jax.replay.sampler``); the counts
here do not depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from cpt_jax.data.recipe import task_name

ACCOUNTINGS = ("additive", "compute_equivalent")
Rate = float | Callable[[int], float]

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


def nominal_steps(config, task: dict) -> int:
    """A task's budget in replay-free steps (its step budget, or tokens / batch tokens)."""
    if task.get("steps") is not None:
        return int(task["steps"])
    return -(-int(task["tokens"]) // (config.global_batch * config.seq_len))


def replay_history(config, num_tasks: int) -> list[bool]:
    """Per task, whether it has earlier data to replay: every task but the first, and the
    first too when ``replay.sources`` lists domains replayable from task 0 (not in a joint
    run, which never replays)."""
    sources = bool(config.replay.get("sources")) and not config.joint
    return [sources or k > 0 for k in range(num_tasks)]


def replay_rates(config, tasks):
    """The sampler's replay rate: a constant, or one schedule per task that decays over the
    whole run (mix-review, He et al. 2021): from ``replay.rate`` at the start of the first
    task that can replay (task 1) to ``replay.end_rate`` at the end of the last, measured
    in the tasks' nominal (replay-free) steps, never restarting at a task boundary."""
    r = config.replay
    if config.joint:
        return 0.0
    if r.schedule == "constant":
        return r.rate
    nominal = [nominal_steps(config, t) for t in tasks]
    first = 0 if replay_history(config, len(tasks))[0] else 1  # the first task replaying
    starts = np.concatenate([[0], np.cumsum(nominal[first:])]).astype(int)  # k >= first
    decay = replay_rate_schedule(r.schedule, r.rate, max(int(starts[-1]), 1), r.end_rate)

    def task_rate(k):
        offset = int(starts[k - first]) if k >= first else 0
        return lambda step: decay(offset + int(step))

    return [task_rate(k) for k in range(len(tasks))]


class ReplayCounts:
    """Replay and new rows per step of every task, and each task's steps for its budget.

    Args:
      num_tasks: tasks in the run.
      global_batch: rows per global batch (B).
      rate: replay fraction in [0, 1], or a schedule ``step_within_task -> fraction``,
        or a list with one of those per task.
      accounting: "additive" or "compute_equivalent" (see the module docstring).
      names: optional task names, used in error messages.
      history: per task, whether it has earlier data to replay (default: every task but
        task 0; with replay sources, task 0 too). A task without history never replays.
    """

    def __init__(self, num_tasks: int, global_batch: int, rate: Rate = 0.0,
                 accounting: str = "additive", names: Sequence[str] | None = None,
                 history: Sequence[bool] | None = None):
        self._labels = [f"task {k} ({name!r})" for k, name in enumerate(names)] if names \
            else [f"task {k}" for k in range(num_tasks)]
        if len(self._labels) != num_tasks:
            raise ValueError(f"{len(self._labels)} names for {num_tasks} tasks.")
        if int(global_batch) < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}.")
        if accounting not in ACCOUNTINGS:
            raise ValueError(f"accounting must be one of {ACCOUNTINGS}, got {accounting!r}.")
        if isinstance(rate, (list, tuple)) and len(rate) != num_tasks:
            raise ValueError(f"{len(rate)} replay rates for {num_tasks} tasks; give one "
                             "rate (or schedule) per task.")
        self.num_tasks, self.global_batch = int(num_tasks), int(global_batch)
        self.rate, self.accounting = rate, accounting
        self.history = ([k > 0 for k in range(self.num_tasks)] if history is None
                        else [bool(h) for h in history])
        for k in range(self.num_tasks):
            if not callable(self._rate_of(k)):
                self._check_rate(self._rate_of(k), None)
        self._replay_cum = {}  # task -> cumulative replay rows under a rate schedule

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
        """Replay rows in the batch of (task, step): round(rate(step) * B), 0 for a task
        with nothing earlier (task 0 unless the run has replay sources)."""
        self._check(task, step)
        return self._scheduled_count(int(task), int(step)) if self.history[task] else 0

    def _scheduled_count(self, task: int, step: int) -> int:
        rate = self._rate_of(task)
        rate = rate(step) if callable(rate) else rate
        return self._count(self._check_rate(rate, step))

    def replay_rows_before(self, task: int, step: int) -> int:
        """Replay rows used by steps [0, step) of ``task``."""
        self._check(task, step)
        if not self.history[task] or step == 0:
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
        if self.accounting == "compute_equivalent" or not self.history[task]:
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


def task_steps(config, tasks) -> list[int]:
    """Optimizer steps of each task of ``tasks`` as a run takes them: its budget under
    ``replay.accounting`` at the run's replay rates (needs no data)."""
    counts = ReplayCounts(len(tasks), config.global_batch, replay_rates(config, tasks),
                          config.replay.accounting,
                          [task_name(t) if ("domain" in t or "domains" in t) else "joint"
                           for t in tasks], history=replay_history(config, len(tasks)))
    return [counts.steps_in_task(k, budget_tokens=t.get("tokens"),
                                 budget_steps=t.get("steps"), seq_len=config.seq_len)
            for k, t in enumerate(tasks)]
