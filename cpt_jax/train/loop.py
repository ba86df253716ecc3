"""The continual pre-training loop: train through an ordered sequence of tasks.

For each task in order the model trains for the task's budget on batches that mix the
task's rows with replayed rows of earlier tasks (``cpt_jax.data.sampler``), evaluates
every domain's validation loss every ``eval.every`` steps and at the end of each task, and
writes ``results.json`` (schema in DESIGN.md), ``metrics.jsonl`` and ``loss_curves.png``.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from cpt_jax import hf
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
from cpt_jax.run_config import check_config
from cpt_jax.train import checkpoint as checkpoint_lib
from cpt_jax.train.methods import DERRecorder, TaskBoundary, make_loss_fn
from cpt_jax.train.state import create_train_state
from cpt_jax.train.step import make_eval_step, make_train_step


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def load_tokenizer(config, domains, data_dir):
    """The run's tokenizer: an existing .model, or one trained on a sample of all domains."""
    t = config.tokenizer
    if t.path:
        tok = tokenizer_lib.load_tokenizer(os.path.expanduser(t.path))
    else:
        prefix = os.path.join(data_dir, f"tokenizer-{t.model_type}-{config.model.vocab_size}")
        tok = tokenizer_lib.train_tokenizer(
            domains, prefix, config.model.vocab_size, model_type=t.model_type,
            character_coverage=t.character_coverage, sample_chars=t.sample_chars)
    tokenizer_lib.check_vocab(tok, config.model.vocab_size)
    return tok


def initial_params(config, mcfg):
    """Parameters to start from: None (fresh init), a Hugging Face directory or an orbax one."""
    if config.init.hf and config.init.orbax:
        raise ValueError("set only one of init.hf and init.orbax")
    if config.init.hf:
        cfg, params = hf.load_hf_llama(config.init.hf)
    elif config.init.orbax:
        cfg, params = checkpoint_lib.load_params(config.init.orbax, expected_config=mcfg)
    else:
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


def check_divergence(metrics: dict, max_bad_steps: int, step: int) -> None:
    """Stop the run once `max_bad_steps` consecutive steps had non-finite gradients (they
    were skipped: no update was applied). Checked at log steps, so it never syncs the
    device more often than logging does."""
    bad = int(metrics.get("bad_steps_in_a_row", 0))
    if bad >= max_bad_steps:
        raise FloatingPointError(
            f"training diverged: the last {bad} steps up to step {step} had NaN/Inf "
            f"gradients and were skipped (optim.max_bad_steps={max_bad_steps}); lower "
            "optim.lr, raise optim.warmup_steps or check the data")


