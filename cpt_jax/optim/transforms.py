"""Continual-learning methods as optax gradient transformations.

The train step computes the gradient of the current-task rows and of the replayed rows
separately (one pass over the mixed batch: the two row sets are disjoint) and hands both to
the chain as a ``PerSourceGrads``. The first transform of the chain (``replay_mix`` or
``agem``) turns them into one parameter-shaped gradient; everything after it is ordinary
optax. A method is then a line of config::

    optax.chain(replay_mix(), clip_by_global_norm(1.0), adamw(schedule),
                reptile(every=500, meta_lr=0.1))

Every state below that holds parameter-shaped trees (slow weights, anchors, Fisher) is
sharded exactly like the parameters (``optax.tree_map_params`` finds them).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class PerSourceGrads(NamedTuple):
    """Mean-loss gradients of the current-task rows and of the replayed rows.

    ``replay`` is None for batches without replay (the first task, or rate 0); the token
    counts are the number of loss tokens behind each mean.
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


def _mix(g: PerSourceGrads, current, weights):
    if g.replay is None:
        return current
    wc, wr = _source_weights(g, weights)
    return jax.tree.map(lambda c, r: wc * c + wr * r, current, g.replay)


def replay_mix(weights: tuple[float, float] | None = None) -> optax.GradientTransformation:
    """Combine per-source gradients into one (experience replay, Abbes et al. 2025).

    With ``weights=None`` the weights are the sources' token counts, so the result is exactly
    the gradient of the mixed batch's mean loss. Explicit ``(w_current, w_replay)`` weigh
    the two mean gradients regardless of how many rows each has (e.g. (0.5, 0.5)).
    """

    def update(updates: PerSourceGrads, state, params=None):
        del params
        return _mix(updates, updates.current, weights), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def tree_dot(a, b) -> jax.Array:
    return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def agem(add_replay: bool = False, weights=None) -> optax.GradientTransformation:
    """Averaged GEM (Chaudhry et al. 2019, "Efficient Lifelong Learning with A-GEM").

    When the current-task gradient g conflicts with the replay (reference) gradient g_ref,
    i.e. g . g_ref < 0, it is projected onto the half-space where it does not:
    g <- g - (g . g_ref / g_ref . g_ref) g_ref. A-GEM proper then steps along the projected
    g alone (``add_replay=False``); with ``add_replay=True`` the replay gradient is mixed
    back in as in ``replay_mix`` (weights likewise).
    """

    def update(updates: PerSourceGrads, state, params=None):
        del params
        g, ref = updates.current, updates.replay
        if ref is None:
            return g, state
        dot = tree_dot(g, ref)
        coef = jnp.where(dot < 0, dot / jnp.maximum(tree_dot(ref, ref), 1e-30), 0.0)
        projected = jax.tree.map(lambda x, r: x - coef * r, g, ref)
        if add_replay:
            projected = _mix(updates, projected, weights)
        return projected, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class ReptileState(NamedTuple):
    count: jax.Array  # int32: inner steps taken
    slow: Any  # theta_slow, parameter-shaped


def reptile_interpolate(slow, params, meta_lr: float):
    """theta_slow + meta_lr * (theta - theta_slow): Nichol et al. 2018's outer step.

    ``meta_lr`` is the fraction of the period's displacement KEPT: 1 keeps all of it (no
    meta step), 0 returns to the slow weights. Abbes et al. 2025's code README writes the
    same update as ``(1 - eps) theta_slow + eps theta``, i.e. eps = meta_lr; a pull-back of
    eps toward the slow weights, ``(1 - eps) theta + eps theta_slow``, is meta_lr = 1 - eps.
    """
    return jax.tree.map(lambda s, p: s + meta_lr * (p - s), slow, params)


def reptile_step(params, slow, step, every: int, meta_lr: float):
    """Reptile as a pure function of (params, slow, step) -> (params, slow).

    ``step`` counts the inner (optimizer) steps taken, ``params`` are the weights after the
    latest one. At every ``every``-th step the weights become
    ``reptile_interpolate(slow, params, meta_lr)`` and that point is the next period's slow
    copy; otherwise both pass through. For a hand-written loop or a notebook::

        params = optax.apply_updates(params, updates); t += 1
        params, slow = reptile_step(params, slow, t, every=500, meta_lr=0.9)
    """
    def meta(args):
        p, s = args
        new = reptile_interpolate(s, p, meta_lr)
        return new, new

    return jax.lax.cond(jnp.asarray(step) % every == 0, meta, lambda args: args,
                        (params, slow))


