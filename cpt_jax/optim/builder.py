"""Build the optax chain of a run from its config.

    guard_steps(
        combine (replay_mix | agem) -> [regularizers: l2_anchor, ewc] -> clip_by_global_norm
        -> AdamW(schedule) [wrapped, e.g. Reptile's moment reset]
        -> [outer: reptile(every_1, meta_lr_1) -> reptile(every_2, meta_lr_2) ...])

with the pieces of the methods ``method.name`` selects (``cpt_jax.methods``).

A bad step (NaN/Inf gradients, a loss spike, an update out of proportion to the weights;
``transforms.guard_steps``) is skipped whole (no update, no state change) and counted; the
loop stops the run after ``optim.max_bad_steps`` consecutive skipped steps.

The base optimizer is AdamW with global-norm clipping (Abbes et al. 2025: betas (0.9, 0.95),
eps 1e-8, weight decay 0.1, clip 1.0). Weight decay applies to every weight matrix and the
embeddings, not to the RMSNorm scales (``decay_mask``), as GPT-style pre-training code
decays every parameter of two or more dimensions; a test pins this. The first element
combines the step's per-source gradients; regularisers add their gradients before clipping
(they are part of the loss); Reptile acts on the optimizer's update (MER). Config keys:
``optim.*`` for the base optimizer, ``method.*`` for the continual-learning pieces.
"""

from __future__ import annotations

import jax
import optax

from cpt_jax.optim import transforms
from cpt_jax.optim.schedules import make_lr_schedule


def decay_mask(params):
    """True for weight matrices and embeddings; False for norm scales (leaves named 'scale')."""
    def keep(path, _):
        return getattr(path[-1], "key", None) != "scale"
    return jax.tree_util.tree_map_with_path(keep, params)


def make_schedule(opt, task_steps):
    """The learning-rate schedule of ``config.optim`` for tasks of ``task_steps`` steps (an
    int is one task): cosine over the whole sequence, re-warmed per task, or infinite."""
    steps = [task_steps] if isinstance(task_steps, int) else list(task_steps)
    return make_lr_schedule(opt, steps)


def base_optimizer(opt, schedule) -> optax.GradientTransformation:
    return optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                       weight_decay=opt.weight_decay, mask=decay_mask)


def make_optimizer(config, schedule) -> optax.GradientTransformation:
    """The whole chain for a run config: the selected methods' pieces (``cpt_jax.methods``)
    around clipping and the base optimizer, inside the step guard."""
    from cpt_jax import methods  # methods build on this module's base optimizer

    opt = config.optim
    chosen = methods.selected(config)
    chain = [m.combine(config) for m in chosen if m.combine]
    chain += [m.regularize(config) for m in chosen if m.regularize]
    chain.append(optax.clip_by_global_norm(opt.clip_norm))
    base = base_optimizer(opt, schedule)
    for m in chosen:
        if m.wrap_base:
            base = m.wrap_base(config, base)
    chain.append(base)
    for m in chosen:
        if m.outer:
            chain.extend(m.outer(config))
    return transforms.guard_steps(optax.chain(*chain), opt.loss_spike_factor,
                                  opt.max_update_ratio)
