"""The continual pre-training loop: train through an ordered sequence of tasks.

For each task in order the model trains for the task's budget on batches that mix the
task's rows with replayed rows of earlier tasks (``cpt_jax.data.sampler``), evaluates
every domain's validation loss every ``eval.every`` steps and at the end of each task, and
writes ``results.json`` (schema in DESIGN.md), ``metrics.jsonl`` and ``loss_curves.png``.

Checkpoints (``cpt_jax.train.checkpoint.RunCheckpointer``) are saved every
``checkpoint.every`` steps, at every task end and on SIGTERM. Run again with the same
workdir and the run resumes from its latest checkpoint: the sampler is a function of
(seed, task, step), so a resumed run computes exactly what the uninterrupted one would
have, and writes the same results.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cpt_jax import atomic, hf
from cpt_jax import model as model_lib
from cpt_jax import sharding as sharding_lib
from cpt_jax.data import prepare as prepare_lib
from cpt_jax.data import tokenizer as tokenizer_lib
from cpt_jax.data.loader import BatchLoader, eval_batches
from cpt_jax.data.mixing import ConcatRows, replay_rate_schedule
from cpt_jax.data.sampler import ReplaySampler
from cpt_jax.eval import metrics as metrics_lib
from cpt_jax.eval.logging import MetricsLogger
from cpt_jax.eval.plots import plot_loss_curves
from cpt_jax.optim.builder import make_optimizer, make_schedule
from cpt_jax.optim import transforms
from cpt_jax.optim.distill import DERStore
from cpt_jax.run_config import check_config, check_mesh
from cpt_jax.train import checkpoint as checkpoint_lib
from cpt_jax.train.methods import DERRecorder, TaskBoundary, make_loss_fn
from cpt_jax.train.resume import (ConfigMismatch, PreemptionWatch, Preempted, TrainingDiverged,
                                  check_resume_config, check_same_data, check_workdir,
                                  data_fingerprints)
from cpt_jax.train.state import abstract_train_state, create_train_state, state_shardings
from cpt_jax.train.step import make_eval_step, make_train_step


def load_tokenizer(config, domains, data_dir):
    """The run's tokenizer: an existing .model, or one trained on a sample of all domains."""
    t = config.tokenizer
    if t.path:
        tok = tokenizer_lib.load_tokenizer(os.path.expanduser(t.path))
    else:
        prefix = tokenizer_lib.trained_prefix(data_dir, t.model_type, config.model.vocab_size)
        tok = tokenizer_lib.train_tokenizer(
            domains, prefix, config.model.vocab_size, model_type=t.model_type,
            character_coverage=t.character_coverage, sample_chars=t.sample_chars)
    tokenizer_lib.check_vocab(tok, config.model.vocab_size)
    return tok


def initial_params(config, mcfg):
    """Parameters to start from: None (fresh init), a Hugging Face directory or an orbax one."""
    if config.init.hf:
        cfg, params = hf.load_hf_llama(config.init.hf)
    elif config.init.orbax:
        cfg, params = checkpoint_lib.load_params(config.init.orbax, expected_config=mcfg)
    else:  # fresh init, or init.checkpoint (the whole state, restored in run_start)
        return None
    _check_same_shape(cfg, mcfg, config.init.hf or config.init.orbax)
    return params


def _check_same_shape(loaded: model_lib.LlamaConfig, wanted: model_lib.LlamaConfig, path):
    keys = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
            "dim_per_head", "tie_embeddings")
    diff = {k: (getattr(loaded, k), getattr(wanted, k)) for k in keys
            if getattr(loaded, k) != getattr(wanted, k)}
    if diff:
        raise ValueError(f"checkpoint {path} does not match config.model: "
                         + ", ".join(f"{k}: checkpoint {a} vs config {b}"
                                     for k, (a, b) in diff.items()))


def starts_pretrained(config) -> bool:
    """True when the run starts from trained weights (init.hf, init.orbax, init.checkpoint)."""
    return any(config.init.get(k) for k in ("hf", "orbax", "checkpoint"))


