"""The parts of continual-learning methods that live outside the optax chain.

``make_loss_fn``: the loss of a (micro)batch, cross-entropy plus, on replayed rows, logit
distillation toward a frozen teacher. ``TaskBoundary``: what happens between tasks (teacher
snapshot, L2-anchor move, EWC Fisher estimate), one jitted update of the sharded state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cpt_jax import model as model_lib
from cpt_jax.data.loader import read_rows
from cpt_jax.optim import distill as distill_lib
from cpt_jax.optim import transforms
from cpt_jax.optim.fisher import diag_fisher
from cpt_jax.train.state import TrainState, mesh_context
from cpt_jax.train.step import token_losses


def make_loss_fn(config, mcfg):
    """Loss sum of a (micro)batch: cross-entropy, plus distillation on replayed rows.

    With ``method.distill.weight`` > 0 the replay part adds weight * T^2 *
    KL(teacher || student) at temperature T (Hinton et al. 2015), the teacher being the
    snapshot taken at the last task boundary.
    """
    d = config.method.distill

    def loss_fn(params, batch, teacher=None):
        losses, mask, logits = token_losses(mcfg, params, batch)
        ce = (losses * mask).sum()
        aux = {"tokens": mask.sum(), "ce_sum": ce}
        if teacher is None or not d.weight:
            return ce, aux
        tokens, seg = batch["tokens"], batch["segment_ids"]
        t_logits = jax.lax.stop_gradient(
            model_lib.forward(mcfg, teacher, tokens[:, :-1], seg[:, :-1]))
        kl, _ = distill_lib.kl_distill_loss(logits, t_logits, mask, d.temperature)
        aux["distill"] = kl
        return ce + d.weight * kl, aux

    return loss_fn


class TaskBoundary:
    """What happens between tasks: teacher snapshot, L2 anchor move, EWC Fisher update.

    One jitted function over the sharded state (donated, shardings unchanged).
    """

    def __init__(self, config, mcfg, mesh, rules, shardings: TrainState, train_sources):
        self.config, self.mcfg, self.mesh, self.rules = config, mcfg, mesh, rules
        self.sources = train_sources
        m = config.method
        self.snapshot = m.distill.weight > 0
        self.anchor = m.l2.weight > 0 and m.l2.anchor == "task_start"
        self.ewc = m.ewc.lam > 0
        row_shard = {k: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                     for k in ("tokens", "segment_ids")}
        self._update = jax.jit(self._apply, in_shardings=(shardings, row_shard),
                               out_shardings=shardings, donate_argnums=0)

    def fisher_rows(self, task: int) -> dict:
        """`method.ewc.rows` rows drawn uniformly (seeded) from the replay buffer: the
        training rows of every task before `task`."""
        sizes = np.array([len(s) for s in self.sources[:task]])
        starts = np.concatenate([[0], np.cumsum(sizes)])
        rng = np.random.default_rng([self.config.seed, task, 0xE3C])
        flat = rng.choice(starts[-1], size=self.config.method.ewc.rows,
                          replace=starts[-1] < self.config.method.ewc.rows)
        domain = np.searchsorted(starts, flat, side="right") - 1
        tokens, segs = read_rows(self.sources, domain, flat - starts[domain])
        return {"tokens": tokens, "segment_ids": segs}

    def _apply(self, state: TrainState, rows):
        opt_state, teacher = state.opt_state, state.teacher
        if self.snapshot:
            teacher = jax.tree.map(jnp.copy, state.params)
        if self.anchor:
            opt_state = transforms.set_anchor(opt_state, state.params)
        if self.ewc:
            def row_loss(params, row):
                one = jax.tree.map(lambda x: x[None], row)
                losses, mask, _ = token_losses(self.mcfg, params, one)
                return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)
            fisher = diag_fisher(row_loss, state.params, rows, self.config.method.ewc.chunk)
            opt_state = transforms.set_ewc(opt_state, state.params, fisher,
                                           self.config.method.ewc.decay)
        return state.replace(opt_state=opt_state, teacher=teacher)

    def __call__(self, state: TrainState, task: int) -> TrainState:
        if not (self.snapshot or self.anchor or self.ewc):
            return state
        if self.ewc:
            rows = self.fisher_rows(task)
        else:  # unused placeholder of the same structure
            row_len = self.sources[0].row_len
            rows = {"tokens": np.zeros((1, row_len), np.int32),
                    "segment_ids": np.ones((1, row_len), np.int32)}
        with mesh_context(self.mesh), nn.logical_axis_rules(self.rules):
            return self._update(state, rows)
