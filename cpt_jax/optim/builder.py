"""Build the optax chain of a run from its config.

The base optimizer is AdamW with global-norm clipping (Abbes et al. 2025: betas (0.9, 0.95),
eps 1e-8, weight decay 0.1 on weight matrices only, clip 1.0, warmup then cosine). Methods
from ``cpt_jax.optim`` wrap around it in the same ``optax.chain``.
"""

from __future__ import annotations

import jax
import optax

from cpt_jax.optim.schedules import warmup_cosine


def decay_mask(params):
    """True for weight matrices and embeddings; False for norm scales (leaves named 'scale')."""
    def keep(path, _):
        return getattr(path[-1], "key", None) != "scale"
    return jax.tree_util.tree_map_with_path(keep, params)


def make_schedule(opt, total_steps: int):
    warmup = opt.warmup_steps if opt.get("warmup_steps") is not None else round(
        opt.warmup_frac * total_steps)
    return warmup_cosine(opt.lr, total_steps, warmup, opt.lr * opt.min_lr_ratio)


def make_optimizer(opt, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule) from a config.optim ConfigDict."""
    schedule = make_schedule(opt, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(opt.clip_norm),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                    weight_decay=opt.weight_decay, mask=decay_mask),
    )
