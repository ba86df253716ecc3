"""The train step: one jax.jit with explicit shardings and a donated state.

A batch is a dict of global arrays sharded over the batch axes (data, fsdp):

    tokens       [B, L+1] int32   packed rows; inputs are [:, :-1], targets [:, 1:]
    segment_ids  [B, L+1] int32   document id within the row, 0 = padding

(plus ``row_weight`` [B] float32, the loss weights of a weighted replay pool, and a
method's per-row extras, e.g. DER's stored logits). Which rows are replayed is static: the
``n_replay`` the loader reports with the batch.

The loss is next-token cross-entropy averaged over the tokens whose target lies in the same
document as the input (the loss never crosses a document and skips padding).

Per-source gradients: the sampler puts a batch's ``n_replay`` replay rows at positions
fixed by (B, n_replay) (``replay_positions``), so the step can split the batch statically
into its current-task and replay rows and take the gradient of each part's mean loss (the
"split" pass). The two parts are disjoint, so the split pass costs one forward/backward
over the mixed batch in FLOPs, but as two smaller passes, which an accelerator runs less
efficiently than one. So the split pass runs only where it is needed:

- every step of a run whose methods need the two parts apart (A-GEM's projection, replay
  with explicit ``mix_weights``: ``Composition.split_grads`` of
  ``cpt_jax.methods.compose``, which ``make_train_step(split_grads=...)`` takes);
- the steps that log gradient statistics (``step(..., stats=True)``: cosines and norms of
  the current and replay gradients, ``gradient_statistics``).

Every other step with replay takes one forward/backward pass over the whole batch, as
plain training does: the gradient of the mixed batch's mean loss, which is the
token-weighted sum of the per-source mean gradients (the default ``replay_mix``) up to
float rounding. A loss term on replayed rows only (distillation's, DER's:
``make_loss_fn``'s ``loss_fn.replay_terms``) rides along in that pass: the batch is reordered
current rows first (``replay_last``), so that every microbatch ends with the same static
number of replay rows, and the loss takes its terms on those rows alone (the model body
runs once over all rows; the logits, the teacher forward and the terms cover the replay
rows only). The gradient is again the split pass's: the loss sums of both parts, terms
included, over all loss tokens. Its metrics leave out the per-source ones
(``loss_current``, ``loss_replay``, the terms' ``*_replay``, the gradient statistics).
Both passes go to the optax chain as a ``PerSourceGrads`` (the one-pass gradient as
``current`` with ``replay=None``); its first transform (replay_mix, agem) combines them.
Each distinct (``n_replay``, pass) compiles once.

Gradients are accumulated over microbatches inside the step with ``lax.scan``: the update
of a global batch does not depend on how many microbatches it is split into.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cpt_jax import sharding as sharding_lib
from cpt_jax.replay.sampler import replay_positions
from cpt_jax.optim.transforms import GuardState, PerSourceGrads, schedule_count
from cpt_jax.core.losses import ce_loss_sum, token_losses
from cpt_jax.core.state import Placement, TrainState


def check_part(rows: int, n: int) -> None:
    """A batch part (current or replay rows) must split evenly into n microbatches."""
    if rows % n:
        raise ValueError(f"a batch part of {rows} rows is not divisible by microbatches={n}; "
                         "choose microbatches dividing both the replay and current rows")


def split_microbatches(batch, n: int, mesh):
    """[B, ...] -> [n, B/n, ...] taking strided rows, so every microbatch keeps all shards."""
    def split(x):
        B = x.shape[0]
        check_part(B, n)
        shards = sharding_lib.batch_divisor(mesh)
        if (B // n) % shards:
            # Uneven microbatches are refused: XLA's partitioner produced NaN embedding
            # gradients for them (1-row microbatches on a data=2 x tensor=4 mesh).
            raise ValueError(
                f"a batch part of {B} rows in microbatches={n} gives {B // n} rows per "
                f"microbatch, not a multiple of the {shards} batch shards (data x fsdp); "
                "change microbatches, global_batch or the replay rate")
        y = x.reshape(B // n, n, *x.shape[1:]).swapaxes(0, 1)
        spec = jax.sharding.PartitionSpec(None, sharding_lib.BATCH_AXES)
        return jax.lax.with_sharding_constraint(y, jax.sharding.NamedSharding(mesh, spec))
    return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn, params, batch, microbatches: int, mesh, param_shardings):
    """Sums of loss gradients and aux over microbatches (lax.scan when more than one).

    `loss_fn(params, batch) -> (loss_sum, aux dict of scalars)`.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
        (_, aux), grads = grad_fn(params, batch)
        return grads, aux

    micro = split_microbatches(batch, microbatches, mesh)

    def body(carry, mb):
        g_acc, a_acc = carry
        (_, aux), g = grad_fn(params, mb)
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        g_acc = jax.lax.with_sharding_constraint(g_acc, param_shardings)
        return (g_acc, jax.tree.map(jnp.add, a_acc, aux)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    aux_shape = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))[0][1]
    aux0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape)
    (grads, aux), _ = jax.lax.scan(body, (zeros, aux0), micro)
    return grads, aux


