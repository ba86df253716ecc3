"""The base optimizer of every run: AdamW (Abbes et al. 2025: betas (0.9, 0.95), eps 1e-8,
weight decay 0.1), which ``cpt_jax.methods.compose`` wraps with the selected methods'
pieces, global-norm clipping and the step guard.

Weight decay applies to every weight matrix and the embeddings, not to the RMSNorm scales
(``decay_mask``), as GPT-style pre-training code decays every parameter of two or more
dimensions; a test pins this.
"""

from __future__ import annotations

import jax
import optax


def decay_mask(params):
    """True for weight matrices and embeddings; False for norm scales (leaves named 'scale')."""
    def keep(path, _):
        return getattr(path[-1], "key", None) != "scale"
    return jax.tree_util.tree_map_with_path(keep, params)


def base_optimizer(opt, schedule) -> optax.GradientTransformation:
    return optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                       weight_decay=opt.weight_decay, mask=decay_mask)
