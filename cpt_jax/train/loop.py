"""The continual pre-training loop: train through an ordered sequence of tasks.

For each task in order the model trains for the task's budget on batches that mix the
task's rows with replayed rows of earlier tasks (``cpt_jax.replay``), evaluates
every domain's validation loss every ``eval.every`` steps and at the end of each task, and
writes ``results.json`` (``cpt_jax.results_file``; every field in docs/results.md),
``metrics.jsonl`` and ``loss_curves.png``.

``run`` reads as: check (the config, the workdir and any checkpoint in it:
``cpt_jax.train.resume.check_resume``), prepare (``cpt_jax.train.setup.prepare_run``),
start (``run_start``), fit (``Trainer.fit``, the step loop) and write. The loop knows the
methods only as their composition (``cpt_jax.methods.compose``): a loss, a chain, a
task-boundary update and their memories. Evaluation, logging, the task-start and task-end
bookkeeping and checkpoints are hooks (``Trainer.add_hook``), registered the same way as a
user's: every N steps, at task starts and at task ends. Checkpoints (``cpt_jax.train.checkpoint.RunCheckpointer``) are saved every
``checkpoint.every`` steps, at every task end and on SIGTERM, only while the run is
healthy. Run again with the same workdir and the run resumes from its latest checkpoint:
the sampler is a function of (seed, task, step, pool), so a resumed run computes exactly
what the uninterrupted one would have, and writes the same results.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from cpt_jax import results_file
from cpt_jax import sharding as sharding_lib
from cpt_jax.data import tokenizer as tokenizer_lib
from cpt_jax.data.loader import BatchLoader, eval_batches, process_row_range, to_global
from cpt_jax.data.rows import ConcatRows
from cpt_jax.errors import CheckpointError, Preempted, TrainingDiverged
from cpt_jax.eval.logging import MetricsLogger, scalars
from cpt_jax.eval.plots import plot_loss_curves
from cpt_jax.eval.wandb_logger import WandbLogger
from cpt_jax.optim import transforms
from cpt_jax.replay import policies
from cpt_jax.replay.buffer import Boundary, ReplayPool, buffer_bytes
from cpt_jax.replay.features import make_feature_step
from cpt_jax.run_config import check_config, check_mesh
from cpt_jax.train import checkpoint as checkpoint_lib
from cpt_jax.train.resume import (CHECKPOINT_DIR, PreemptionWatch, check_position,
                                  check_resume, check_workdir)
from cpt_jax.train.results import Progress, make_results, tokens_by_domain
from cpt_jax.train.setup import (RunParts, check_val_rows, prepare_run, random_init_params,
                                 run_start, starts_pretrained, warn_replay_without_history)
from cpt_jax.train.step import make_eval_step, make_row_loss_step, make_train_step
from cpt_jax.train.workdir_lock import WorkdirLock


def rows_by_task(parts: RunParts) -> list:
    """Each task's training rows, a mixture's components concatenated (the sampler's slots
    regrouped by task): what the methods' task-boundary actions read."""
    out = []
    for slots, _ in parts.sampler.task_slots:
        rows = [parts.train_sources[int(s)] for s in slots]
        out.append(rows[0] if len(rows) == 1 else ConcatRows(rows))
    return out


def check_divergence(metrics: dict, max_bad_steps: int, step: int, ckpt) -> None:
    """Stop the run (TrainingDiverged) once ``max_bad_steps`` consecutive steps were
    skipped (non-finite, a loss spike or an exploding update: no update was applied),
    naming the newest checkpoint, which is healthy (``Trainer.checkpoint`` saves no other
    kind).
    Checked at log steps, so it never syncs the device more often than logging does."""
    bad = int(metrics.get("bad_steps_in_a_row", 0))
    if bad >= max_bad_steps:
        ckpt.wait()
        last = ckpt.latest_step()
        reason = transforms.SKIP_REASONS.get(int(metrics.get("skip_reason", 0)), "bad steps")
        where = (f"the last healthy checkpoint is step {last} in {ckpt.directory}" if last
                 is not None else "no checkpoint was written")
        raise TrainingDiverged(
            f"training diverged: the last {bad} steps up to step {step} were skipped, the "
            f"last for {reason} (optim.max_bad_steps={max_bad_steps}); {where}. Lower "
            "optim.lr, raise optim.warmup_steps or check the data, and rerun in a new "
            "--workdir (init.checkpoint can start from that checkpoint)")


