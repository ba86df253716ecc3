"""Learning-rate schedules for continual pre-training: ``step -> lr`` optax schedules.

Every schedule here is a pure function of the global optimizer step (counted from 0 over the
whole task sequence), written in ``jax.numpy`` so that it runs under ``jax.jit`` with a
traced integer step (optax passes its int32 step count). Task boundaries and phase lengths
are static Python ints fixed when the schedule is built.

- ``warmup_cosine``: one linear warmup then one cosine decay to ``min_lr`` over the whole
  task sequence, no reset between tasks (Abbes et al. 2025, "Revisiting Replay and Gradient
  Alignment for Continual Pre-Training of LLMs": warmup 1% then cosine to min_lr).
- ``rewarm_cosine``: re-warm and re-decay at each task (Ibrahim et al. 2024, "Simple and
  Scalable Strategies to Continually Pre-train Large Language Models").
- ``infinite``: Ibrahim et al.'s "infinite" schedule: one warmup and one cooldown to a
  constant LR, a constant phase that spans the tasks, and an anneal at each task's end.

Conventions shared by all three (those of ``warmup_cosine``): a linear warmup of ``w`` steps
reaches its target *on* its last step (step ``s < w`` gets ``start + (peak - start) *
(s + 1) / w``), and a cosine decay of ``d`` steps starting at step ``a`` has progress
``(s - a) / d``, reaching its target at the boundary ``a + d``. ``make_lr_schedule`` builds
any of them from a run's ``config.optim``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

SCHEDULES = ("cosine", "rewarm_cosine", "infinite")


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float):
    """step -> lr: 0 -> peak linearly over warmup_steps, then cosine down to min_lr at total_steps."""
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be positive")
    warmup_steps = max(int(warmup_steps), 0)
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak_lr * (step + 1) / max(warmup_steps, 1)
        frac = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        cos = min_lr + 0.5 * (peak_lr - min_lr) * (1 + jnp.cos(jnp.pi * frac))
        return jnp.where(step < warmup_steps, warm, cos)

    return schedule


# ---------------------------------------------------------------------------------------
# Helpers


def _check_boundaries(task_boundaries: Sequence[int]) -> np.ndarray:
    """Cumulative task ends as int64 [T]; raises unless positive and strictly increasing."""
    bounds = np.asarray([int(b) for b in task_boundaries], np.int64)
    if bounds.ndim != 1 or bounds.size == 0:
        raise ValueError(f"task_boundaries={list(task_boundaries)} must be a non-empty list "
                         f"of cumulative step counts, e.g. [100, 150, 200].")
    if bounds[0] <= 0 or (np.diff(bounds) <= 0).any():
        raise ValueError(f"task_boundaries={bounds.tolist()} must be positive and strictly "
                         f"increasing (cumulative steps at the end of each task); every task "
                         f"needs at least one step.")
    return bounds


def _task_of(step, bounds_T: np.ndarray):
    """(task index, step within that task) of a global step; steps past the end stay in the
    last task. Both int32, traceable."""
    step = jnp.asarray(step, jnp.int32)
    starts = jnp.asarray(np.concatenate([[0], bounds_T[:-1]]), jnp.int32)
    ended = step[..., None] >= jnp.asarray(bounds_T, jnp.int32)  # [..., T] tasks done
    task = jnp.minimum(ended.astype(jnp.int32).sum(-1), bounds_T.size - 1)
    return task, step - starts[task]


def _per_task(value, n_tasks: int, name: str) -> list[int]:
    """An int (same for every task) or a list of ints, one per task."""
    values = [int(v) for v in value] if isinstance(value, (list, tuple, np.ndarray)) else \
        [int(value)] * n_tasks
    if len(values) != n_tasks:
        raise ValueError(f"{name}={list(value)} has {len(values)} entries for {n_tasks} tasks; "
                         f"give one per task or a single int.")
    if min(values) < 0:
        raise ValueError(f"{name}={values} must be >= 0.")
    return values


def _cosine(start, end, frac):
    """start -> end along half a cosine as frac goes 0 -> 1."""
    return end + 0.5 * (start - end) * (1.0 + jnp.cos(jnp.pi * frac))


# ---------------------------------------------------------------------------------------
# Re-warm and re-decay


def rewarm_cosine(peak_lr: float, task_boundaries: Sequence[int],
                  warmup_frac: float | None = 0.01, warmup_steps: int | None = None,
                  min_lr: float = 0.0):
    """step -> lr with a linear warmup and a cosine decay inside every task.

    Ibrahim et al. 2024 ("Simple and Scalable Strategies to Continually Pre-train Large
    Language Models") show that re-warming the LR to its peak and re-decaying it on each new
    dataset is needed to adapt well (the re-warm causes some forgetting, which replay then
    mitigates). Task ``k`` spans steps ``[b_{k-1}, b_k)`` of ``task_boundaries`` (cumulative,
    static), e.g. ``[100, 150, 200]``: task 0 is [0, 100), task 1 [100, 150), task 2
    [150, 200). Within task ``k`` of ``n_k`` steps, with ``w_k`` warmup steps:

    - warmup, local step ``s < w_k``: ``start_k + (peak - start_k) * (s + 1) / w_k``, with
      ``start_0 = 0`` (a fresh run, exactly ``warmup_cosine``'s warmup) and ``start_k =
      min_lr`` for ``k > 0``, so each re-warm starts where the previous decay ended (the
      paper's formula re-warms from 0; from min_lr avoids a drop to ~0 at the boundary and
      differs by at most ``min_lr`` during the warmup);
    - then cosine from ``peak_lr`` to ``min_lr``, reaching it at the task's end ``b_k``.

    With a single task this is exactly ``warmup_cosine(peak_lr, b_0, w_0, min_lr)``. Steps
    past the last boundary stay at ``min_lr``.

    Args:
      warmup_frac: warmup of each task as a fraction of that task's steps (rounded).
      warmup_steps: warmup steps, the same for every task (an int) or one int per task;
        overrides ``warmup_frac`` when not None.
    """
    bounds = _check_boundaries(task_boundaries)
    lengths = np.diff(bounds, prepend=0)
    if warmup_steps is not None:
        warm = _per_task(warmup_steps, bounds.size, "warmup_steps")
    elif warmup_frac is not None and 0.0 <= float(warmup_frac) <= 1.0:
        warm = [int(round(float(warmup_frac) * n)) for n in lengths]
    else:
        raise ValueError(f"warmup_frac={warmup_frac} must be in [0, 1] (or give warmup_steps).")
    for k, (w, n) in enumerate(zip(warm, lengths)):
        if w > n:
            raise ValueError(f"Task {k} has {n} steps but a warmup of {w}; lower "
                             f"warmup_steps/warmup_frac.")
    warm_T = np.asarray(warm, np.int32)
    start_T = np.asarray([0.0] + [min_lr] * (bounds.size - 1), np.float32)
    decay_T = np.maximum(lengths - warm_T, 1).astype(np.float32)

    def schedule(step):
        task, s = _task_of(step, bounds)
        w = jnp.asarray(warm_T)[task]
        s_f = s.astype(jnp.float32)
        start = jnp.asarray(start_T)[task]
        up = start + (peak_lr - start) * (s_f + 1.0) / jnp.maximum(w, 1).astype(jnp.float32)
        frac = jnp.clip((s_f - w.astype(jnp.float32)) / jnp.asarray(decay_T)[task], 0.0, 1.0)
        return jnp.where(s < w, up, _cosine(peak_lr, min_lr, frac))

    return schedule


# ---------------------------------------------------------------------------------------
# Infinite schedule


def infinite(peak_lr: float, task_boundaries: Sequence[int], warmup_steps: int,
             cooldown_steps: int, constant_lr: float, anneal_steps: int | Sequence[int],
             min_lr: float):
    """step -> lr: Ibrahim et al. 2024's "infinite" schedule, with an in-line anneal per task.

    Ibrahim et al. 2024 ("Simple and Scalable Strategies to Continually Pre-train Large
    Language Models", Sec. on infinite LR schedules) avoid re-warming, and with it the
    forgetting a re-warm causes, with four phases; here (global step ``t``):

    1. warmup, once, ``t < W``: linear from 0 to ``peak_lr`` (``peak * (t + 1) / W``);
    2. cooldown, once, ``W <= t < W + C``: cosine from ``peak_lr`` to ``constant_lr``
       (reached at ``t = W + C``);
    3. constant ``constant_lr`` for as long as training goes on, across task boundaries, so
       no later task re-warms;
    4. anneal over the last ``A_k`` steps of each task ``k`` (ending at boundary ``b_k``):
       exponential decay from ``constant_lr`` to ``min_lr``,
       ``constant_lr * (min_lr / constant_lr) ** ((t - (b_k - A_k) + 1) / A_k)``, so the
       task's last step -- the one that yields the checkpoint to release -- runs at exactly
       ``min_lr``.

    In the paper the anneal is a *fork*: the released model is annealed from a checkpoint of
    the constant-LR run, while the main run continues at ``constant_lr`` from the
    un-annealed weights. Here it is done in-line, to cost no extra compute or parameter
    copy: the annealed weights (and optimizer state) at the end of task ``k`` are the
    weights task ``k + 1`` starts from, and the LR jumps from ``min_lr`` back to
    ``constant_lr`` at the boundary, with no warmup. Steps past the last boundary stay at
    ``min_lr``.

    Args:
      task_boundaries: cumulative step counts at the end of each task (static).
      warmup_steps, cooldown_steps: W and C, both inside task 0 and before its anneal.
      anneal_steps: A_k, one int for every task or one int per task (0 = no anneal).
      min_lr: must be > 0 (an exponential decay never reaches 0).
    """
    bounds = _check_boundaries(task_boundaries)
    lengths = np.diff(bounds, prepend=0)
    warmup_steps, cooldown_steps = int(warmup_steps), int(cooldown_steps)
    anneal = _per_task(anneal_steps, bounds.size, "anneal_steps")
    if warmup_steps < 0 or cooldown_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} and cooldown_steps={cooldown_steps} "
                         f"must be >= 0.")
    if not 0.0 < min_lr <= constant_lr:
        raise ValueError(f"The infinite schedule needs 0 < min_lr <= constant_lr, got "
                         f"min_lr={min_lr}, constant_lr={constant_lr} (its anneal is an "
                         f"exponential decay, which never reaches 0: raise min_lr_ratio).")
    for k, (a, n) in enumerate(zip(anneal, lengths)):
        head = warmup_steps + cooldown_steps if k == 0 else 0
        if head + a > n:
            raise ValueError(f"Task {k} has {n} steps, fewer than its "
                             f"{'warmup + cooldown + ' if k == 0 else ''}anneal "
                             f"({head} + {a}); lower them or give the task more steps.")
    anneal_T = np.asarray(anneal, np.int32)
    log_ratio = float(np.log(min_lr / constant_lr))

    def schedule(step):
        task, s = _task_of(step, bounds)
        t = jnp.asarray(step, jnp.int32).astype(jnp.float32)
        up = peak_lr * (t + 1.0) / max(warmup_steps, 1)
        frac = jnp.clip((t - warmup_steps) / max(cooldown_steps, 1), 0.0, 1.0)
        main = jnp.where(t < warmup_steps, up, _cosine(peak_lr, constant_lr, frac))
        a = jnp.asarray(anneal_T)[task]
        n = jnp.asarray(lengths.astype(np.int32))[task]
        into = s - (n - a)  # anneal steps already taken, >= 0 inside the anneal
        prog = jnp.clip((into + 1).astype(jnp.float32) / jnp.maximum(a, 1), 0.0, 1.0)
        return jnp.where(into >= 0, constant_lr * jnp.exp(log_ratio * prog), main)

    return schedule


# ---------------------------------------------------------------------------------------
# From a config


def make_lr_schedule(optim_cfg, task_steps: Sequence[int]):
    """The ``step -> lr`` schedule of ``config.optim`` for tasks of ``task_steps`` steps.

    Keys read (``optim_cfg`` is a ConfigDict or a dict; absent keys take the defaults):

    - ``schedule`` ("cosine"): one of ``SCHEDULES``;
    - ``lr`` (peak), ``min_lr_ratio`` (min_lr = lr * min_lr_ratio);
    - ``warmup_steps`` (None) overrides ``warmup_frac`` (0.01). The fraction is of the
      whole run for "cosine", of each task for "rewarm_cosine", and of task 0 for
      "infinite" (whose warmup and cooldown happen once, in task 0: an infinite schedule
      must not depend on how many tasks follow);
    - "infinite" only: ``cooldown_frac`` (0.1, of task 0's steps), ``constant_lr_ratio``
      (0.5: constant_lr = lr * constant_lr_ratio), ``anneal_frac`` (0.1, of each task's
      steps). Fractions are rounded to whole steps.
    """
    steps = [int(n) for n in task_steps]
    bounds = np.cumsum(steps).tolist()
    get = optim_cfg.get
    kind = get("schedule", "cosine")
    lr = float(optim_cfg["lr"])
    min_lr = lr * float(get("min_lr_ratio", 0.1))
    warmup_steps = get("warmup_steps", None)
    warmup_frac = float(get("warmup_frac", 0.01))
    if kind == "cosine":
        total = int(sum(steps))
        warm = warmup_steps if warmup_steps is not None else round(warmup_frac * total)
        return warmup_cosine(lr, total, warm, min_lr)
    if kind == "rewarm_cosine":
        return rewarm_cosine(lr, bounds, warmup_frac=warmup_frac, warmup_steps=warmup_steps,
                             min_lr=min_lr)
    if kind == "infinite":
        first = steps[0] if steps else 0
        warm = warmup_steps if warmup_steps is not None else round(warmup_frac * first)
        return infinite(lr, bounds, warmup_steps=warm,
                        cooldown_steps=round(float(get("cooldown_frac", 0.1)) * first),
                        constant_lr=lr * float(get("constant_lr_ratio", 0.5)),
                        anneal_steps=[round(float(get("anneal_frac", 0.1)) * n)
                                      for n in steps],
                        min_lr=min_lr)
    raise ValueError(f"optim.schedule={kind!r} is not a known schedule; use one of "
                     f"{list(SCHEDULES)}.")


def make_schedule(opt, task_steps):
    """The learning-rate schedule of ``config.optim`` for tasks of ``task_steps`` steps (an
    int is one task): cosine over the whole sequence, re-warmed per task, or infinite."""
    steps = [task_steps] if isinstance(task_steps, int) else list(task_steps)
    return make_lr_schedule(opt, steps)