def take_rows(batch, idx: np.ndarray, mesh):
    """Rows `idx` (static) of every batch array, re-sharded over the batch axes."""
    def take(x):
        y = jnp.take(x, jnp.asarray(idx), axis=0)
        if len(idx) % sharding_lib.batch_divisor(mesh):
            return y  # uneven: leave the layout to XLA
        return jax.lax.with_sharding_constraint(y, sharding_lib.batch_sharding(mesh, x.ndim))
    return jax.tree.map(take, batch)


def source_rows(B: int, n_replay: int) -> tuple[np.ndarray, np.ndarray]:
    """(current rows, replay rows) of a batch of B rows with ``n_replay`` replay rows at
    ``replay_positions``, each in increasing order (static)."""
    rep_idx = replay_positions(B, n_replay)
    return np.setdiff1d(np.arange(B), rep_idx), rep_idx


def replay_last(batch, n_replay: int, microbatches: int, mesh):
    """(the batch reordered [current rows..., replay rows...], replay rows per microbatch).

    ``split_microbatches`` sends row r to microbatch r % n; with both parts divisible by n
    (as the split pass requires), every microbatch then holds its current rows first and
    its ``n_replay / n`` replay rows last: a static count the loss can slice."""
    B = batch["tokens"].shape[0]
    check_part(B - n_replay, microbatches)
    check_part(n_replay, microbatches)
    order = np.concatenate(source_rows(B, n_replay))
    return take_rows(batch, order, mesh), n_replay // microbatches


def gradient_statistics(g_cur, g_rep) -> dict:
    """Norms of the current-task and replay gradients and their cosine: global, per layer
    and of the embeddings (the quantity MER's objective rewards, Riemer et al. 2019).

    Every statistic comes from one set of per-leaf sums (a.b, a.a, b.b), per layer for the
    leaves ``nn.scan`` stacks under "layers" (leading axis = layer): three sibling
    reductions over each pair of leaves, where separate dot products and norms read each
    gradient five times."""
    def cos(dot, aa, bb):
        return dot / jnp.maximum(jnp.sqrt(aa * bb), 1e-30)

    def sums(tree_a, tree_b, per_layer=False):  # [3] (or [3, n_layers]): a.b, a.a, b.b
        out = 0.0
        for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)):
            a, b = a.astype(jnp.float32), b.astype(jnp.float32)
            axes = tuple(range(1 if per_layer else 0, a.ndim))
            out += jnp.stack([jnp.sum(a * b, axes), jnp.sum(a * a, axes), jnp.sum(b * b, axes)])
        return out

    embed = sums(g_cur["embed"], g_rep["embed"])
    other = [k for k in g_cur if k not in ("layers", "embed")]
    every = embed + sums({k: g_cur[k] for k in other}, {k: g_rep[k] for k in other})
    out = {"grad_cos_embed": cos(*embed)}
    if "layers" in g_cur:
        layers = sums(g_cur["layers"], g_rep["layers"], per_layer=True)
        out["grad_cos_layer"] = cos(*layers)
        every = every + layers.sum(axis=-1)
    out.update(grad_cos=cos(*every), grad_norm_current=jnp.sqrt(every[1]),
               grad_norm_replay=jnp.sqrt(every[2]))
    return out


