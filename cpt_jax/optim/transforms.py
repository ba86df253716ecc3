"""What the optax chain of every run shares: the step's per-source gradients, the step
guard, and helpers over optimizer states.

The train step hands the chain a ``PerSourceGrads``: the gradients of the current-task
rows and of the replayed rows apart (the split pass: where a method needs them, and at log
steps), or the one-pass gradient of the whole mixed batch as ``current`` with ``replay``
None (every other step; ``cpt_jax.train.step``). The chain's first transform (a method's combiner,
``cpt_jax.methods``: ``replay_mix`` or ``agem``) turns them into one parameter-shaped
gradient; everything after it is ordinary optax::

    guard_steps(optax.chain(replay_mix(), clip_by_global_norm(1.0), adamw(schedule),
                            reptile(every=500, meta_lr=0.1)))

Every method state that holds parameter-shaped trees (slow weights, anchors, Fisher) is
sharded exactly like the parameters (``optax.tree_map_params`` finds them).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class PerSourceGrads(NamedTuple):
    """Mean-loss gradients of the current-task rows and of the replayed rows.

    ``replay`` is None for batches without replay (the first task, or rate 0), and for a
    step that took one pass over the whole batch: then ``current`` is the mixed batch's
    mean-loss gradient and ``current_tokens`` counts all its loss tokens. The token counts
    are the number of loss tokens behind each mean.
    """

    current: Any
    replay: Any | None
    current_tokens: jax.Array
    replay_tokens: jax.Array


def _source_weights(g: PerSourceGrads, weights):
    """(w_current, w_replay) summing to 1; token-proportional when weights is None."""
    tc, tr = g.current_tokens.astype(jnp.float32), g.replay_tokens.astype(jnp.float32)
    if weights is None:
        wc, wr = tc, tr
    else:
        wc = jnp.where(tc > 0, float(weights[0]), 0.0)
        wr = jnp.where(tr > 0, float(weights[1]), 0.0)
    total = jnp.maximum(wc + wr, 1e-30)
    return wc / total, wr / total


def mix_sources(g: PerSourceGrads, current, weights):
    """``current`` and the replay gradient weighted by ``_source_weights`` (``current``
    alone when the batch has no replay rows)."""
    if g.replay is None:
        return current
    wc, wr = _source_weights(g, weights)
    return jax.tree.map(lambda c, r: wc * c + wr * r, current, g.replay)


def tree_dot(a, b) -> jax.Array:
    return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


SKIP_NON_FINITE, SKIP_LOSS_SPIKE, SKIP_UPDATE_NORM = 1, 2, 3
SKIP_REASONS = {SKIP_NON_FINITE: "NaN/Inf gradients or loss",
                SKIP_LOSS_SPIKE: "a loss spike",
                SKIP_UPDATE_NORM: "an update larger than the weights allow (optim."
                                  "max_update_ratio; a Reptile meta-step over a long period "
                                  "may legitimately need it raised)"}
LOSS_WINDOW = 32  # losses the spike guard takes its median over
MIN_LOSS_HISTORY = 8  # no spike is called before this many losses of the task are seen


class GuardState(NamedTuple):
    bad_in_a_row: jax.Array  # int32: consecutive skipped steps
    bad_total: jax.Array  # int32: skipped steps over the run
    last_reason: jax.Array  # int32: SKIP_* of the last skipped step (0: none yet)
    recent_losses: jax.Array  # float32 [LOSS_WINDOW]: the last applied steps' losses, NaN = empty
    inner: Any


def guard_steps(inner: optax.GradientTransformation, loss_spike_factor: float = 0.0,
                max_update_ratio: float = 0.0) -> optax.GradientTransformationExtraArgs:
    """Skip a bad step whole: zero update, inner state (moments, schedule, Reptile and
    every method's state) untouched, and count it. A step is bad when

    - its gradients (or its ``loss``) hold a NaN or Inf;
    - ``max_update_ratio > 0`` and the update's global norm exceeds that multiple of the
      weights' norm: one finite step that would wreck the model (e.g. a learning rate
      1e6 times too large) is never applied, so no checkpoint can hold its result;
    - ``loss_spike_factor > 0``, a ``loss`` is passed (``tx.update(..., loss=loss)``) and
      it exceeds that multiple of the median of the last ``LOSS_WINDOW`` applied steps'
      losses (once ``MIN_LOSS_HISTORY`` are known); ``reset_loss_history`` clears them at
      a task boundary, where a new domain's loss legitimately jumps.

    The loop stops the run after ``optim.max_bad_steps`` bad steps in a row. (optax's
    ``apply_if_finite`` zeroes updates shaped like its input, here ``PerSourceGrads``,
    and eventually forces a bad update through, where the run should stop instead.)
    """

    def init(params):
        zero = jnp.zeros((), jnp.int32)
        return GuardState(zero, zero, zero, jnp.full((LOSS_WINDOW,), jnp.nan, jnp.float32),
                          inner.init(params))

    def update(updates, state: GuardState, params=None, *, loss=None, **extra_args):
        del extra_args
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x))
                                    for x in jax.tree.leaves(updates)]))
        if loss is not None:
            finite &= jnp.isfinite(loss)
        new_updates, inner_state = jax.lax.cond(
            finite,
            lambda: inner.update(updates, state.inner, params),
            lambda: (jax.tree.map(jnp.zeros_like, params), state.inner))
        reason = jnp.where(finite, 0, SKIP_NON_FINITE).astype(jnp.int32)
        if max_update_ratio > 0:
            too_big = optax.tree.norm(new_updates) > max_update_ratio * optax.tree.norm(params)
            reason = jnp.where((reason == 0) & too_big, SKIP_UPDATE_NORM, reason)
        history = state.recent_losses
        if loss_spike_factor > 0 and loss is not None:
            known = jnp.sum(jnp.isfinite(history))
            median = jnp.nanmedian(jnp.where(known > 0, history, 0.0))
            spike = (known >= MIN_LOSS_HISTORY) & (loss > loss_spike_factor * median)
            reason = jnp.where((reason == 0) & spike, SKIP_LOSS_SPIKE, reason)
        skip = reason > 0
        new_updates, inner_state = jax.lax.cond(
            skip, lambda: (jax.tree.map(jnp.zeros_like, params), state.inner),
            lambda: (new_updates, inner_state))
        if loss is not None:
            pushed = jnp.roll(history, 1).at[0].set(jnp.asarray(loss, jnp.float32))
            history = jnp.where(skip, history, pushed)
        return new_updates, GuardState(
            jnp.where(skip, state.bad_in_a_row + 1, 0),
            state.bad_total + skip.astype(jnp.int32),
            jnp.where(skip, reason, state.last_reason), history, inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


def reset_loss_history(opt_state):
    """Forget the spike guard's recent losses (at a task boundary: a new domain starts)."""
    return replace_states(opt_state, GuardState,
                           lambda s: s._replace(recent_losses=jnp.full_like(
                               s.recent_losses, jnp.nan)))