def random_init_params(config, parts):
    """The randomly initialised model of ``config.seed``, sharded like the run's parameters:
    FWT's baseline (Lopez-Paz & Ranzato 2017), also for a run that starts pre-trained."""
    init = jax.jit(functools.partial(model_lib.init_params, parts.mcfg),
                   out_shardings=parts.shardings.params)
    return init(jax.random.key(config.seed))


def scalars(metrics: dict) -> dict:
    """Flatten step metrics to floats; a vector v (e.g. per-layer cosines) -> key/i."""
    out = {}
    for key, v in metrics.items():
        v = np.asarray(v)
        if v.ndim:
            out.update({f"{key}/{i}": float(x) for i, x in enumerate(v)})
        else:
            out[key] = float(v)
    return out


def check_divergence(metrics: dict, max_bad_steps: int, step: int, ckpt) -> None:
    """Stop the run (TrainingDiverged) once ``max_bad_steps`` consecutive steps were
    skipped (non-finite, a loss spike or an exploding update: no update was applied),
    naming the newest checkpoint, which is healthy (``train`` saves no other kind).
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


def check_val_rows(config, parts) -> None:
    """Every domain must have validation rows: a domain without them would be reported as
    loss 0.000 in every row of the loss matrix."""
    for name in parts.names:
        val = parts.prepared[name]["val"]
        if len(val) == 0:
            meta = val.meta
            raise ValueError(
                f"domain {name!r} has no validation rows: its {meta['n_documents']} "
                f"document(s) all went to training with data.val_fraction="
                f"{config.data.val_fraction}, in {os.path.dirname(val.path)} (prepared by an "
                "older version, which did not hold out part of a single document). Delete "
                "that folder to prepare it again, add documents or raise data.val_fraction")


def nominal_steps(config, task: dict) -> int:
    """A task's budget in replay-free steps (its step budget, or tokens / batch tokens)."""
    if task.get("steps") is not None:
        return int(task["steps"])
    return -(-int(task["tokens"]) // (config.global_batch * config.seq_len))


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
    starts = np.concatenate([[0], np.cumsum(nominal[1:])]).astype(int)  # task k >= 1
    decay = replay_rate_schedule(r.schedule, r.rate, max(int(starts[-1]), 1), r.end_rate)

    def task_rate(k):
        offset = int(starts[k - 1]) if k else 0
        return lambda step: decay(offset + int(step))

    return [task_rate(k) for k in range(len(tasks))]


CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass
class Progress:
    """Where the run stands and what it has measured: saved (as JSON) with every checkpoint.

    ``task``/``step``: the next step to run is step ``step`` of task ``task`` (``task`` ==
    number of tasks once the run is done); ``step`` == 0 means the task's boundary update
    (teacher snapshot, anchors, Fisher) has not been applied yet.
    """

    task: int = 0
    step: int = 0
    global_step: int = 0
    data_fingerprints: dict | None = None  # resume.data_fingerprints of the run's data
    init_losses: dict = dataclasses.field(default_factory=dict)  # the starting model
    init_losses_random: dict = dataclasses.field(default_factory=dict)  # FWT's baseline
    eval_curve: list = dataclasses.field(default_factory=list)
    loss_matrix: list = dataclasses.field(default_factory=list)
    task_boundaries: list = dataclasses.field(default_factory=list)
    task_stats: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RunParts:
    """Everything `run` builds from the config before training: data, model, steps."""

    names: list  # domains, in data.domains order
    eval_order: list  # loss matrix columns
    task_names: list
    steps: list  # steps of each task
    train_sources: list
    prepared: dict
    sampler: ReplaySampler
    mcfg: model_lib.LlamaConfig
    mesh: object
    rules: object
    tx: object
    schedule: object
    shardings: object


def prepare_run(config, workdir: str) -> RunParts:
    """Tokenize and pack the data (process 0 first, the others then read its cache), build
    the sampler, mesh, optimizer and state shardings."""
    is_main = jax.process_index() == 0
    domains = [dict(d) for d in config.data.domains]
    names = [d["name"] for d in domains]
    data_dir = os.path.expanduser(config.data.cache_dir or os.path.join(workdir, "data"))
    os.makedirs(data_dir, exist_ok=True)

    def prepare():
        tok = load_tokenizer(config, domains, data_dir)
        return prepare_lib.prepare_domains(domains, tok, data_dir, config.seq_len,
                                           config.data.val_fraction, config.data.split_seed,
                                           progress=is_main)

    if is_main:
        prepared = prepare()
    checkpoint_lib.sync_processes("cpt_jax_data_prepared")
    if not is_main:  # a cache hit now: never two writers on one cache
        prepared = prepare()
    tasks = [dict(t) for t in config.tasks]
    task_names = [t["domain"] for t in tasks]
    train_sources = [prepared[n]["train"] for n in task_names]
    if config.joint:  # one task over the union of every task's rows and budget
        train_sources = [ConcatRows(train_sources)]
        tasks = [{"steps": sum(nominal_steps(config, t) for t in tasks)}]
        task_names = ["joint"]
    sampler = ReplaySampler([len(s) for s in train_sources], config.global_batch,
                            rate=replay_rates(config, tasks),
                            accounting=config.replay.accounting, seed=config.seed,
                            names=task_names)
    steps = [sampler.steps_in_task(k, budget_tokens=t.get("tokens"),
                                   budget_steps=t.get("steps"), seq_len=config.seq_len)
             for k, t in enumerate(tasks)]
    mcfg = model_lib.LlamaConfig.from_dict(config.model.to_dict())
    mesh = sharding_lib.make_mesh(config.mesh.to_dict())
    rules = sharding_lib.rules_from_config(config.sharding_rules)
    schedule = make_schedule(config.optim, steps)
    tx = make_optimizer(config, schedule)
    shardings = state_shardings(mcfg, tx, mesh, rules, teacher=config.method.distill.weight > 0)
    return RunParts(names=names, eval_order=[t["domain"] for t in config.tasks],
                    task_names=task_names, steps=steps, train_sources=train_sources,
                    prepared=prepared, sampler=sampler, mcfg=mcfg, mesh=mesh, rules=rules,
                    tx=tx, schedule=schedule, shardings=shardings)


def _checkpoint_dir(path: str) -> tuple[str, int | None]:
    """init.checkpoint: a run's workdir, its checkpoints/ directory, or one step directory
    in it -> (checkpoints directory, step or None for the latest)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        return os.path.join(path, CHECKPOINT_DIR), None
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(path):
        return os.path.dirname(path), int(base)
    return path, None


def run_start(config, parts: RunParts, peek, resume_steps, damaged=()):
    """The state and progress to train from -> (state, progress, DER arrays or None).

    Resuming: the newest of ``resume_steps`` that can be restored (``peek``: the workdir's
    read-only checkpointer); newer damaged ones (and ``damaged``, found unreadable before)
    are moved aside with a warning. Otherwise a fresh init, parameters from
    init.hf / init.orbax with a new optimizer state, or the whole state of another run's
    checkpoint (init.checkpoint: optimizer moments, counters and Reptile/EWC state carry
    over; the new run's progress starts at step 0, and so does its learning-rate schedule
    unless init.continue_schedule).
    """
    abstract = abstract_train_state(parts.mcfg, parts.tx, parts.shardings)
    if resume_steps:
        step, restored, more = checkpoint_lib.newest_readable(
            resume_steps, lambda s: peek.restore(s, abstract))
        damaged = [*damaged, *more]
        if step is None:
            raise checkpoint_lib.CheckpointError(
                f"no checkpoint in {peek.directory} can be read ({_damage(damaged)}); delete "
                f"{peek.directory} to start the run over")
        set_aside(peek, damaged)
        state, progress, _, der = restored
        return state, Progress(**progress), der
    if config.init.get("checkpoint"):
        directory, step = _checkpoint_dir(config.init.checkpoint)
        source = checkpoint_lib.RunCheckpointer(directory, read_only=True)
        step = source.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"init.checkpoint={config.init.checkpoint}: no complete "
                                    f"checkpoint under {directory}")
        state, _, _, _ = source.restore(step, abstract)
        if not config.init.continue_schedule:  # a new run: its own warmup and decay
            state = state.replace(step=jnp.zeros_like(state.step),
                                  opt_state=transforms.restart_schedule(state.opt_state))
        return state, Progress(), None
    state, _ = create_train_state(parts.mcfg, parts.tx, parts.mesh, parts.rules,
                                  jax.random.key(config.seed),
                                  params=initial_params(config, parts.mcfg),
                                  teacher=parts.shardings.teacher is not None)
    return state, Progress(), None


def _damage(damaged) -> str:
    return "; ".join(f"step {s}: {' '.join(str(e).split())[:200]}" for s, e in damaged)


def set_aside(peek, damaged) -> None:
    """Move damaged checkpoints out of the way (process 0), saying so."""
    if jax.process_index() == 0:
        for step, e in damaged:
            moved = peek.move_aside(step)
            print(f"warning: checkpoint {peek.directory / str(step)} is damaged "
                  f"({' '.join(str(e).split())[:200]}); moved it to {moved} and resumed from "
                  "the previous one", file=sys.stderr)
    checkpoint_lib.sync_processes("cpt_jax_damaged_set_aside")


def readable_checkpoints(peek) -> tuple[list[int], dict, dict, list]:
    """The workdir's checkpoint steps up to the newest whose JSON items can be read, that
    one's config and progress, and the damaged newer ones (set aside once a checkpoint
    is restored)."""
    step, items, damaged = checkpoint_lib.newest_readable(
        peek.step_dirs(), lambda s: (peek.read_json(s, "config"), peek.read_json(s, "progress")))
    if step is None and damaged:
        raise checkpoint_lib.CheckpointError(
            f"no checkpoint in {peek.directory} can be read ({_damage(damaged)}); delete "
            f"{peek.directory} to start the run over")
    if step is None:
        return [], {}, {}, []
    return [s for s in peek.step_dirs() if s <= step], items[0], items[1], damaged


def check_position(progress: Progress, steps: list, where: str) -> None:
    """A resumed run's position must exist in the (possibly changed) task list."""
    if progress.task > len(steps) or (progress.task < len(steps)
                                       and progress.step > steps[progress.task]):
        raise ConfigMismatch(
            f"{where} is at step {progress.step} of task {progress.task}, beyond the new task "
            f"list ({len(steps)} tasks of {steps} steps); use a new --workdir for this task "
            "list (init.checkpoint can start from that checkpoint)")


