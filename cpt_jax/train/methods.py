"""The parts of continual-learning methods that live outside the optax chain.

``make_loss_fn``: the loss of a (micro)batch, cross-entropy plus, on replayed rows, logit
distillation toward a frozen teacher and DER's logit matching. ``TaskBoundary``: what
happens between tasks (teacher snapshot, L2-anchor move, EWC Fisher estimate), one jitted
update of the sharded state. ``DERRecorder``: DER's memory of top-k logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax import model as model_lib
from cpt_jax import sharding as sharding_lib
from cpt_jax.optim import distill as distill_lib
from cpt_jax.optim import transforms
from cpt_jax.optim.fisher import diag_fisher
from cpt_jax.replay.permutation import draw_rows
from cpt_jax.train.state import TrainState
from cpt_jax.train.step import token_losses


def make_loss_fn(config, mcfg):
    """Loss sum of a (micro)batch: cross-entropy, plus distillation on replayed rows.

    With ``method.distill.weight`` > 0 the replay part adds weight * T^2 *
    KL(teacher || student) at temperature T (Hinton et al. 2015), the teacher being the
    snapshot taken at the last task boundary. With ``method.der.weight`` > 0 replayed rows
    that have stored top-k logits add weight * DER's logit MSE (Buzzega et al. 2020).
    """
    d, der = config.method.distill, config.method.der

    def loss_fn(params, batch, teacher=None, replay=False):
        losses, mask, logits = token_losses(mcfg, params, batch)
        ce = (losses * mask).sum()
        aux = {"tokens": mask.sum(), "ce_sum": ce}
        total = ce
        if replay and der.weight:
            der_mask = mask * batch["der_valid"].astype(jnp.float32)[:, None]
            se, _ = distill_lib.der_loss(logits, batch["der_values"], batch["der_indices"],
                                         der_mask)
            aux["der"] = se
            total = total + der.weight * se
        if teacher is None or not d.weight:
            return total, aux
        tokens, seg = batch["tokens"], batch["segment_ids"]
        t_logits = jax.lax.stop_gradient(
            model_lib.forward(mcfg, teacher, tokens[:, :-1], seg[:, :-1]))
        kl, _ = distill_lib.kl_distill_loss(logits, t_logits, mask, d.temperature)
        aux["distill"] = kl
        return total + d.weight * kl, aux

    return loss_fn


class TaskBoundary:
    """What happens between tasks: teacher snapshot, L2 anchor move, EWC Fisher update
    (online EWC: F <- decay * F + F of the task just finished, at the current weights), and
    a fresh loss history for the spike guard.

    One jitted function over the sharded state (donated, shardings unchanged).
    """

    def __init__(self, config, mcfg, mesh, rules, shardings: TrainState, train_sources):
        self.config, self.mcfg, self.mesh, self.rules = config, mcfg, mesh, rules
        self.sources = train_sources
        m = config.method
        self.snapshot = m.distill.weight > 0
        self.anchor = m.l2.weight > 0 and m.l2.anchor == "task_start"
        self.ewc = m.ewc.lam > 0
        row_shard = {k: sharding_lib.replicated(mesh) for k in ("tokens", "segment_ids")}
        self._update = jax.jit(self._apply, in_shardings=(shardings, row_shard),
                               out_shardings=shardings, donate_argnums=0)

    def fisher_rows(self, task: int) -> dict:
        """`method.ewc.rows` distinct rows (all of them, repeated, if it has fewer) of the
        task just finished, drawn by the run's keyed permutation, `task - 1`: online EWC adds each task's Fisher once (Schwarz
        et al. 2018); the earlier tasks' Fisher is already in the running sum."""
        source = self.sources[task - 1]
        n = self.config.method.ewc.rows
        rows = draw_rows(self.config.seed, "ewc", task, n, len(source))
        rows = np.resize(rows, n)  # a task with fewer rows than asked: each row again
        tokens, segs = source.read(rows)
        return {"tokens": tokens, "segment_ids": segs}

    def _apply(self, state: TrainState, rows):
        # a new domain's loss legitimately jumps: the spike guard starts its history afresh
        opt_state, teacher = transforms.reset_loss_history(state.opt_state), state.teacher
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
        if self.ewc:
            rows = self.fisher_rows(task)
        else:  # unused placeholder of the same structure
            row_len = self.sources[0].row_len
            rows = {"tokens": np.zeros((1, row_len), np.int32),
                    "segment_ids": np.ones((1, row_len), np.int32)}
        with sharding_lib.activate(self.mesh, self.rules):
            return self._update(state, rows)


class DERRecorder:
    """Dark Experience Replay's memory (Buzzega et al. 2020) for the task loop.

    A fixed, seeded subset of every task's rows (``method.der.rows_per_domain``) gets its
    top-k logits recorded the first time it is trained on, by a forward pass on just those
    rows right before the step that sees them (DER records the logits the model produces
    when it meets the example). When such a row is later replayed, its stored logits ride
    along in the batch (``der_values``, ``der_indices``, ``der_valid``) and the loss adds
    DER's logit-matching term. Top-k instead of full-vocabulary logits: see
    ``cpt_jax.optim.distill.topk_logits`` for the memory saved.
    """

    def __init__(self, config, mcfg, mesh, rules, shardings: TrainState, train_sources):
        der = config.method.der
        self.store = distill_lib.DERStore(der.k, der.rows_per_domain, seed=config.seed)
        self.sources, self.mesh, self.rules = list(train_sources), mesh, rules
        self.k, self.seq_len = int(der.k), config.seq_len
        rep = sharding_lib.replicated(mesh)

        def topk(params, tokens, seg):
            logits = model_lib.forward(mcfg, params, tokens[:, :-1], seg[:, :-1])
            return distill_lib.topk_logits(logits, self.k)

        self._topk = jax.jit(topk, in_shardings=(shardings.params, rep, rep),
                             out_shardings=rep)

    def record(self, params, task: int, idx) -> int:
        """Store top-k logits of this batch's current-task rows that the store wants."""
        cur = ~idx.is_replay
        rows = idx.row[cur]
        want = self.store.wants(task, rows, len(self.sources[task]))
        rows = np.unique(rows[want])
        if rows.size == 0:
            return 0
        pad = 1 << int(np.ceil(np.log2(rows.size)))  # bucketed sizes: few compiles
        padded = np.concatenate([rows, np.full(pad - rows.size, rows[0])])
        tokens, segs = self.sources[task].read(padded)
        with sharding_lib.activate(self.mesh, self.rules):
            values, indices = jax.device_get(self._topk(params, tokens, segs))
        return self.store.add(task, rows, values[:rows.size], indices[:rows.size])

    def extras(self, task: int, step: int, idx) -> dict:
        """Stored logits of the replayed rows of a batch share (zeros where none)."""
        del task, step
        valid = self.store.has(idx.domain, idx.row) & idx.is_replay
        n = len(idx.row)
        values = np.zeros((n, self.seq_len, self.k), np.float32)
        indices = np.zeros((n, self.seq_len, self.k), np.int32)
        if valid.any():
            values[valid], indices[valid] = self.store.get(idx.domain[valid], idx.row[valid])
        return {"der_values": values, "der_indices": indices,
                "der_valid": valid.astype(np.int32)}