def replace_states(opt_state, cls, fn):
    """``opt_state`` with every sub-state of type ``cls`` replaced by ``fn(sub-state)``."""
    return jax.tree.map(lambda s: fn(s) if isinstance(s, cls) else s, opt_state,
                        is_leaf=lambda s: isinstance(s, cls))


def _schedule_states(opt_state) -> list:
    return [s for s in jax.tree.leaves(
        opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))
        if isinstance(s, optax.ScaleByScheduleState)]


def schedule_count(opt_state) -> jax.Array:
    """The learning-rate schedule's step count in an optimizer state: the step whose rate
    the next update applies. It advances only on applied steps (``skip_non_finite`` leaves
    it untouched on a skipped step, see ``guard_steps``), so ``schedule(schedule_count(s))`` is the rate that
    is actually used."""
    states = _schedule_states(opt_state)
    if len(states) != 1:
        raise ValueError(f"expected one learning-rate schedule in the optimizer state, found "
                         f"{len(states)}")
    return states[0].count


def restart_schedule(opt_state):
    """The same state with the learning-rate schedule back at step 0 (warmup again); Adam's
    moments and their bias-correction count, and every method's state, are kept."""
    return replace_states(opt_state, optax.ScaleByScheduleState,
                           lambda s: s._replace(count=jnp.zeros_like(s.count)))