_DOT_OP = re.compile(r"=\s*[^=\n]*?\s(dot|convolution)\(")


def count_dot_ops(compiled) -> int:
    """The dot and convolution instructions in a compiled step's optimised HLO (fused
    computations and loop bodies counted once each, as written): how many matmul kernels
    a step launches per layer body, a CPU-checkable proxy for an accelerator's split-pass
    cost (the split pass doubles them)."""
    text = compiled if isinstance(compiled, str) else compiled.as_text()
    return len(_DOT_OP.findall(text))


def train_step(tx, mesh, param_shardings, microbatches, lr_schedule, loss_fn,
               n_replay: int, state: TrainState, batch, split: bool = True,
               replay_terms: bool = False):
    """One optimizer step on a global batch with `n_replay` replay rows (static).

    ``split`` (static): per-source gradients (the split pass, with gradient statistics);
    otherwise one forward/backward pass over the whole batch, which tells the loss where
    the replay rows are when it has ``replay_terms`` (see the module doc)."""
    B = batch["tokens"].shape[0]
    if not 0 <= n_replay < B:
        raise ValueError(f"n_replay={n_replay} must be in [0, {B}): a batch needs current rows")
    cur_loss = functools.partial(loss_fn, teacher=None, replay=False)
    rep_loss = functools.partial(loss_fn, teacher=state.teacher, replay=True)

    def grads_of(fn, part):
        g_sum, aux = accumulate_gradients(fn, state.params, part, microbatches, mesh,
                                          param_shardings)
        n_tok = jnp.maximum(aux["tokens"], 1.0)
        return jax.tree.map(lambda g: g / n_tok, g_sum), aux

    metrics = {}
    if n_replay == 0:
        g_cur, aux_c = grads_of(cur_loss, batch)
        metrics["grad_norm_current"] = optax.tree.norm(g_cur)
        aux_r = {k: jnp.zeros_like(v) for k, v in aux_c.items()}
        g_rep = None
    elif not split:
        # one pass over the whole batch: the mixed batch's mean-loss gradient; a loss with
        # terms on replayed rows gets them last in every microbatch, and their count
        part, fn = batch, cur_loss
        if replay_terms:
            part, per_micro = replay_last(batch, n_replay, microbatches, mesh)
            fn = functools.partial(loss_fn, teacher=state.teacher, replay=False,
                                   replay_rows=per_micro)
        g_cur, aux_c = grads_of(fn, part)
        aux_r = {k: jnp.zeros_like(v) for k, v in aux_c.items()}
        g_rep = None
    else:
        cur_idx, rep_idx = source_rows(B, n_replay)
        g_cur, aux_c = grads_of(cur_loss, take_rows(batch, cur_idx, mesh))
        g_rep, aux_r = grads_of(rep_loss, take_rows(batch, rep_idx, mesh))
        metrics.update(gradient_statistics(g_cur, g_rep))

    grads = PerSourceGrads(g_cur, g_rep, aux_c["tokens"], aux_r["tokens"])
    # the rate this update applies (a skipped step does not advance the schedule)
    lr = (lr_schedule(schedule_count(state.opt_state)) if lr_schedule is not None
          else jnp.zeros(()))
    tc, tr = aux_c["tokens"], aux_r["tokens"]
    loss = (aux_c["ce_sum"] + aux_r["ce_sum"]) / jnp.maximum(tc + tr, 1.0)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, loss=loss)
    params = optax.apply_updates(state.params, updates)

    metrics.update({
        "loss": loss,
        "tokens": tc + tr,
        "update_norm": optax.tree.norm(updates),
        "param_norm": optax.tree.norm(state.params),
        "lr": lr,
    })
    if split or n_replay == 0:  # the current rows alone (not the one-pass mix)
        metrics["loss_current"] = aux_c["ce_sum"] / jnp.maximum(tc, 1.0)
    if g_rep is not None:  # replay scalars only for steps that replay (no fake 0.0 loss)
        metrics["loss_replay"] = aux_r["ce_sum"] / jnp.maximum(tr, 1.0)
        for k in aux_r:
            if k not in ("tokens", "ce_sum"):  # method-specific terms, e.g. distillation
                metrics[f"{k}_replay"] = aux_r[k] / jnp.maximum(tr, 1.0)
    if isinstance(opt_state, GuardState):  # skipped bad steps
        metrics["bad_steps_in_a_row"] = opt_state.bad_in_a_row
        metrics["bad_steps_total"] = opt_state.bad_total
        metrics["skip_reason"] = opt_state.last_reason
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def make_train_step(placement: Placement, tx, microbatches: int = 1, lr_schedule=None,
                    loss_fn=None, split_grads: bool = True):
    """step(state, batch, n_replay=0, stats=True) -> (state, metrics): jitted per replay
    count and pass, with explicit shardings (every batch array over the batch axes) and the
    state donated. `loss_fn(params, batch, teacher, replay, replay_rows)` defaults to
    cross-entropy; `n_replay` must match the sampler's replay count for the batch.

    A step with replay rows takes the split pass (per-source gradients) when
    ``split_grads`` (the chain combines the two gradients: ``Composition.split_grads``) or
    ``stats`` (a log step: the gradient statistics), and otherwise one pass over the whole
    batch. ``split_grads=True`` (the default) splits every replay step. A loss with terms on
    replayed rows (``loss_fn.replay_terms``, set by ``methods.compose.make_loss_fn``) is
    pointed to them in the one pass."""
    mesh, shardings = placement.mesh, placement.shardings
    loss_fn = loss_fn or functools.partial(ce_loss_sum, placement.mcfg)
    replay_terms = bool(getattr(loss_fn, "replay_terms", False))
    cache = {}

    def jitted(n_replay, batch, stats):
        split = bool(n_replay) and (split_grads or bool(stats))
        key = (n_replay, split, tuple(sorted((k, v.ndim) for k, v in batch.items())))
        if key not in cache:
            batch_shard = {k: sharding_lib.batch_sharding(mesh, v.ndim)
                           for k, v in batch.items()}
            fn = functools.partial(train_step, tx, mesh, shardings.params,
                                   microbatches, lr_schedule, loss_fn, n_replay, split=split,
                                   replay_terms=replay_terms)
            cache[key] = jax.jit(fn, in_shardings=(shardings, batch_shard),
                                 out_shardings=(shardings, sharding_lib.replicated(mesh)),
                                 donate_argnums=0)
        return cache[key]

    def step(state, batch, n_replay: int = 0, stats: bool = True):
        with placement.activate():
            return jitted(int(n_replay), batch, stats)(state, batch)

    def lower(state, batch, n_replay: int = 0, stats: bool = True):
        with placement.activate():
            return jitted(int(n_replay), batch, stats).lower(state, batch)

    step.lower = lower
    return step