def run(config, workdir: str, *, allow_config_change: bool = False, hooks=()) -> dict:
    """Run the whole task sequence, or resume it from the workdir's latest checkpoint;
    returns (and writes) the results dictionary. ``hooks``: ``Hook``s added to the
    trainer after the built-in ones (``Trainer.add_hook``).

    Raises ConfigMismatch when the workdir's checkpoint was written by a different config
    (unless `allow_config_change`), and Preempted after saving on SIGTERM.
    """
    check_config(config)
    sharding_lib.maybe_initialize_distributed(config)
    check_mesh(config, jax.device_count())
    workdir = check_workdir(workdir)
    with WorkdirLock(workdir, enabled=jax.process_index() == 0):  # one run per workdir
        return _run(config, workdir, allow_config_change, hooks)


def _run(config, workdir: str, allow_config_change: bool, hooks) -> dict:
    """``run`` once the config is checked and the workdir is this process's."""
    config_json = json.loads(config.to_json_best_effort())
    start = check_resume(config, workdir, config_json, allow_config_change)

    parts = prepare_run(config, workdir)
    check_val_rows(config, parts)
    warn_replay_without_history(config, parts)

    state, progress, restored = run_start(config, parts, start.peek, start.steps,
                                          start.damaged)
    check_position(progress, parts.steps, f"workdir {workdir}")
    progress.data_fingerprints = start.fingerprints

    ckpt = run_checkpointer(config, workdir, parts.steps)
    preempt = PreemptionWatch()
    try:
        trainer = Trainer(config, workdir, parts, state, progress, restored, ckpt, preempt,
                          config_json, resumed=bool(start.steps))
        if config.logging.wandb:  # the same scalars as metrics.jsonl, at every event
            trainer.add_hook(WandbLogger(config, workdir, resume_step=trainer.resume_step,
                                         active=jax.process_index() == 0),
                             every=1, task_start=True)
        for hook in hooks:
            trainer.add_hook(hook)
        state, progress = trainer.fit()
    finally:
        preempt.close()
        ckpt.close()  # waits for the last save

    results = make_results(config, parts, progress, config_json)
    if jax.process_index() == 0:
        results_file.write(workdir, results)
        plot_loss_curves(results, os.path.join(workdir, "loss_curves.png"))
    if config.save_final_params:
        own = tokenizer_lib.load_tokenizer(os.path.join(workdir,
                                                        tokenizer_lib.RUN_TOKENIZER_DIR))
        checkpoint_lib.save_params(os.path.join(workdir, "final_params"), parts.mcfg,
                                   state.params, overwrite=True,
                                   tokenizer_sha256=own.sha256)  # each process its shards
    return results


def run_checkpointer(config, workdir: str, steps: list) -> checkpoint_lib.RunCheckpointer:
    """The run's checkpointer: the last ``checkpoint.keep`` checkpoints and the last
    ``checkpoint.keep_task_ends`` task ends (all of them when negative) are kept."""
    ends = [int(e) for e in np.cumsum(steps)]
    c = config.checkpoint
    kept_ends = ends if c.keep_task_ends < 0 else ends[len(ends) - c.keep_task_ends:]
    return checkpoint_lib.RunCheckpointer(os.path.join(workdir, CHECKPOINT_DIR), keep=c.keep,
                                          keep_steps=kept_ends, async_save=c.async_save)