def run(config, workdir: str, *, allow_config_change: bool = False) -> dict:
    """Run the whole task sequence, or resume it from the workdir's latest checkpoint;
    returns (and writes) the results dictionary.

    Raises ConfigMismatch when the workdir's checkpoint was written by a different config
    (unless `allow_config_change`), and Preempted after saving on SIGTERM.
    """
    check_config(config)
    sharding_lib.maybe_initialize_distributed(config)
    check_mesh(config, jax.device_count())
    workdir = check_workdir(workdir)
    config_json = json.loads(config.to_json_best_effort())
    fingerprints = data_fingerprints(config)
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    resume_steps, peek, damaged = [], None, []
    if os.path.isdir(ckpt_dir):  # check before any data is prepared
        peek = checkpoint_lib.RunCheckpointer(ckpt_dir, read_only=True)
        resume_steps, stored_config, stored_progress, damaged = readable_checkpoints(peek)
        if resume_steps:
            where = f"workdir {workdir} (checkpoint of step {resume_steps[-1]})"
            check_resume_config(stored_config, config_json, where, allow_config_change)
            check_same_data(stored_progress.get("data_fingerprints"), fingerprints, where,
                            allow_config_change)
    results_path = os.path.join(workdir, "results.json")
    if not resume_steps and os.path.exists(results_path):  # results but no checkpoint
        with open(results_path) as f:
            written_by = json.load(f).get("config", {})
        check_resume_config(written_by, config_json, f"workdir {workdir} (its results.json)",
                            allow_config_change)

    parts = prepare_run(config, workdir)
    check_val_rows(config, parts)
    warn_replay_without_history(config, parts)
    state, progress, der_arrays = run_start(config, parts, peek, resume_steps, damaged)
    check_position(progress, parts.steps, f"workdir {workdir}")
    progress.data_fingerprints = fingerprints
    ends = [int(e) for e in np.cumsum(parts.steps)]
    c = config.checkpoint
    ckpt = checkpoint_lib.RunCheckpointer(ckpt_dir, keep=c.keep, keep_steps=ends,
                                          async_save=c.async_save)
    preempt = PreemptionWatch()
    try:
        state, progress = train(config, workdir, parts, state, progress, der_arrays, ckpt,
                                preempt, config_json, resumed=bool(resume_steps))
    finally:
        preempt.close()
        ckpt.close()  # waits for the last save

    results = make_results(config, parts, progress, config_json)
    if jax.process_index() == 0:
        atomic.write_json(results_path, results)
        plot_loss_curves(results, os.path.join(workdir, "loss_curves.png"))
    if config.save_final_params:
        checkpoint_lib.save_params(os.path.join(workdir, "final_params"), parts.mcfg,
                                   state.params, overwrite=True)  # each process its shards
    return results