def _params_batch_step(fn, placement: Placement):
    """``fn(params, batch)`` jitted with the parameters' shardings and the batch's rows over
    the batch axes; its outputs replicated."""
    mesh, shardings = placement.mesh, placement.shardings
    batch_shard = {k: sharding_lib.batch_sharding(mesh, 2) for k in ("tokens", "segment_ids")}
    jitted = jax.jit(fn, in_shardings=(shardings.params, batch_shard),
                     out_shardings=sharding_lib.replicated(mesh))

    def step(params, batch):
        with placement.activate():
            return jitted(params, batch)

    return step


def make_eval_step(placement: Placement):
    """Jitted (params, batch) -> (sum of token losses, token count): token-weighted eval."""
    def eval_sums(params, batch):
        losses, mask, _ = token_losses(placement.mcfg, params, batch)
        return (losses * mask).sum(), mask.sum()

    return _params_batch_step(eval_sums, placement)


def make_row_loss_step(placement: Placement):
    """Jitted (params, batch) -> (loss sum [B], token count [B]) per row: how a replay
    policy scores rows with the current model (``cpt_jax.replay.buffer``)."""
    def row_sums(params, batch):
        losses, mask, _ = token_losses(placement.mcfg, params, batch)
        return (losses * mask).sum(axis=1), mask.sum(axis=1)

    return _params_batch_step(row_sums, placement)
