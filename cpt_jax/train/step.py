"""The train step: one jax.jit with explicit shardings and a donated state.

A batch is a dict of global arrays sharded over the batch axes (data, fsdp):

    tokens       [B, L+1] int32   packed rows; inputs are [:, :-1], targets [:, 1:]
    segment_ids  [B, L+1] int32   document id within the row, 0 = padding
    is_replay    [B]      int32   1 for rows replayed from earlier tasks (optional)

The loss is next-token cross-entropy averaged over the tokens whose target lies in the same
document as the input (so the loss never crosses a document and skips padding). Gradients
are accumulated over microbatches inside the step with ``lax.scan``: the update for a
global batch does not depend on how many microbatches it is split into.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from cpt_jax import model as model_lib
from cpt_jax import sharding as sharding_lib
from cpt_jax.train.state import TrainState, mesh_context


def token_losses(config, params, batch):
    """Per-token cross-entropy [B, L] (float32) and its mask [B, L] (float32)."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    logits = model_lib.forward(config, params, tokens[:, :-1], seg[:, :-1])
    targets = tokens[:, 1:]
    mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return losses, mask.astype(jnp.float32)


def loss_sums(config, params, batch):
    """(sum of masked token losses, aux sums) for one (micro)batch; aux splits by source."""
    losses, mask = token_losses(config, params, batch)
    is_replay = batch.get("is_replay")
    if is_replay is None:
        is_replay = jnp.zeros(losses.shape[:1], jnp.int32)
    replay = is_replay.astype(jnp.float32)[:, None] * mask
    current = mask - replay
    aux = {
        "tokens": mask.sum(),
        "loss_sum_current": (losses * current).sum(),
        "tokens_current": current.sum(),
        "loss_sum_replay": (losses * replay).sum(),
        "tokens_replay": replay.sum(),
    }
    return (losses * mask).sum(), aux


def split_microbatches(batch, n: int, mesh):
    """[B, ...] -> [n, B/n, ...] taking strided rows, so every microbatch keeps all shards."""
    def split(x):
        B = x.shape[0]
        if B % n:
            raise ValueError(f"global batch {B} is not divisible by microbatches={n}")
        y = x.reshape(B // n, n, *x.shape[1:]).swapaxes(0, 1)
        spec = jax.sharding.PartitionSpec(None, sharding_lib.BATCH_AXES)
        return jax.lax.with_sharding_constraint(y, jax.sharding.NamedSharding(mesh, spec))
    return jax.tree.map(split, batch)


def accumulate_gradients(config, params, batch, microbatches: int, mesh, param_shardings):
    """Sum of loss gradients and aux sums over microbatches (lax.scan when more than one)."""
    grad_fn = jax.value_and_grad(functools.partial(loss_sums, config), has_aux=True)
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
    aux0 = jax.tree.map(lambda _: jnp.zeros((), jnp.float32),
                        jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))[0][1])
    (grads, aux), _ = jax.lax.scan(body, (zeros, aux0), micro)
    return grads, aux


def train_step(config, tx, mesh, param_shardings, microbatches, lr_schedule, state: TrainState,
               batch):
    """One optimizer step on a global batch. Returns (new state, scalar metrics)."""
    grad_sums, aux = accumulate_gradients(config, state.params, batch, microbatches, mesh,
                                          param_shardings)
    n_tok = jnp.maximum(aux["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / n_tok, grad_sums)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": (aux["loss_sum_current"] + aux["loss_sum_replay"]) / n_tok,
        "loss_current": aux["loss_sum_current"] / jnp.maximum(aux["tokens_current"], 1.0),
        "loss_replay": aux["loss_sum_replay"] / jnp.maximum(aux["tokens_replay"], 1.0),
        "tokens": aux["tokens"],
        "grad_norm": optax.tree.norm(grads),
        "lr": lr_schedule(state.step) if lr_schedule is not None else jnp.zeros(()),
    }
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def make_train_step(config: model_lib.LlamaConfig, tx, mesh, shardings: TrainState, rules,
                    microbatches: int = 1, lr_schedule=None):
    """Jitted step(state, batch) -> (state, metrics) with explicit shardings, state donated."""
    batch_shard = {
        "tokens": sharding_lib.batch_sharding(mesh, 2),
        "segment_ids": sharding_lib.batch_sharding(mesh, 2),
        "is_replay": sharding_lib.batch_sharding(mesh, 1),
    }
    fn = functools.partial(train_step, config, tx, mesh, shardings.params, microbatches,
                           lr_schedule)
    jitted = jax.jit(fn, in_shardings=(shardings, batch_shard),
                     out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=0)

    def step(state, batch):
        with mesh_context(mesh), nn.logical_axis_rules(rules):
            return jitted(state, batch)

    def lower(state, batch):
        with mesh_context(mesh), nn.logical_axis_rules(rules):
            return jitted.lower(state, batch)

    step.lower = lower
    return step


def make_eval_step(config: model_lib.LlamaConfig, mesh, shardings: TrainState, rules):
    """Jitted (params, batch) -> (sum of token losses, token count): token-weighted eval."""
    batch_shard = {k: sharding_lib.batch_sharding(mesh, 2) for k in ("tokens", "segment_ids")}

    def eval_sums(params, batch):
        losses, mask = token_losses(config, params, batch)
        return (losses * mask).sum(), mask.sum()

    jitted = jax.jit(eval_sums, in_shardings=(shardings.params, batch_shard),
                     out_shardings=sharding_lib.replicated(mesh))

    def step(params, batch):
        with mesh_context(mesh), nn.logical_axis_rules(rules):
            return jitted(params, batch)

    return step