def warn_replay_without_history(config, parts: RunParts) -> None:
    """replay.rate > 0 replays nothing when no task has an earlier one (a one-task or joint
    run): say so once; results.json's compute.replay_tokens records the replay done."""
    if config.replay.rate > 0 and len(parts.steps) == 1:
        print(f"warning: replay.rate={config.replay.rate} has no effect: this run has one "
              f"task ({parts.task_names[0]}) and so no earlier task to replay; results.json "
              "records replay_tokens=0", file=sys.stderr)


def train(config, workdir, parts: RunParts, state, progress: Progress, der_arrays, ckpt,
          preempt, config_json, resumed: bool):
    """Train from `progress` to the end of the task sequence, checkpointing on the way."""
    is_main = jax.process_index() == 0
    mcfg, mesh, rules, shardings = parts.mcfg, parts.mesh, parts.rules, parts.shardings
    sampler, steps = parts.sampler, parts.steps
    train_step = make_train_step(mcfg, parts.tx, mesh, shardings, rules, config.microbatches,
                                 parts.schedule, loss_fn=make_loss_fn(config, mcfg))
    boundary = TaskBoundary(config, mcfg, mesh, rules, shardings, parts.train_sources)
    eval_step = make_eval_step(mcfg, mesh, shardings, rules)
    der = (DERRecorder(config, mcfg, mesh, rules, shardings, parts.train_sources)
           if config.method.der.weight else None)
    if der and der_arrays is not None:
        der.store = DERStore.from_arrays(der_arrays)
    loader = BatchLoader(sampler, parts.train_sources, mesh, extras=der.extras if der else None)
    eval_sets = {n: eval_batches(parts.prepared[n]["val"], config.eval.max_rows,
                                 config.eval.batch, mesh) for n in parts.names}

    def evaluate(params) -> dict:
        out = {}
        for n, batches in eval_sets.items():
            tot, cnt = 0.0, 0.0
            for b in batches:
                s, c = eval_step(params, b)
                tot, cnt = tot + float(s), cnt + float(c)
            if cnt == 0:
                raise ValueError(f"domain {n!r}: its validation rows hold no token to score")
            out[n] = tot / cnt
        return out

    def healthy(m) -> bool:
        """Only weights from applied steps with finite evaluations are ever saved, so the
        newest checkpoint is the one to go back to after a divergence."""
        if m is None:
            m = scalars(jax.device_get(metrics))
        evals = progress.eval_curve[-1]["losses"].values()
        return int(m.get("bad_steps_in_a_row", 0)) == 0 and all(np.isfinite(list(evals)))

    def save(wait=False):
        t0 = time.perf_counter()
        ckpt.save(progress.global_step, state, dataclasses.asdict(progress), config_json,
                  der.store.to_arrays() if der else None, wait=wait)
        return time.perf_counter() - t0

    # metrics.jsonl + TensorBoard events; a resumed run drops what came after its checkpoint
    logger = MetricsLogger(workdir, active=is_main,
                           resume_step=progress.global_step + 1 if resumed else None)
    if not progress.eval_curve:
        progress.init_losses = evaluate(state.params)
        progress.init_losses_random = (
            evaluate(random_init_params(config, parts)) if starts_pretrained(config)
            else progress.init_losses)
        progress.eval_curve = [{"step": 0, "task": "init", "losses": progress.init_losses}]
    bar = tqdm(total=sum(steps), initial=progress.global_step, disable=not is_main,
               dynamic_ncols=True)
    try:
        for k in range(progress.task, len(steps)):
            name = parts.task_names[k]
            if k > 0 and progress.step == 0:
                state = boundary(state, k)
            t_start = time.perf_counter()
            window_t, window_tok = time.perf_counter(), 0
            for step, batch in enumerate(loader.iterate(k, progress.step, steps[k]),
                                         start=progress.step):
                n_rep = sampler.n_replay(k, step)
                if der:
                    der.record(state.params, k, sampler.batch(k, step))
                state, metrics = train_step(state, batch, n_rep)
                m = None
                progress.step, progress.global_step = step + 1, progress.global_step + 1
                g = progress.global_step
                window_tok += config.global_batch * config.seq_len
                end_of_task = step == steps[k] - 1
                if g % config.log_every == 0 or end_of_task:
                    m = scalars(jax.device_get(metrics))
                    check_divergence(m, config.optim.max_bad_steps, g, ckpt)
                    now = time.perf_counter()
                    m.update(step=g, task=name, tokens_per_s=window_tok / (now - window_t))
                    window_t, window_tok = now, 0
                    logger.log(g, m)
                    bar.set_postfix(task=name, loss=f"{m['loss']:.3f}",
                                    tok_s=f"{m['tokens_per_s']:.0f}")
                bar.update(1)
                if end_of_task or (config.eval.every and g % config.eval.every == 0):
                    losses = evaluate(state.params)
                    progress.eval_curve.append({"step": g, "task": name, "losses": losses})
                    logger.log(g, {"task": name, **{f"eval/{n}": v for n, v in losses.items()}})
                if end_of_task:
                    progress.loss_matrix.append([losses[n] for n in parts.eval_order])
                    progress.task_boundaries.append({"task": name, "end_step": g})
                    progress.task_stats.append({
                        "task": name, "steps": steps[k],
                        "new_tokens": sampler.new_rows_before(k, steps[k]) * config.seq_len,
                        "replay_tokens": sampler.replay_rows_before(k, steps[k])
                        * config.seq_len})
                    logger.log(g, {"task": name,
                                   "task_wall_s": time.perf_counter() - t_start})
                    progress.task, progress.step = k + 1, 0
                preempted = preempt.reached(g)  # every step: multi-host sync needs it
                every = config.checkpoint.every
                if (end_of_task or preempted or (every and g % every == 0)) and healthy(m):
                    blocked = save(wait=preempted)
                    logger.log(g, {"task": name, "checkpoint_blocking_s": blocked})
                if preempted:
                    ckpt.wait()
                    raise Preempted(ckpt.latest_step(), workdir)
    finally:
        bar.close()
        logger.close()
    return state, progress


def make_results(config, parts: RunParts, progress: Progress, config_json: dict) -> dict:
    """results.json (schema in DESIGN.md): a pure function of the config, no wall times."""
    task_stats, compute = metrics_lib.with_flops(progress.task_stats, parts.mcfg,
                                                 config.seq_len)
    results = {
        "domains": parts.names,
        "tasks": parts.task_names,
        "method": config.method.name,
        "loss_matrix": progress.loss_matrix,
        "init_losses": progress.init_losses,
        "init_losses_random": progress.init_losses_random,
        "eval_curve": progress.eval_curve,
        "task_boundaries": progress.task_boundaries,
        "task_stats": task_stats,
        "compute": compute,
        "config": config_json,
    }
    results["metrics"] = metrics_lib.metrics_from_results(results)
    return results
