"""Continual-learning methods, one file each, and the registry that composes them.

``method.name`` selects methods by name, joined with "+": ``"replay"`` (the default),
``"replay+reptile"`` (MER), ``"agem"``, ``"replay+ewc"``, ``"replay+l2+distill"``...
``replay`` combines the step's two gradients unless another selected method does
(``agem``). Each method's strength lives under ``config.method.<name>``; a method whose
strength is set but which is not selected is an error, not a silent no-op.

Adding a method: a file with its pieces (``cpt_jax.methods.base.Method``) and one line in
``REGISTRY`` below.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from cpt_jax import model as model_lib
from cpt_jax import sharding as sharding_lib
from cpt_jax.methods import agem, der, distill, ewc, l2, replay, reptile
from cpt_jax.methods.base import Method
from cpt_jax.optim import transforms
from cpt_jax.replay.permutation import draw_rows
from cpt_jax.train.losses import ce_loss_sum, token_losses
from cpt_jax.train.state import TrainState

REGISTRY: dict[str, Method] = {m.name: m for m in (
    replay.METHOD, agem.METHOD, reptile.METHOD, l2.METHOD, ewc.METHOD, distill.METHOD,
    der.METHOD)}


def default_config() -> ml_collections.ConfigDict:
    """``config.method``: the selection, replay's source weights and every method's keys."""
    c = ml_collections.ConfigDict()
    c.name = "replay"
    # Per-source gradient weights (current, replay); None = token-proportional, i.e. the
    # gradient of the mixed batch's mean loss.
    c.mix_weights = ml_collections.FieldReference(None, field_type=list)
    for m in REGISTRY.values():
        if m.defaults:
            c[m.name] = ml_collections.ConfigDict(m.defaults)
    return c


def selected(config) -> list[Method]:
    """The methods ``config.method.name`` selects, with the combiner first."""
    names = [n.strip() for n in str(config.method.name).split("+") if n.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown or not names:
        raise ValueError(f"method.name={config.method.name!r}: {unknown or 'empty'} not a "
                         f"method; join any of {sorted(REGISTRY)} with '+'")
    methods = [REGISTRY[n] for n in dict.fromkeys(names)]
    combiners = [m for m in methods if m.combine and m.name != "replay"]
    if len(combiners) > 1:
        raise ValueError(f"method.name={config.method.name!r}: {[m.name for m in combiners]} "
                         "each combine the replay and current gradients; select one")
    if not combiners and replay.METHOD not in methods:
        methods.insert(0, replay.METHOD)
    if combiners:
        methods = [m for m in methods if m is not replay.METHOD]
    return sorted(methods, key=lambda m: m.combine is None)


def check(config) -> None:
    """Every selected method's keys are valid, and no method is configured unselected."""
    chosen = selected(config)
    for m in REGISTRY.values():
        if m.active(config) and m not in chosen:
            raise ValueError(f"method.{m.name} is configured but method.name="
                             f"{config.method.name!r} does not select it; add '+{m.name}' "
                             f"or clear method.{m.name}")
        if m in chosen and m.defaults and not m.active(config) and m.combine is None:
            raise ValueError(f"method.name selects {m.name} but method.{m.name} leaves it "
                             f"without effect ({dict(config.method[m.name])}); set its "
                             "strength")
        if m in chosen:
            m.check(config)


def split_grads(config) -> bool:
    """Whether every replay step needs the split pass (current-task and replay rows apart):
    some selected method combines the two gradients (``Method.split_grads``: A-GEM, replay
    with explicit ``mix_weights``) or adds a loss term on replayed rows only (distillation,
    DER: the term needs those rows' full logits and, for distillation, a teacher forward
    over them alone, which ``make_loss_fn`` computes on the replay rows' own pass).
    Otherwise a step takes one pass over the whole batch and the split pass runs at log
    steps only."""
    return any(m.split_grads(config) or m.replay_loss is not None for m in selected(config))


def needs_teacher(config) -> bool:
    return any(m.teacher for m in selected(config))


def make_loss_fn(config, mcfg):
    """Loss sum of a (micro)batch: cross-entropy, plus the selected methods' terms on
    replayed rows (a teacher forward once, if any method needs the teacher's logits)."""
    terms = [m.replay_loss(config) for m in selected(config) if m.replay_loss]
    teacher_needed = needs_teacher(config)

    def loss_fn(params, batch, teacher=None, replay=False):
        if not (replay and terms):  # no term needs the logits: the fused cross-entropy
            return ce_loss_sum(mcfg, params, batch)
        losses, mask, logits = token_losses(mcfg, params, batch)
        ce = (losses * mask).sum()
        aux = {"tokens": mask.sum(), "ce_sum": ce}
        total = ce
        t_logits = None
        if teacher_needed and teacher is not None:
            tokens, seg = batch["tokens"], batch["segment_ids"]
            t_logits = jax.lax.stop_gradient(
                model_lib.forward(mcfg, teacher, tokens[:, :-1], seg[:, :-1]))
        for term in terms:
            value, name, raw = term(logits, batch, mask, t_logits)
            total, aux[name] = total + value, raw
        return total, aux

    return loss_fn


class TaskBoundary:
    """What happens between tasks: every selected method's boundary action (teacher
    snapshot, anchor move, EWC's Fisher of the finished task...) and a fresh loss history
    for the step guard, in one jitted update of the sharded state (donated, shardings
    unchanged)."""

    def __init__(self, config, mcfg, mesh, rules, shardings: TrainState, train_sources):
        self.config, self.mesh, self.rules = config, mesh, rules
        self.sources = train_sources
        chosen = selected(config)
        self.actions = [a for a in (m.boundary(config, mcfg) for m in chosen if m.boundary)
                        if a is not None]
        self.n_rows = max([m.boundary_rows(config) for m in chosen] + [0])
        row_shard = {k: sharding_lib.replicated(mesh) for k in ("tokens", "segment_ids")}
        self._update = jax.jit(self._apply, in_shardings=(shardings, row_shard),
                               out_shardings=shardings, donate_argnums=0)

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
        with sharding_lib.activate(self.mesh, self.rules):
            return self._update(state, self.rows(task))


def memory(config, mcfg, mesh, rules, shardings, train_sources):
    """The selected methods' host-side recorder (DER's), or None."""
    for m in selected(config):
        if m.memory:
            return m.memory(config, mcfg, mesh, rules, shardings, train_sources)
    return None