def reptile(every: int, meta_lr: float) -> optax.GradientTransformation:
    """Reptile meta-update (Nichol et al. 2018) as run by MER in Abbes et al. 2025.

    Ordinary optimizer steps are the inner loop; every ``every`` steps the parameters
    after the inner update are moved to theta_slow + meta_lr * (theta - theta_slow)
    (``reptile_interpolate``: ``meta_lr`` is the fraction of the period's displacement
    kept). The weights the step ends with become the next period's theta_slow.
    Between meta steps the inner update passes through untouched (``lax.cond``, so the
    cost is a few parameter-sized vector ops once per period). Memory: one parameter copy.

    Placed after the base optimizer in the chain. Composed twice with two periods and
    rates it gives the original MER's within-batch (beta) and across-batch (gamma) Reptile
    steps (Riemer et al. 2019, "Learning to Learn without Forgetting by Maximizing
    Transfer and Minimizing Interference", Algorithm 1). The slow copy is taken lazily, from
    the parameters the next step starts from, so that when both periods end on one step
    the within-batch copy theta_W is taken AFTER the across-batch (gamma) step, as in the
    paper, and not from the beta result that gamma then moved.
    """
    if every < 1:
        raise ValueError(f"reptile every={every} must be >= 1")

    def init(params):
        return ReptileState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.asarray, params))

    def update(updates, state: ReptileState, params=None):
        if params is None:
            raise ValueError("reptile needs params: call tx.update(grads, state, params)")
        # A period ended on the previous step: the weights this step starts from (after
        # every transform of that step) are the new slow copy.
        slow = jax.lax.cond(state.count % every == 0, lambda: jax.tree.map(jnp.copy, params),
                            lambda: state.slow)
        count = state.count + 1

        def meta(upd):
            inner = jax.tree.map(jnp.add, params, upd)
            return jax.tree.map(jnp.subtract, reptile_interpolate(slow, inner, meta_lr), params)

        updates = jax.lax.cond(count % every == 0, meta, lambda upd: upd, updates)
        return updates, ReptileState(count, slow)

    return optax.GradientTransformation(init, update)


def reset_moments(inner: optax.GradientTransformation, every: int
                  ) -> optax.GradientTransformation:
    """Wrap an optimizer so its Adam moments (mu, nu and their bias-correction count) are
    reset to zero every ``every`` steps: MER's optional "reset" at a meta step. The
    learning-rate schedule's own step count is left alone."""

    def init(params):
        return (jnp.zeros((), jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        count, inner_state = state
        updates, inner_state = inner.update(updates, inner_state, params)
        count = count + 1

        def reset(s):
            return jax.tree.map(
                lambda x: x._replace(count=jnp.zeros_like(x.count),
                                     mu=jax.tree.map(jnp.zeros_like, x.mu),
                                     nu=jax.tree.map(jnp.zeros_like, x.nu))
                if isinstance(x, optax.ScaleByAdamState) else x,
                s, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))

        inner_state = jax.lax.cond(count % every == 0, reset, lambda s: s, inner_state)
        return updates, (count, inner_state)

    return optax.GradientTransformation(init, update)


class AnchorState(NamedTuple):
    anchor: Any  # parameter-shaped


def l2_anchor(weight: float) -> optax.GradientTransformation:
    """Add the gradient of weight/2 * ||theta - anchor||^2 (L2 toward fixed weights).

    The anchor starts as the parameters the run starts from (the pre-trained weights);
    the loop may move it to the weights at the start of each task (``set_anchor``).
    Mix-review (He et al. 2021) optionally pairs replay with this pull toward the
    pre-trained model.
    """

    def init(params):
        return AnchorState(jax.tree.map(jnp.asarray, params))

    def update(updates, state: AnchorState, params=None):
        updates = jax.tree.map(lambda u, p, a: u + weight * (p - a), updates, params,
                               state.anchor)
        return updates, state

    return optax.GradientTransformation(init, update)


class EWCState(NamedTuple):
    fisher: Any  # diagonal Fisher, parameter-shaped, accumulated over tasks
    anchor: Any  # theta* at the last task boundary


def ewc(lam: float) -> optax.GradientTransformation:
    """Elastic weight consolidation (Kirkpatrick et al. 2017), diagonal Fisher.

    Adds the gradient of lam/2 * sum_i F_i (theta_i - theta*_i)^2. F is zero until the
    first task ends; at each task boundary the loop adds the Fisher of the task just
    finished, estimated at the current weights, to the running sum (online EWC, Schwarz et
    al. 2018, "Progress & Compress": each task's Fisher enters once) and moves theta* to
    the current weights, with ``set_ewc``. Memory: two parameter copies.
    """

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return EWCState(zeros, jax.tree.map(jnp.asarray, params))

    def update(updates, state: EWCState, params=None):
        updates = jax.tree.map(lambda u, f, p, a: u + lam * f * (p - a), updates,
                               state.fisher, params, state.anchor)
        return updates, state

    return optax.GradientTransformation(init, update)


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
    return _replace_states(opt_state, GuardState,
                           lambda s: s._replace(recent_losses=jnp.full_like(
                               s.recent_losses, jnp.nan)))


def _replace_states(opt_state, cls, fn):
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
    return _replace_states(opt_state, optax.ScaleByScheduleState,
                           lambda s: s._replace(count=jnp.zeros_like(s.count)))


def set_anchor(opt_state, params):
    """Move every l2_anchor anchor to `params` (e.g. at the start of a task)."""
    return _replace_states(opt_state, AnchorState, lambda s: AnchorState(params))


def set_ewc(opt_state, params, new_fisher, decay: float = 1.0):
    """At a task boundary: F <- decay * F + F_new, theta* <- params (F_new: the Fisher of
    the task just finished only)."""
    return _replace_states(
        opt_state, EWCState,
        lambda s: EWCState(jax.tree.map(lambda f, n: decay * f + n, s.fisher, new_fisher),
                           params))

