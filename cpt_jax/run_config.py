"""The default run configuration; every file in configs/ starts from it.

One ConfigDict describes a whole run: model shape, mesh and sharding rules, optimizer,
batch, data (domains, tokenizer) and the task sequence. A run is a pure function of it.
"""

from __future__ import annotations

import os

import ml_collections

from cpt_jax import methods, pretrained
from cpt_jax import sharding as sharding_lib
from cpt_jax.data import sources as sources_lib
from cpt_jax.data import tokenizer as tokenizer_lib
from cpt_jax.eval import wandb_logger
from cpt_jax.model import LlamaConfig
from cpt_jax.optim.schedules import SCHEDULES
from cpt_jax.replay import policies
from cpt_jax.replay.rates import RATE_SCHEDULES


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Model: fields of cpt_jax.model.LlamaConfig. The keys of pretrained.MODEL_DEFAULTS
    # (shape, rope_theta, rope_scaling, norm_eps, tie_embeddings, max_seq_len) are None
    # until set: from the checkpoint with init.hf / init.orbax / init.checkpoint (a set value
    # must agree with it), else the defaults (cpt_jax.pretrained.resolve_model).
    c.model = ml_collections.ConfigDict(dict(
        init_std=0.02, dtype="float32", param_dtype="float32", remat="none", scan_layers=True,
        attention="auto"))
    for key, value in pretrained.MODEL_DEFAULTS.items():
        kind = {"rope_scaling": dict, "head_dim": int}.get(key, type(value))
        c.model[key] = ml_collections.FieldReference(None, field_type=kind)

    # Devices: mesh sizes over (data, fsdp, tensor); -1 takes the remaining devices.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = [[name, list(axes) if isinstance(axes, tuple) else axes]
                        for name, axes in sharding_lib.DEFAULT_RULES]
    c.distributed = ml_collections.ConfigDict(dict(
        enabled=False, coordinator_address="", num_processes=0, process_id=-1))

    # Batch: global_batch rows of seq_len + 1 tokens, split into microbatches in the step.
    c.seq_len = 2048
    c.global_batch = 32
    c.microbatches = 1

    # Optimizer (Abbes et al. 2025): AdamW (0.9, 0.95), eps 1e-8, wd 0.1, clip 1.0,
    # warmup 1% then cosine to min_lr over the whole task sequence.
    c.optim = ml_collections.ConfigDict(dict(
        lr=3e-4, min_lr_ratio=0.1, warmup_frac=0.01, b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.1, clip_norm=1.0,
        # "cosine" (one over the whole sequence), "rewarm_cosine" (per task, Ibrahim et al.
        # 2024) or "infinite" (warmup, cooldown, constant, anneal at each task's end).
        schedule="cosine", cooldown_frac=0.1, constant_lr_ratio=0.5, anneal_frac=0.1,
        # Steps with a non-finite gradient are skipped; this many in a row stop the run.
        max_bad_steps=10,
        # Loss-spike guard: a step is skipped (and counted like a non-finite one) when its
        # loss exceeds loss_spike_factor x the median of the task's recent losses, or when
        # its update is larger than max_update_ratio x the weights' norm. 0 turns either off.
        loss_spike_factor=3.0, max_update_ratio=1.0))
    c.optim.warmup_steps = ml_collections.FieldReference(None, field_type=int)

    # Data: named text domains (cpt_jax.data.sources), prepared once into a cache.
    c.data = ml_collections.ConfigDict(dict(
        domains=[],  # e.g. [{"name": "en", "kind": "jsonl", "pattern": "...", "field": "text"}]
        cache_dir="",  # "" = <workdir>/data
        val_fraction=0.05, split_seed=0,
        # tokenizer processes per host for preparation (0 = the machine's cores); the
        # prepared files are the same for any number
        workers=0))
    # Tokenizer: a SentencePiece .model, a Hugging Face tokenizer.json, or a directory
    # holding either. Empty: the pretrained checkpoint's own (init.*), else one trained on
    # all domains (model_type, character_coverage, sample_chars: cpt_jax.data.tokenizer).
    c.tokenizer = ml_collections.ConfigDict(dict(
        path="", model_type="bpe", character_coverage=0.9995, sample_chars=2_000_000))
    # Tasks in order: {"domain": name, "steps": n} or {"domain": name, "tokens": n}, or a
    # weighted mixture {"domains": {name: weight, ...}, "steps": n} (optional "name").
    # Domains of data.domains that no task trains are replay sources (replay.sources) or
    # held out (only evaluated); every domain is a column of the loss matrix.
    c.tasks = []
    # Replay (Abbes et al. 2025): fraction of each batch drawn from earlier tasks.
    # schedule: "constant", or "linear_decay" / "exp_decay" from rate to end_rate over the
    # whole run, from task 1 to the last task's end (mix-review, He et al. 2021).
    # policy (cpt_jax.replay.policies): which earlier rows may be replayed and in what
    # proportions: "uniform" (all), "reservoir", "domains", "resample", "curriculum",
    # "craig", "grad_match", "hybrid"; buffer_rows bounds the rows a policy keeps.
    # sources: domains never trained, replayable from task 0 on as if trained before it
    # (an original-data proxy of a pre-trained model).
    c.replay = ml_collections.ConfigDict(dict(
        rate=0.0, accounting="additive", schedule="constant", end_rate=0.0,
        policy="uniform", buffer_rows=0, sources=[],
        domains=dict(tau=1.0, recency=0.0),
        resample=dict(every=20),
        curriculum=dict(order="easy_first"),
        coreset=dict(candidates=4096, feature_dim=256, random_inits=0),
        hybrid=dict(policies=["craig", "reservoir"], shares=[0.5, 0.5])))
    # Joint training on the union of all tasks' data (the upper reference): one task.
    c.joint = False
    # Continual-learning methods (cpt_jax.methods): method.name selects them, joined with
    # "+" ("replay", "replay+reptile" = MER, "agem", "replay+ewc", ...); their keys live under
    # method.<name> (e.g. method.reptile.periods, method.ewc.lam).
    c.method = methods.default_config()
    c.eval = ml_collections.ConfigDict(dict(every=100, max_rows=64, batch=16))
    # Starting point: fresh init; parameters from a Hugging Face directory (hf) or a params
    # checkpoint (orbax) with a new optimizer state; or the whole train state of another
    # run's checkpoint (checkpoint: its workdir, or one checkpoints/STEP directory). From a
    # checkpoint the new run restarts the learning-rate schedule (Adam moments kept) unless
    # continue_schedule, which carries the old run's schedule position over.
    c.init = ml_collections.ConfigDict(dict(hf="", orbax="", checkpoint="",
                                            continue_schedule=False))
    # Run checkpoints in <workdir>/checkpoints: every `every` steps (0: only at task ends),
    # at every task end and on SIGTERM or Ctrl-C; the last `keep` are kept, plus the task
    # ends: all of them (keep_task_ends=-1), or those of the last keep_task_ends tasks.
    # async_save: write in the background while training goes on.
    c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, keep_task_ends=-1,
                                                  async_save=True))
    c.name = ""
    # Trackers beside metrics.jsonl and TensorBoard: Weights & Biases (logging.wandb=True,
    # cpt_jax.eval.wandb_logger), off by default.
    c.logging = wandb_logger.default_config()
    c.log_every = 10
    c.save_final_params = False
    return c


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_config(c) -> None:
    """Reject a config that cannot run, naming the key and the fix, before any work is
    done (no tokenizer trained, no data prepared, no workdir written)."""
    pretrained.resolve_model(c)
    try:
        LlamaConfig.from_dict(c.model.to_dict())
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.model: {e}") from None
    for key in ("seq_len", "global_batch", "microbatches", "log_every"):
        _need(isinstance(c[key], int) and c[key] >= 1, f"{key}={c[key]} must be an integer >= 1")
    _need(c.global_batch % c.microbatches == 0,
          f"global_batch={c.global_batch} is not divisible by microbatches={c.microbatches}")
    _need(c.seq_len <= c.model.max_seq_len,
          f"seq_len={c.seq_len} exceeds model.max_seq_len={c.model.max_seq_len}")

    r = c.replay
    _need(0.0 <= r.rate <= 1.0, f"replay.rate={r.rate} must be in [0, 1] (the fraction of "
          "each batch replayed from earlier tasks)")
    _need(0.0 <= r.end_rate <= 1.0, f"replay.end_rate={r.end_rate} must be in [0, 1]")
    _need(r.accounting in ("additive", "compute_equivalent"),
          f"replay.accounting={r.accounting!r}: use 'additive' or 'compute_equivalent'")
    _need(r.schedule in RATE_SCHEDULES,
          f"replay.schedule={r.schedule!r}: use one of {list(RATE_SCHEDULES)}")
    policies.check(c)

    o = c.optim
    _need(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    _need(o.schedule in SCHEDULES, f"optim.schedule={o.schedule!r}: use one of {list(SCHEDULES)}")
    _need(0.0 <= o.warmup_frac < 1.0, f"optim.warmup_frac={o.warmup_frac} must be in [0, 1)")
    _need(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _need(o.clip_norm > 0, f"optim.clip_norm={o.clip_norm} must be > 0")
    _need(o.max_bad_steps >= 1, f"optim.max_bad_steps={o.max_bad_steps} must be >= 1")
    _need(o.loss_spike_factor == 0 or o.loss_spike_factor > 1,
          f"optim.loss_spike_factor={o.loss_spike_factor} must be > 1 (0 turns the guard off)")
    _need(o.max_update_ratio >= 0,
          f"optim.max_update_ratio={o.max_update_ratio} must be >= 0 (0 turns the guard off)")

    for d in c.data.domains:
        sources_lib.normalize_domain(d)  # names the domain and the missing or unknown key
    names = [d["name"] for d in c.data.domains]
    dup = sorted({n for n in names if names.count(n) > 1})
    _need(not dup, f"data.domains: duplicate domain name(s) {dup}; names must be unique")
    _need(0.0 < c.data.val_fraction < 1.0,
          f"data.val_fraction={c.data.val_fraction} must be in (0, 1): every domain needs "
          "validation rows for the loss matrix")
    workers = c.data.get("workers", 0)
    _need(isinstance(workers, int) and workers >= 0,
          f"data.workers={workers!r} must be an int >= 0 (0 = the machine's cores)")
    _need(c.eval.max_rows >= 1 and c.eval.batch >= 1 and c.eval.every >= 0,
          f"eval.max_rows={c.eval.max_rows} and eval.batch={c.eval.batch} must be >= 1 "
          f"(every domain is evaluated on up to max_rows rows) and eval.every="
          f"{c.eval.every} >= 0")
    t = c.tokenizer
    _need(t.model_type in ("bpe", "unigram"),
          f"tokenizer.model_type={t.model_type!r}: use 'bpe' or 'unigram'")
    _need(not t.path or os.path.exists(os.path.expanduser(t.path)),
          f"tokenizer.path={t.path!r} does not exist; give a SentencePiece .model, a Hugging "
          "Face tokenizer.json or a checkpoint directory holding either, or leave it empty "
          "(the pretrained checkpoint's own tokenizer, or one trained on the domains)")
    tok_path = pretrained.tokenizer_path(c)
    if tok_path is not None:  # refused now, before any data is prepared
        tokenizer_lib.check_vocab(tokenizer_lib.load_tokenizer(tok_path), c.model.vocab_size)

    _need(bool(c.tasks), "tasks is empty: list the domains to train on, in order")
    _check_tasks(c.tasks, names)
    tnames = [d for t in c.tasks for d in (t.get("domains") or [t.get("domain")])]
    dup = sorted({n for n in tnames if tnames.count(n) > 1})
    _need(not dup, f"tasks: domain(s) {dup} appear twice; each task trains on its own "
          "domain once")
    _check_replay_sources(c, names, tnames)
    for t in c.tasks:
        budget = t.get("steps", t.get("tokens"))
        _need(isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1,
              f"task {t}: its budget must be a positive integer")

    methods.check(c)
    wandb_logger.check(c)

    _need(c.checkpoint.every >= 0 and c.checkpoint.keep >= 1,
          f"checkpoint.every={c.checkpoint.every} must be >= 0 (0: only at task ends) and "
          f"checkpoint.keep={c.checkpoint.keep} >= 1")
    _need(isinstance(c.checkpoint.keep_task_ends, int) and c.checkpoint.keep_task_ends >= -1,
          f"checkpoint.keep_task_ends={c.checkpoint.keep_task_ends} must be -1 (every task "
          "end) or the number of last task ends to keep (0: none beyond checkpoint.keep)")


def _check_tasks(tasks, names) -> None:
    """Each task names one domain, or a mixture of domains with positive weights."""
    for t in tasks:
        unknown = sorted(set(t) - {"domain", "domains", "name", "steps", "tokens"})
        _need(not unknown, f"task {t}: unknown key(s) {unknown}; use domain (or domains, a "
              "{name: weight} mixture), steps or tokens")
        _need(("domain" in t) != ("domains" in t), f"task {t}: give exactly one of domain "
              "and domains (a mixture such as {'de_web': 0.8, 'de_wiki': 0.2})")
        mix = t.get("domains")
        if mix is not None:
            _need(hasattr(mix, "values") and len(mix) >= 1 and all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0
                for w in mix.values()),
                f"task {t}: domains must map each domain name to a positive weight")
        for d in (mix or [t.get("domain")]):
            _need(d in names, f"task {t}: domain {d!r} is not in data.domains {names}")
        _need(("steps" in t) != ("tokens" in t), f"task {t}: give exactly one budget, steps "
              "or tokens")


def _check_replay_sources(c, names, trained) -> None:
    """replay.sources: domains of data.domains that no task trains, each once."""
    sources = list(c.replay.get("sources") or [])
    for d in sources:
        _need(d in names, f"replay.sources: {d!r} is not in data.domains {names}")
        _need(d not in trained, f"replay.sources: {d!r} is trained by a task; a replay "
              "source is replayed only (remove it from the tasks or from replay.sources)")
    _need(len(set(sources)) == len(sources), f"replay.sources {sources} lists a domain twice")


def check_mesh(c, n_devices: int) -> None:
    """The mesh fits the devices and every (micro)batch splits evenly over its batch shards."""
    shape = dict(zip(sharding_lib.MESH_AXES, sharding_lib.mesh_shape(c.mesh.to_dict(),
                                                                      n_devices)))
    shards = shape["data"] * shape["fsdp"]
    micro = c.global_batch // c.microbatches
    _need(micro % shards == 0,
          f"global_batch={c.global_batch} / microbatches={c.microbatches} = {micro} rows do not "
          f"split over the {shards} batch shards of mesh {shape}; make global_batch a multiple "
          f"of {shards * c.microbatches} or change mesh")