@dataclasses.dataclass
class StepInfo:
    """What a hook sees: where the run is, the event (``"step"``, ``"task_start"`` or
    ``"task_end"``: the last step of a task, with its metrics), the step's device metrics
    ({} at a task start) and ``logged``, the scalars the hooks before this one logged at
    this event (what metrics.jsonl and TensorBoard got: a tracker logs these)."""

    task: int
    name: str
    global_step: int
    end_of_task: bool
    metrics: dict
    event: str = "step"
    logged: dict = dataclasses.field(default_factory=dict)
    host: dict | None = None  # the metrics as Python numbers, once a hook fetched them

    def host_metrics(self) -> dict:
        if self.host is None:
            self.host = scalars(jax.device_get(self.metrics))
        return self.host


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn(info)`` every ``every`` global steps (0: never by count), at every task end
    (``at_task_end``) and at every task start (``at_task_start``). A ``fn`` with a
    ``close()`` is closed when the loop ends, also on an error."""

    fn: Callable[[StepInfo], None]
    every: int = 0
    at_task_end: bool = True
    at_task_start: bool = False

    def __call__(self, info: StepInfo) -> None:
        if info.event == "task_start":
            if self.at_task_start:
                self.fn(info)
        elif (self.every and info.global_step % self.every == 0) or (
                self.at_task_end and info.end_of_task):
            self.fn(info)


class Trainer:
    """Trains from ``progress`` to the end of the task sequence. ``fit`` is the step loop;
    the task-start bookkeeping (boundary update, replay pool, the methods' memories),
    logging, evaluation, the task-end bookkeeping and checkpoints are hooks, in that
    order, ahead of any added with ``add_hook``."""

    def __init__(self, config, workdir, parts: RunParts, state, progress: Progress, restored,
                 ckpt, preempt, config_json, resumed: bool):
        self.config, self.workdir, self.parts = config, workdir, parts
        self.state, self.progress, self.ckpt, self.preempt = state, progress, ckpt, preempt
        self.config_json = config_json
        placement, composition = parts.placement, parts.composition
        self.train_step = make_train_step(placement, composition.tx, config.microbatches,
                                          parts.schedule, loss_fn=composition.loss_fn,
                                          split_grads=composition.split_grads)
        self.boundary = composition.task_boundary(placement, rows_by_task(parts))
        self.eval_step = make_eval_step(placement)
        self.row_loss_step = make_row_loss_step(placement)
        self.memories = composition.memories(placement, parts.train_sources)
        self._restore_memories(restored.get("methods") or {}, resumed)
        if restored.get("pool") is not None:
            pool = dict(restored["pool"])
            parts.sampler.pools[int(pool.pop("task"))] = ReplayPool.from_arrays(pool)
        self.policy = policies.make_policy(config)
        self.feature_step = None
        if set(policies.policy_names(config)) & set(policies.NEEDS_FEATURES):
            self.feature_step = make_feature_step(placement, config.replay.coreset.feature_dim,
                                                  config.seed)
        self.loader = BatchLoader(parts.sampler, parts.train_sources, placement.mesh,
                                  extras=self.memory_extras if self.memories else None)
        self.eval_sets = {n: eval_batches(parts.prepared[n]["val"], config.eval.max_rows,
                                          config.eval.batch, placement.mesh)
                          for n in parts.names}
        # metrics.jsonl + TensorBoard; a resumed run drops what came after its checkpoint
        self.resume_step = progress.global_step + 1 if resumed else None
        self.logger = MetricsLogger(workdir, active=jax.process_index() == 0,
                                    resume_step=self.resume_step)
        self.window = (time.perf_counter(), 0)  # (start, tokens) of the logging window
        self.task_start = time.perf_counter()
        self._logged: dict = {}  # what the current event's hooks logged so far
        self.hooks: list[Hook] = []
        for hook in (Hook(self.start_task, 0, at_task_end=False, at_task_start=True),
                     Hook(self.log, config.log_every), Hook(self.eval_hook, config.eval.every),
                     Hook(self.end_task), Hook(self.checkpoint, 1)):
            self.add_hook(hook)

    def add_hook(self, fn, every: int = 0, *, task_end: bool = True,
                 task_start: bool = False) -> Hook:
        """Call ``fn(info: StepInfo)`` every ``every`` global steps (0: never by count), at
        every task end (``task_end``) and every task start (``task_start``), after the
        hooks added before it. ``fn`` may also be a ``Hook``."""
        hook = fn if isinstance(fn, Hook) else Hook(fn, every, task_end, task_start)
        self.hooks.append(hook)
        return hook

    def record(self, step: int, named: dict) -> None:
        """Log ``named`` scalars at ``step`` to metrics.jsonl and TensorBoard, and to the
        current event's ``StepInfo.logged`` (for the hooks after this one)."""
        self.logger.log(step, named)
        self._logged.update(scalars({k: v for k, v in named.items() if k != "step"}))

    def fire(self, info: StepInfo) -> None:
        """Every hook, in order, on one event."""
        self._logged = info.logged
        for hook in self.hooks:
            hook(info)

    def _restore_memories(self, stored: dict, resumed: bool) -> None:
        for name, memory in self.memories.items():
            if name in stored:
                memory.load_arrays(stored[name])
            elif resumed:
                raise CheckpointError(
                    f"the checkpoint this run resumes from holds no memory of method {name!r} "
                    "(written by an older version); resume with that version, or start a new "
                    "--workdir with init.checkpoint pointing at it")

    def memory_extras(self, task: int, step: int, idx) -> dict:
        """The methods' per-row arrays that ride along in a batch."""
        out = {}
        for memory in self.memories.values():
            out.update(memory.extras(task, step, idx))
        return out

    def evaluate(self, params) -> dict:
        """Token-weighted validation loss of every domain."""
        out = {}
        for n, batches in self.eval_sets.items():
            tot, cnt = 0.0, 0.0
            for b in batches:
                s, c = self.eval_step(params, b)
                tot, cnt = tot + float(s), cnt + float(c)
            if cnt == 0:
                raise ValueError(f"domain {n!r}: its validation rows hold no token to score")
            out[n] = tot / cnt
        return out

    def _per_row(self, step, params, ids) -> np.ndarray:
        """``step(params, batch) -> per-row outputs`` over the training rows with global
        ids ``ids`` [N] (row r of task j is ``starts[j] + r``), in eval-sized batches."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        rows = ConcatRows(self.parts.train_sources)  # global ids, as the sampler's
        size = self.config.eval.batch
        lo, hi = process_row_range(self.parts.mesh, size)
        out = []
        for first in range(0, ids.size, size):
            sel = ids[first:first + size]
            tokens, segs = rows.read(sel)
            pad = ((0, size - sel.size), (0, 0))  # padding rows: segment 0, no loss
            batch = {"tokens": np.pad(tokens, pad)[lo:hi],
                     "segment_ids": np.pad(segs, pad)[lo:hi]}
            result = jax.device_get(step(params, to_global(self.parts.mesh, batch, size, lo)))
            out.append(jax.tree.map(lambda x: np.asarray(x)[:sel.size], result))
        return jax.tree.map(lambda *xs: np.concatenate(xs), *out)

    def score_rows(self, ids) -> np.ndarray:
        """Mean token loss [N] (float64), under the current weights, of the training rows
        with global ids ``ids``: what a replay policy may rank or weight rows by."""
        sums, counts = self._per_row(self.row_loss_step, self.state.params, ids)
        return np.asarray(sums, np.float64) / np.maximum(counts, 1.0)

    def feature_rows(self, ids, init: int | None = None) -> np.ndarray:
        """Projected last-layer gradient features [N, replay.coreset.feature_dim] of the
        training rows ``ids``, at the current weights or (``init`` = i) at the random
        initialisation of seed ``config.seed + 1 + i``."""
        params = (self.state.params if init is None else
                  random_init_params(self.config, self.parts, self.config.seed + 1 + init))
        return self._per_row(self.feature_step, params, ids)

    def start_task(self, info: StepInfo) -> None:
        """Task k's start: the methods' boundary update, the replay pool and the methods'
        memories (unless resumed inside the task, whose pool and memories came with the
        checkpoint)."""
        k = info.task
        self.task_start = time.perf_counter()
        if self.progress.step:
            return
        if k:
            self.state = self.boundary(self.state, k)
        sampler, pool = self.parts.sampler, None
        if sampler.first_slot[k]:  # something earlier to replay
            t0 = time.perf_counter()
            sampler.pools[k] = pool = self.policy.pool(Boundary(
                k, sampler, self.parts.steps, previous=sampler.pools.get(k - 1),
                score_rows=self.score_rows,
                feature_rows=self.feature_rows if self.feature_step else None))
            pool_s = time.perf_counter() - t0
        for memory in self.memories.values():
            memory.task_start(self.state.params, k, pool, sampler.starts)
        if pool is not None:
            self.record(info.global_step, {
                "task": self.parts.task_names[k], "replay_pool_s": pool_s,
                "replay_buffer_rows": pool.memory_rows(),
                "replay_buffer_bytes": buffer_bytes(pool.memory_rows(), self.config.seq_len)})

    def log(self, info: StepInfo) -> None:
        m = dict(info.host_metrics())
        check_divergence(m, self.config.optim.max_bad_steps, info.global_step, self.ckpt)
        start, tokens = self.window
        now = time.perf_counter()
        m.update(step=info.global_step, task=info.name, tokens_per_s=tokens / (now - start))
        self.window = (now, 0)
        self.record(info.global_step, m)
        self.bar.set_postfix(task=info.name, loss=f"{m['loss']:.3f}",
                             tok_s=f"{m['tokens_per_s']:.0f}")

    def eval_hook(self, info: StepInfo) -> None:
        losses = self.evaluate(self.state.params)
        self.progress.eval_curve.append({"step": info.global_step, "task": info.name,
                                         "losses": losses})
        self.record(info.global_step,
                    {"task": info.name, **{f"eval/{n}": v for n, v in losses.items()}})

    def end_task(self, info: StepInfo) -> None:
        p, sampler, k = self.progress, self.parts.sampler, info.task
        n = self.parts.steps[k]
        losses = p.eval_curve[-1]["losses"]
        p.loss_matrix.append([losses[d] for d in self.parts.eval_order])
        p.task_boundaries.append({"task": info.name, "end_step": info.global_step})
        p.task_stats.append({
            "task": info.name, "steps": n,
            "new_tokens": sampler.new_rows_before(k, n) * self.config.seq_len,
            "replay_tokens": sampler.replay_rows_before(k, n) * self.config.seq_len,
            **tokens_by_domain(sampler, k, n, self.parts.slot_names, self.config.seq_len,
                               joint=(self.parts.train_sources[0], self.parts.recipe.trained)
                               if self.config.joint else None)})
        self.record(info.global_step, {"task": info.name,
                                       "task_wall_s": time.perf_counter() - self.task_start})
        p.task, p.step = k + 1, 0

    def healthy(self, info: StepInfo) -> bool:
        """Only weights from applied steps with finite evaluations are ever saved, so the
        newest checkpoint is the one to go back to after a divergence."""
        evals = list(self.progress.eval_curve[-1]["losses"].values())
        return (int(info.host_metrics().get("bad_steps_in_a_row", 0)) == 0
                and bool(np.all(np.isfinite(evals))))

    def checkpoint(self, info: StepInfo) -> None:
        """Every step: save on schedule, at a task end or on preemption (then stop)."""
        g, every = info.global_step, self.config.checkpoint.every
        preempted = self.preempt.reached(g)  # every step: multi-host sync needs it
        if (info.end_of_task or preempted or (every and g % every == 0)) and self.healthy(info):
            t0 = time.perf_counter()
            memory = {n: a for n, a in ((n, m.to_arrays()) for n, m in self.memories.items())
                      if a}
            self.ckpt.save(g, self.state, dataclasses.asdict(self.progress), self.config_json,
                           memory=memory, pool=self.latest_pool(), wait=preempted)
            self.record(g, {"task": info.name,
                            "checkpoint_blocking_s": time.perf_counter() - t0})
        if preempted:
            self.ckpt.wait()
            raise Preempted(self.ckpt.latest_step(), self.workdir)

    def latest_pool(self) -> dict | None:
        """The newest replay pool as checkpoint arrays (with its task): the current task's,
        or at a task end the finished task's, which the next task's policy starts from."""
        pools = self.parts.sampler.pools
        for k in (self.progress.task, self.progress.task - 1):
            if pools.get(k) is not None:
                return {**pools[k].to_arrays(), "task": np.asarray(k, np.int64)}
        return None

    def fit(self):
        """The step loop -> (state, progress) at the end of the task sequence."""
        c, p, steps = self.config, self.progress, self.parts.steps
        if not p.eval_curve:
            p.init_losses = self.evaluate(self.state.params)
            p.init_losses_random = (
                self.evaluate(random_init_params(c, self.parts)) if starts_pretrained(c)
                else p.init_losses)
            p.eval_curve = [{"step": 0, "task": "init", "losses": p.init_losses}]
        self.bar = tqdm(total=sum(steps), initial=p.global_step,
                        disable=jax.process_index() != 0, dynamic_ncols=True)
        try:
            for k in range(p.task, len(steps)):
                name = self.parts.task_names[k]
                self.fire(StepInfo(k, name, p.global_step, False, {}, event="task_start"))
                for step, batch in enumerate(self.loader.iterate(k, p.step, steps[k]),
                                             start=p.step):
                    if self.memories:
                        idx = self.parts.sampler.batch(k, step)
                        for memory in self.memories.values():
                            memory.before_step(self.state.params, k, idx)
                    # the split pass's gradient statistics only where the log hook
                    # reads them (the same condition as Hook(self.log, c.log_every))
                    g = p.global_step + 1
                    end = step == steps[k] - 1
                    log_step = bool(c.log_every and g % c.log_every == 0) or end
                    self.state, metrics = self.train_step(self.state, batch.arrays,
                                                          batch.n_replay, stats=log_step)
                    p.step, p.global_step = step + 1, p.global_step + 1
                    start, tokens = self.window
                    self.window = (start, tokens + c.global_batch * c.seq_len)
                    self.bar.update(1)
                    self.fire(StepInfo(k, name, p.global_step, end, metrics,
                                       event="task_end" if end else "step"))
        finally:
            self.bar.close()
            self.logger.close()
            for hook in self.hooks:
                close = getattr(hook.fn, "close", None)
                if close is not None:
                    close()
        return self.state, p
