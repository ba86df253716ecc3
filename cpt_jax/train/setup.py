"""Everything a run builds before its first step: tokenizer, prepared data, replay
sampler, mesh, optimizer and shardings (``prepare_run``), and the state it starts from:
a fresh init, pre-trained weights, another run's checkpoint, or this run's own newest
readable checkpoint (``run_start``)."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax import hf, methods, pretrained
from cpt_jax import model as model_lib
from cpt_jax import sharding as sharding_lib
from cpt_jax.core.state import (Placement, abstract_train_state, create_train_state,
                                state_shardings)
from cpt_jax.data import prepare as prepare_lib
from cpt_jax.data import tokenizer as tokenizer_lib
from cpt_jax.data.recipe import Recipe
from cpt_jax.data.rows import ConcatRows
from cpt_jax.optim import transforms
from cpt_jax.optim.schedules import make_schedule
from cpt_jax.replay.rates import nominal_steps, replay_rates, task_steps
from cpt_jax.replay.sampler import ReplaySampler
from cpt_jax.train import checkpoint as checkpoint_lib
from cpt_jax.train.resume import CHECKPOINT_DIR, set_aside, unreadable
from cpt_jax.train.results import Progress


def load_tokenizer(config, domains, data_dir):
    """The run's tokenizer: ``tokenizer.path``, else the pretrained checkpoint's own
    (``cpt_jax.pretrained.tokenizer_path``), else one trained on a sample of all domains."""
    path = pretrained.tokenizer_path(config)
    if path is not None:
        tok = tokenizer_lib.load_tokenizer(path)
    else:
        t = config.tokenizer
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
    check_finite(params, f"init.{'hf' if config.init.hf else 'orbax'}="
                         f"{config.init.hf or config.init.orbax}")
    return params


def check_finite(params, where: str) -> None:
    """ValueError naming the first tensor (and layer) of ``params`` that holds a NaN or an
    infinity: trained weights that are not finite would give a run of NaN losses."""
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        x = np.asarray(jax.device_get(x), np.float32)
        bad = ~np.isfinite(x)
        if bad.any():
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            layer = (f" (layer {int(np.argwhere(bad)[0][0])})"
                     if name.startswith("layers/") else "")
            raise ValueError(f"{where}: tensor {name}{layer} holds {int(bad.sum())} non-finite "
                             "value(s) (NaN or inf); the checkpoint is damaged or diverged: "
                             "start from another one")


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


def random_init_params(config, parts, seed: int | None = None):
    """The randomly initialised model of ``seed`` (default ``config.seed``), sharded like
    the run's parameters: FWT's baseline (Lopez-Paz & Ranzato 2017), also for a run that
    starts pre-trained."""
    init = jax.jit(functools.partial(model_lib.init_params, parts.mcfg),
                   out_shardings=parts.shardings.params)
    return init(jax.random.key(config.seed if seed is None else seed))


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
    placement: Placement  # model config, mesh, rules, the train state's shardings
    composition: methods.Composition  # the selected methods, composed once
    schedule: object
    recipe: Recipe | None = None  # what each domain is for (cpt_jax.data.recipe)
    slot_names: list | None = None  # the sampler's training-row sets, in order

    @property
    def mcfg(self) -> model_lib.LlamaConfig:
        return self.placement.mcfg

    @property
    def mesh(self):
        return self.placement.mesh

    @property
    def shardings(self):
        return self.placement.shardings

    @property
    def tx(self):
        return self.composition.tx


def build_model(config, task_steps) -> tuple[Placement, methods.Composition, object]:
    """(placement, composed methods, learning-rate schedule) of a run config whose tasks
    take ``task_steps`` steps."""
    mcfg = pretrained.model_config(config)
    mesh = sharding_lib.make_mesh(config.mesh.to_dict())
    rules = sharding_lib.rules_from_config(config.sharding_rules)
    schedule = make_schedule(config.optim, task_steps)
    composition = methods.compose(config, mcfg, schedule)
    shardings = state_shardings(mcfg, composition.tx, mesh, rules,
                                teacher=composition.teacher)
    return Placement(mcfg, mesh, rules, shardings), composition, schedule


def prepare_data(config, workdir: str, recipe: Recipe | None = None) -> dict:
    """The run's tokenizer (trained by process 0 first) and prepared domains, in
    ``data.workers`` tokenizer processes per host. In a multi-process run every process
    prepares its share of every domain's units into the shared cache, waits for the
    others, process 0 assembles them (the same files as one process), and every process
    then opens them."""
    is_main = jax.process_index() == 0
    n_proc = jax.process_count()
    domains = [dict(d) for d in config.data.domains]
    recipe = recipe or Recipe.of_config(config)
    data_dir = os.path.expanduser(config.data.cache_dir or os.path.join(workdir, "data"))
    os.makedirs(data_dir, exist_ok=True)
    prepare_lib.sources.use_hash_cache(data_dir)
    if is_main:
        tok = load_tokenizer(config, domains, data_dir)
        # the copy that exports, evaluation and generation of this run use
        tokenizer_lib.save_run_tokenizer(tok, workdir, config.model.max_seq_len)
    checkpoint_lib.sync_processes("cpt_jax_tokenizer_ready")
    if not is_main:  # a cache hit now: never two writers of one tokenizer
        tok = load_tokenizer(config, domains, data_dir)
    kwargs = dict(seq_len=config.seq_len, val_fraction=config.data.val_fraction,
                  seed=config.data.split_seed, val_only=recipe.heldout,
                  workers=config.data.get("workers", 0))
    if n_proc > 1:
        prepare_lib.prepare_domains(domains, tok, data_dir, progress=is_main,
                                    shard=(jax.process_index(), n_proc), finalize=False,
                                    **kwargs)
        checkpoint_lib.sync_processes("cpt_jax_data_shards_prepared")
        if is_main:
            prepare_lib.finalize_domains(domains, tok, data_dir, progress=is_main, **kwargs)
        checkpoint_lib.sync_processes("cpt_jax_data_prepared")
    return prepare_lib.prepare_domains(domains, tok, data_dir, progress=is_main, **kwargs)


def prepare_run(config, workdir: str) -> RunParts:
    """Tokenize and pack the data (process 0 first, the others then read its cache), build
    the sampler, mesh, optimizer and state shardings."""
    domains = [dict(d) for d in config.data.domains]
    names = [d["name"] for d in domains]
    recipe = Recipe.of_config(config)
    prepared = prepare_data(config, workdir, recipe)
    tasks = [dict(t) for t in config.tasks]
    task_names, slot_names = list(recipe.task_names), list(recipe.slots)
    train_sources = [prepared[n]["train"] for n in slot_names]
    task_slots = recipe.task_slots
    if config.joint:  # one task over the union of every task's rows and budget
        train_sources = [ConcatRows([prepared[n]["train"] for n in recipe.trained])]
        tasks = [{"steps": sum(nominal_steps(config, t) for t in tasks)}]
        task_names, slot_names, task_slots = ["joint"], ["joint"], None
    sampler = ReplaySampler([len(s) for s in train_sources], config.global_batch,
                            rate=replay_rates(config, tasks),
                            accounting=config.replay.accounting, seed=config.seed,
                            names=task_names, task_slots=task_slots,
                            slot_names=None if config.joint else slot_names)
    steps = task_steps(config, tasks)
    placement, composition, schedule = build_model(config, steps)
    return RunParts(names=names, eval_order=list(recipe.columns),
                    task_names=task_names, steps=steps, train_sources=train_sources,
                    prepared=prepared, sampler=sampler, placement=placement,
                    composition=composition, schedule=schedule, recipe=recipe,
                    slot_names=slot_names)


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


def warn_replay_without_history(config, parts: RunParts) -> None:
    """replay.rate > 0 replays nothing when no task has an earlier one (a one-task or joint
    run without replay sources): say so once; results.json's compute.replay_tokens records
    the replay done."""
    if config.replay.rate > 0 and len(parts.steps) == 1 and not parts.sampler.first_slot[0]:
        print(f"warning: replay.rate={config.replay.rate} has no effect: this run has one "
              f"task ({parts.task_names[0]}) and so no earlier task to replay; results.json "
              "records replay_tokens=0", file=sys.stderr)


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
    """The state and progress to train from -> (state, progress, the checkpoint's extra
    arrays: {"methods": the methods' memory, "pool": the newest replay pool with its task},
    when stored).

    Resuming: the newest of ``resume_steps`` that can be restored (``peek``: the workdir's
    read-only checkpointer, ``cpt_jax.train.resume.check_resume``); newer damaged ones (and ``damaged``, found unreadable before)
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
            raise unreadable(peek, damaged)
        set_aside(peek, damaged)
        state, progress, _, arrays = restored
        return state, Progress(**progress), arrays
    if config.init.get("checkpoint"):
        directory, step = _checkpoint_dir(config.init.checkpoint)
        source = checkpoint_lib.RunCheckpointer(directory, read_only=True)
        step = source.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"init.checkpoint={config.init.checkpoint}: no complete "
                                    f"checkpoint under {directory}")
        try:
            state, _, _, _ = source.restore(step, abstract)
        except checkpoint_lib.ShapeMismatch as e:
            theirs = (source.read_json(step, "config").get("method") or {}).get("name")
            mine = config.method.name
            if theirs is None or theirs == mine:
                raise
            raise ValueError(
                f"init.checkpoint={config.init.checkpoint}: its train state was made by "
                f"method.name={theirs!r} and this run uses {mine!r}, whose state differs "
                f"({e}); start from its parameters alone with init.orbax (the run's "
                "final_params, save_final_params=True), or keep method.name") from None
        check_finite(state.params, f"init.checkpoint={config.init.checkpoint} (step {step})")
        if not config.init.continue_schedule:  # a new run: its own warmup and decay
            state = state.replace(step=jnp.zeros_like(state.step),
                                  opt_state=transforms.restart_schedule(state.opt_state))
        return state, Progress(), {}
    state, _ = create_train_state(parts.mcfg, parts.tx, parts.mesh, parts.placement.rules,
                                  jax.random.key(config.seed),
                                  params=initial_params(config, parts.mcfg),
                                  teacher=parts.shardings.teacher is not None)
    return state, Progress(), {}
