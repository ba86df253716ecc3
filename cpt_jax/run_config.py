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
        weight_decay=0.1, clip_norm=1.0))
    c.optim.warmup_steps = ml_collections.FieldReference(None, field_type=int)
    return c
