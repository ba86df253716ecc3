"""The language-model loss every run trains on: next-token cross-entropy as a sum over
tokens, so that it adds across microbatches and devices and is normalised once (by the
token count it also returns). The methods' own terms live with each method
(``cpt_jax.methods.distill``, ``cpt_jax.methods.der``)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from cpt_jax import model as model_lib
from cpt_jax.core.cross_entropy import weighted_ce_sum


def token_losses(config, params, batch):
    """Per-token cross-entropy [B, L] (float32), its mask [B, L] and the logits [B, L, V].

    The mask is 1 where the target is in the input's document; a batch with ``row_weight``
    [B] (a weighted replay pool's loss weights) scales each row's mask by its weight, so
    every loss and token count built on the mask is the weighted one."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    logits = model_lib.forward(config, params, tokens[:, :-1], seg[:, :-1])
    targets = tokens[:, 1:]
    mask = loss_mask(batch)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return losses, mask, logits


def loss_mask(batch):
    """[B, L] float32: 1 where the target is in the input's document, times ``row_weight``."""
    seg = batch["segment_ids"]
    mask = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)).astype(jnp.float32)
    if "row_weight" in batch:
        mask = mask * batch["row_weight"].astype(jnp.float32)[:, None]
    return mask


def fused_ce_sum(config, params, batch):
    """(sum of masked token losses, mask [B, L], final hidden states [B, L, D]) for one
    (micro)batch.

    The same sum as ``token_losses``' but with the output projection fused into the
    cross-entropy (``cpt_jax.core.cross_entropy``): the batch's [B, L, V] logits are never
    materialised. The hidden states let a caller project a few rows itself (a loss term on
    replayed rows only, ``cpt_jax.methods.compose``)."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    hidden = model_lib.final_hidden(config, params, tokens[:, :-1], seg[:, :-1])
    mask = loss_mask(batch)
    B, L, D = hidden.shape
    total = weighted_ce_sum(hidden.reshape(B * L, D), model_lib.output_matrix(config, params),
                            tokens[:, 1:].reshape(-1), mask.reshape(-1))
    return total, mask, hidden


def ce_loss_sum(config, params, batch, teacher=None, replay=False, replay_rows=0):
    """(sum of masked token losses, {"tokens", "ce_sum"}) for one (micro)batch, by
    ``fused_ce_sum``. Takes (and ignores) the arguments every train loss takes: the
    teacher and which rows are replayed matter only to the methods' terms."""
    del teacher, replay, replay_rows
    total, mask, _ = fused_ce_sum(config, params, batch)
    return total, {"tokens": mask.sum(), "ce_sum": total}