def nominal_steps(config, task: dict) -> int:
    """A task's budget in replay-free steps (its step budget, or tokens / batch tokens)."""
    if task.get("steps") is not None:
        return int(task["steps"])
    return -(-int(task["tokens"]) // (config.global_batch * config.seq_len))


def replay_rates(config, tasks):
    """The sampler's replay rate: a constant, or one decaying schedule per task."""
    r = config.replay
    if config.joint:
        return 0.0
    if r.schedule == "constant":
        return r.rate
    return [replay_rate_schedule(r.schedule, r.rate, nominal_steps(config, t), r.end_rate)
            for t in tasks]


def run(config, workdir: str) -> dict:
    """Run the whole task sequence; returns (and writes) the results dictionary."""
    check_config(config)
    sharding_lib.maybe_initialize_distributed(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0

    # ---- data
    domains = [dict(d) for d in config.data.domains]
    names = [d["name"] for d in domains]
    data_dir = os.path.expanduser(config.data.cache_dir or os.path.join(workdir, "data"))
    os.makedirs(data_dir, exist_ok=True)
    tok = load_tokenizer(config, domains, data_dir)
    prepared = prepare_lib.prepare_domains(domains, tok, data_dir, config.seq_len,
                                           config.data.val_fraction, config.data.split_seed,
                                           progress=is_main)
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
    total_steps = sum(steps)

    # ---- model, mesh, state
    mcfg = model_lib.LlamaConfig.from_dict(config.model.to_dict())
    mesh = sharding_lib.make_mesh(config.mesh.to_dict())
    rules = sharding_lib.rules_from_config(config.sharding_rules)
    schedule = make_schedule(config.optim, steps)
    tx = make_optimizer(config, schedule)
    distill = config.method.distill.weight > 0
    state, shardings = create_train_state(mcfg, tx, mesh, rules, jax.random.key(config.seed),
                                          params=initial_params(config, mcfg), teacher=distill)
    train_step = make_train_step(mcfg, tx, mesh, shardings, rules, config.microbatches,
                                 schedule, loss_fn=make_loss_fn(config, mcfg))
    boundary = TaskBoundary(config, mcfg, mesh, rules, shardings, train_sources)
    eval_step = make_eval_step(mcfg, mesh, shardings, rules)
    der = (DERRecorder(config, mcfg, mesh, rules, shardings, train_sources)
           if config.method.der.weight else None)
    loader = BatchLoader(sampler, train_sources, mesh, extras=der.extras if der else None)
    eval_order = [t["domain"] for t in config.tasks]  # loss matrix columns
    eval_sets = {n: eval_batches(prepared[n]["val"], config.eval.max_rows,
                                 config.eval.batch, mesh) for n in names}

    def evaluate(params) -> dict:
        out = {}
        for n, batches in eval_sets.items():
            tot, cnt = 0.0, 0.0
            for b in batches:
                s, c = eval_step(params, b)
                tot, cnt = tot + float(s), cnt + float(c)
            out[n] = tot / max(cnt, 1.0)
        return out

    # ---- the task sequence
    logger = MetricsLogger(workdir, active=is_main)  # metrics.jsonl + TensorBoard events
    init_losses = evaluate(state.params)
    eval_curve = [{"step": 0, "task": "init", "losses": init_losses}]
    loss_matrix, boundaries, task_stats = [], [], []
    global_step = 0
    tokens_per_row = config.seq_len
    bar = tqdm(total=total_steps, disable=not is_main, dynamic_ncols=True)
    for k, task in enumerate(tasks):
        name = task_names[k]
        if k > 0:
            state = boundary(state, k)
        t_start = time.perf_counter()
        n_new = n_replay = 0
        window_t, window_tok = time.perf_counter(), 0
        for step, batch in enumerate(loader.iterate(k, 0, steps[k])):
            n_rep = sampler.n_replay(k, step)
            if der:
                der.record(state.params, k, sampler.batch(k, step))
            state, m = train_step(state, batch, n_rep)
            global_step += 1
            n_replay += n_rep * tokens_per_row
            n_new += (config.global_batch - n_rep) * tokens_per_row
            window_tok += config.global_batch * tokens_per_row
            if global_step % config.log_every == 0 or step == steps[k] - 1:
                m = scalars(jax.device_get(m))
                check_divergence(m, config.optim.max_bad_steps, global_step)
                now = time.perf_counter()
                m.update(step=global_step, task=name, tokens_per_s=window_tok / (now - window_t))
                window_t, window_tok = now, 0
                logger.log(global_step, m)
                bar.set_postfix(task=name, loss=f"{m['loss']:.3f}",
                                tok_s=f"{m['tokens_per_s']:.0f}")
            bar.update(1)
            end_of_task = step == steps[k] - 1
            if end_of_task or (config.eval.every and global_step % config.eval.every == 0):
                losses = evaluate(state.params)
                eval_curve.append({"step": global_step, "task": name, "losses": losses})
                logger.log(global_step, {"task": name,
                                         **{f"eval/{n}": v for n, v in losses.items()}})
                if end_of_task:
                    loss_matrix.append([losses[n] for n in eval_order])
        boundaries.append({"task": name, "end_step": global_step})
        task_stats.append({"task": name, "steps": steps[k], "new_tokens": n_new,
                           "replay_tokens": n_replay,
                           "wall_s": round(time.perf_counter() - t_start, 2)})
    bar.close()
    logger.close()
    task_stats, compute = metrics_lib.with_flops(task_stats, mcfg, config.seq_len)

    results = {
        "domains": names,
        "tasks": task_names,
        "method": config.method.name,
        "loss_matrix": loss_matrix,
        "init_losses": init_losses,
        "eval_curve": eval_curve,
        "task_boundaries": boundaries,
        "task_stats": task_stats,
        "compute": compute,
        "config": json.loads(config.to_json_best_effort()),
    }
    results["metrics"] = metrics_lib.metrics_from_results(results)
    if is_main:
        write_json_atomic(os.path.join(workdir, "results.json"), results)
        plot_loss_curves(results, os.path.join(workdir, "loss_curves.png"))
    if config.save_final_params:
        checkpoint_lib.save_params(os.path.join(workdir, "final_params"), mcfg,
                                   jax.device_get(state.params))
    return results
