"""The selected methods composed once, at setup, into what a run needs from them
(``compose``): the optax chain, the loss function, the task-boundary actions and the
methods' memory.

The chain is

    guard_steps(
        combine (replay_mix | agem) -> [regularizers: l2_anchor, ewc] -> clip_by_global_norm
        -> AdamW(schedule) [wrapped, e.g. Reptile's moment reset]
        -> [outer: reptile(every_1, meta_lr_1) -> reptile(every_2, meta_lr_2) ...])

with the pieces of the methods ``method.name`` selects. The first element combines the
step's per-source gradients; regularisers add their gradients before clipping (they are
part of the loss); Reptile acts on the optimizer's update (MER). The base optimizer is
AdamW with global-norm clipping (Abbes et al. 2025: clip 1.0; ``cpt_jax.optim.adamw``).
A bad step (NaN/Inf gradients, a loss spike, an update out of proportion to the weights;
``transforms.guard_steps``) is skipped whole (no update, no state change) and counted; the
loop stops the run after ``optim.max_bad_steps`` consecutive skipped steps. Config keys:
``optim.*`` for the base optimizer, ``method.*`` for the continual-learning pieces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
import optax

from cpt_jax import model as model_lib
from cpt_jax import sharding as sharding_lib
from cpt_jax.core.losses import ce_loss_sum, fused_ce_sum, token_losses
from cpt_jax.core.state import Placement, TrainState
from cpt_jax.methods.base import Method, MethodMemory
from cpt_jax.methods.registry import selected
from cpt_jax.optim import transforms
from cpt_jax.optim.adamw import base_optimizer
from cpt_jax.replay.permutation import draw_rows


def make_optimizer(config, schedule, chosen: list[Method] | None = None
                   ) -> optax.GradientTransformation:
    """The whole chain for a run config: the selected methods' pieces around clipping and
    the base optimizer, inside the step guard (module docstring)."""
    opt = config.optim
    chosen = selected(config) if chosen is None else chosen
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


def make_loss_fn(config, mcfg, chosen: list[Method] | None = None):
    """Loss sum of a (micro)batch: cross-entropy, plus the selected methods' terms on
    replayed rows (a teacher forward once, on those rows, if any method needs the teacher's
    logits).

    ``loss_fn(params, batch, teacher, replay, replay_rows)``: with ``replay`` every row is
    replayed (the split pass's replay part: the rows' full logits); otherwise the last
    ``replay_rows`` (static) rows are (one pass over a batch ordered current rows first,
    ``cpt_jax.train.step``): the fused cross-entropy over every row, and the logits, the
    teacher forward and the terms of those rows only, so the model body runs once and the
    whole batch's [B, L, V] logits are never held. ``loss_fn.replay_terms``: it has such
    terms, so a one-pass step must order the batch and pass ``replay_rows``
    (``make_train_step`` reads it off the function, so no caller can drop the terms)."""
    chosen = selected(config) if chosen is None else chosen
    terms = [m.replay_loss(config) for m in chosen if m.replay_loss]
    teacher_needed = any(m.teacher for m in chosen)

    def with_terms(ce, mask_all, logits, batch, mask, teacher):
        """ce + the terms on the replayed rows (``batch``, ``logits``, ``mask``)."""
        aux = {"tokens": mask_all.sum(), "ce_sum": ce}
        total, t_logits = ce, None
        if teacher_needed and teacher is not None:
            tokens, seg = batch["tokens"], batch["segment_ids"]
            t_logits = jax.lax.stop_gradient(
                model_lib.forward(mcfg, teacher, tokens[:, :-1], seg[:, :-1]))
        for term in terms:
            value, name, raw = term(logits, batch, mask, t_logits)
            total, aux[name] = total + value, raw
        return total, aux

    def loss_fn(params, batch, teacher=None, replay=False, replay_rows=0):
        if replay and terms:
            losses, mask, logits = token_losses(mcfg, params, batch)
            return with_terms((losses * mask).sum(), mask, logits, batch, mask, teacher)
        if not (replay_rows and terms):  # no term needs logits: the fused cross-entropy
            return ce_loss_sum(mcfg, params, batch)
        ce, mask, hidden = fused_ce_sum(mcfg, params, batch)
        rows = slice(batch["tokens"].shape[0] - replay_rows, None)
        logits = model_lib.project_hidden(mcfg, params, hidden[rows])
        part = {k: v[rows] for k, v in batch.items()}
        return with_terms(ce, mask, logits, part, mask[rows], teacher)

    loss_fn.replay_terms = bool(terms)  # read by make_train_step: where the terms ride
    return loss_fn


class TaskBoundary:
    """What happens between tasks: every selected method's boundary action (teacher
    snapshot, anchor move, EWC's Fisher of the finished task...) and a fresh loss history
    for the step guard, in one jitted update of the sharded state (donated, shardings
    unchanged)."""

    def __init__(self, config, actions, n_rows: int, placement: Placement, train_sources):
        self.config, self.placement = config, placement
        self.sources, self.actions, self.n_rows = train_sources, list(actions), n_rows
        mesh = placement.mesh
        row_shard = {k: sharding_lib.replicated(mesh) for k in ("tokens", "segment_ids")}
        self._update = jax.jit(self._apply, in_shardings=(placement.shardings, row_shard),
                               out_shardings=placement.shardings, donate_argnums=0)

    def rows(self, task: int) -> dict:
        """The boundary's rows of the task just finished, ``task - 1``: ``n_rows`` distinct
        rows (all of them, repeated, if it has fewer) drawn by the run's keyed permutation.
        Online EWC adds each task's Fisher once (Schwarz et al. 2018); the earlier tasks'
        Fisher is already in the running sum."""
        source = self.sources[task - 1]
        if not self.n_rows:  # unused placeholder of the same structure
            row_len = source.row_len
            return {"tokens": np.zeros((1, row_len), np.int32),
                    "segment_ids": np.ones((1, row_len), np.int32)}
        rows = draw_rows(self.config.seed, "boundary", task, self.n_rows, len(source))
        tokens, segs = source.read(np.resize(rows, self.n_rows))
        return {"tokens": tokens, "segment_ids": segs}

    def _apply(self, state: TrainState, rows):
        # a new domain's loss legitimately jumps: the step guard starts its history afresh
        state = state.replace(opt_state=transforms.reset_loss_history(state.opt_state))
        for action in self.actions:
            state = action(state, rows)
        return state

    def __call__(self, state: TrainState, task: int) -> TrainState:
        with self.placement.activate():
            return self._update(state, self.rows(task))


@dataclasses.dataclass(frozen=True)
class Composition:
    """What the selected methods add to a run, built once at setup (``compose``).

    ``tx``: the optax chain; ``loss_fn(params, batch, teacher, replay, replay_rows)``:
    the loss sum of a (micro)batch (``make_loss_fn``); ``split_grads``: whether every
    replay step needs the current-task and replay gradients apart (``Method.split_grads``:
    A-GEM, explicit ``mix_weights``; otherwise a step takes one pass over the whole batch
    and the split pass runs at log steps only); ``teacher``: the state carries a teacher
    snapshot.
    """

    config: object
    methods: tuple
    tx: optax.GradientTransformation
    loss_fn: Callable
    split_grads: bool
    teacher: bool

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.methods]

    def task_boundary(self, placement: Placement, train_sources) -> TaskBoundary:
        """The jitted task-boundary update over each task's training rows."""
        c = self.config
        actions = [a for a in (m.boundary(c, placement.mcfg) for m in self.methods
                               if m.boundary) if a is not None]
        n_rows = max([m.boundary_rows(c) for m in self.methods] + [0])
        return TaskBoundary(c, actions, n_rows, placement, train_sources)

    def memories(self, placement: Placement, train_sources) -> dict[str, MethodMemory]:
        """{method name: its memory} of the selected methods that keep one."""
        return {m.name: m.memory(self.config, placement, train_sources)
                for m in self.methods if m.memory}


def compose(config, mcfg: model_lib.LlamaConfig, schedule) -> Composition:
    """The selected methods of ``config`` composed for a model ``mcfg`` and a learning-rate
    ``schedule``."""
    chosen = selected(config)
    return Composition(
        config=config, methods=tuple(chosen), tx=make_optimizer(config, schedule, chosen),
        loss_fn=make_loss_fn(config, mcfg, chosen),
        split_grads=any(m.split_grads(config) for m in chosen),
        teacher=any(m.teacher for m in chosen))
