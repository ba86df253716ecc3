"""The default run configuration; every file in configs/ starts from it.

One ConfigDict describes a whole run: model shape, mesh and sharding rules, optimizer,
batch, data (domains, tokenizer) and the task sequence. A run is a pure function of it.
"""

from __future__ import annotations

import ml_collections

from cpt_jax import sharding as sharding_lib


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Model: fields of cpt_jax.model.LlamaConfig.
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=32000, d_model=512, n_layers=16, n_heads=8, n_kv_heads=8, d_ff=1280,
        head_dim=None, rope_theta=10000.0, rope_scaling=None, norm_eps=1e-5,
        tie_embeddings=False, max_seq_len=2048, init_std=0.02, dtype="float32",
        param_dtype="float32", remat="none", scan_layers=True))
    c.model.rope_scaling = ml_collections.FieldReference(None, field_type=dict)
    c.model.head_dim = ml_collections.FieldReference(None, field_type=int)

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
        max_bad_steps=10))
    c.optim.warmup_steps = ml_collections.FieldReference(None, field_type=int)

    # Data: named text domains (cpt_jax.data.sources), prepared once into a cache.
    c.data = ml_collections.ConfigDict(dict(
        domains=[],  # e.g. [{"name": "en", "kind": "jsonl", "pattern": "...", "field": "text"}]
        cache_dir="",  # "" = <workdir>/data
        val_fraction=0.05, split_seed=0))
    # Tokenizer: an existing sentencepiece .model, or one trained on all domains.
    c.tokenizer = ml_collections.ConfigDict(dict(
        path="", model_type="bpe", character_coverage=0.9995, sample_chars=2_000_000))
    # Tasks in order: {"domain": name, "steps": n} or {"domain": name, "tokens": n}.
    c.tasks = []
    # Replay (Abbes et al. 2025): fraction of each batch drawn from earlier tasks.
    # schedule: "constant", or "linear_decay" / "exp_decay" from rate to end_rate over the
    # whole run, from task 1 to the last task's end (mix-review, He et al. 2021).
    c.replay = ml_collections.ConfigDict(dict(rate=0.0, accounting="additive",
                                              schedule="constant", end_rate=0.0))
    # Joint training on the union of all tasks' data (the upper reference): one task.
    c.joint = False
    # Continual-learning method (cpt_jax.optim.builder): a few keys, not a new trainer.
    c.method = ml_collections.ConfigDict()
    c.method.name = "replay"  # a label for reports
    # Per-source gradient weights (current, replay); None = token-proportional, i.e. the
    # gradient of the mixed batch's mean loss.
    c.method.mix_weights = ml_collections.FieldReference(None, field_type=list)
    c.method.agem = ml_collections.ConfigDict(dict(enabled=False, add_replay=False))
    # MER / Reptile: a list of {"every": k, "meta_lr": eps}; two entries = original MER.
    # meta_lr is Nichol's outer step size, the fraction of each period's displacement KEPT:
    # theta <- theta_slow + meta_lr (theta - theta_slow). Written (1-eps) theta + eps
    # theta_slow (a pull-back of eps), the same update keeps 1 - eps: meta_lr = 1 - eps.
    c.method.reptile = []
    c.method.reptile_reset_moments = False
    c.method.l2 = ml_collections.ConfigDict(dict(weight=0.0, anchor="init"))  # or task_start
    c.method.ewc = ml_collections.ConfigDict(dict(lam=0.0, decay=1.0, rows=64, chunk=4))
    # Logit distillation on replayed rows from a teacher snapshot taken at each task boundary.
    c.method.distill = ml_collections.ConfigDict(dict(weight=0.0, temperature=2.0))
    # Dark Experience Replay: top-k logits of a seeded subset of rows, matched on replay.
    c.method.der = ml_collections.ConfigDict(dict(weight=0.0, k=32, rows_per_domain=1024))
    c.eval = ml_collections.ConfigDict(dict(every=100, max_rows=64, batch=16))
    # Starting point: fresh init; parameters from a Hugging Face directory (hf) or a params
    # checkpoint (orbax) with a new optimizer state; or the whole train state of another
    # run's checkpoint (checkpoint: its workdir, or one checkpoints/STEP directory). From a
    # checkpoint the new run restarts the learning-rate schedule (Adam moments kept) unless
    # continue_schedule, which carries the old run's schedule position over.
    c.init = ml_collections.ConfigDict(dict(hf="", orbax="", checkpoint="",
                                            continue_schedule=False))
    # Run checkpoints in <workdir>/checkpoints: every `every` steps (0: only at task ends),
    # at every task end and on SIGTERM; the last `keep` plus every task end are kept.
    # async_save: write in the background while training goes on.
    c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True))
    c.name = ""
    c.log_every = 10
    c.save_final_params = False
    return c


def check_config(c) -> None:
    """Reject configs that cannot run, naming the key and the fix."""
    if not 0.0 <= c.replay.rate <= 1.0:
        raise ValueError(f"replay.rate={c.replay.rate} must be in [0, 1] "
                         "(the fraction of each batch replayed from earlier tasks)")
    if c.replay.accounting not in ("additive", "compute_equivalent"):
        raise ValueError(f"replay.accounting={c.replay.accounting!r}: use 'additive' or "
                         "'compute_equivalent'")
    names = [d["name"] for d in c.data.domains]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"data.domains: duplicate domain name(s) {dup}; names must be unique")
    if not c.tasks:
        raise ValueError("tasks is empty: list the domains to train on, in order")
    tnames = [t.get("domain") for t in c.tasks]
    dup = sorted({n for n in tnames if tnames.count(n) > 1})
    if dup:
        raise ValueError(f"tasks: domain(s) {dup} appear twice; each task trains on its own "
                         "domain once")
    for t in c.tasks:
        unknown = sorted(set(t) - {"domain", "steps", "tokens"})
        if unknown:
            raise ValueError(f"task {t}: unknown key(s) {unknown}; use domain, steps or tokens")
        if t.get("domain") not in names:
            raise ValueError(f"task {t}: domain {t.get('domain')!r} is not in data.domains "
                             f"{names}")
        if ("steps" in t) == ("tokens" in t):
            raise ValueError(f"task {t}: give exactly one budget, steps or tokens")
    if c.method.l2.anchor not in ("init", "task_start"):
        raise ValueError(f"method.l2.anchor={c.method.l2.anchor!r}: use 'init' (the weights the "
                         "run starts from) or 'task_start'")
    for r in c.method.reptile:
        if set(r) != {"every", "meta_lr"} or int(r["every"]) < 1:
            raise ValueError(f"method.reptile entry {r}: give {{'every': k >= 1, 'meta_lr': eps}}")
    given = [f"init.{k}" for k in ("hf", "orbax", "checkpoint") if c.init.get(k)]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} are all set: start from only one of them")
    if c.checkpoint.every < 0 or c.checkpoint.keep < 1:
        raise ValueError(f"checkpoint.every={c.checkpoint.every} must be >= 0 (0: only at "
                         f"task ends) and checkpoint.keep={c.checkpoint.keep} >= 1")
    if c.global_batch % c.microbatches:
        raise ValueError(f"global_batch={c.global_batch} is not divisible by "
                         f"microbatches={c.microbatches}")
    if c.seq_len > c.model.max_seq_len:
        raise ValueError(f"seq_len={c.seq_len} exceeds model.max_seq_len={c.model.max_seq_len}")
