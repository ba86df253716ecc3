"""Every loss of a run, as sums over tokens so that they add across microbatches and
devices and are normalised once (by the token count they also return or that the caller
knows): next-token cross-entropy, logit distillation toward a teacher (Hinton et al.
2015), and Dark Experience Replay's logit matching (Buzzega et al. 2020) with the top-k
logits it stores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cpt_jax import model as model_lib
from cpt_jax.train.cross_entropy import weighted_ce_sum


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


def ce_loss_sum(config, params, batch, teacher=None, replay=False):
    """(sum of masked token losses, {"tokens", "ce_sum"}) for one (micro)batch.

    The same sum as ``token_losses``' but with the output projection fused into the
    cross-entropy (``cpt_jax.train.cross_entropy``): the batch's [B, L, V] logits are never
    materialised."""
    del teacher, replay
    tokens, seg = batch["tokens"], batch["segment_ids"]
    hidden = model_lib.final_hidden(config, params, tokens[:, :-1], seg[:, :-1])
    mask = loss_mask(batch)
    B, L, D = hidden.shape
    total = weighted_ce_sum(hidden.reshape(B * L, D), model_lib.output_matrix(config, params),
                            tokens[:, 1:].reshape(-1), mask.reshape(-1))
    return total, {"tokens": mask.sum(), "ce_sum": total}


def kl_distill_loss(student_logits_BLV, teacher_logits_BLV, mask_BL, temperature: float = 1.0):
    """(sum over masked tokens of T^2 * KL(p_T || q_T), masked token count), float32.

    ``p_T = softmax(teacher / T)``, ``q_T = softmax(student / T)``, per token, computed with
    log-softmax in float32 (stable for any logit scale). The T^2 factor is Hinton et al.
    2015's: the soft-target gradient ``d KL / d student = (q_T - p_T) / T`` shrinks like
    1/T^2 as T grows (for large T, ``q_T - p_T`` is ~ (logit difference) / (V T)), so
    multiplying by T^2 keeps its magnitude roughly independent of T. The gradient of the
    returned sum w.r.t. a token's student logits is ``T * (q_T - p_T)``. No gradient flows
    into the teacher. Teacher tokens of probability 0 (logit -inf) contribute 0.
    """
    t = float(temperature)
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    log_q = jax.nn.log_softmax(student_logits_BLV.astype(jnp.float32) / t, axis=-1)
    log_p = jax.nn.log_softmax(
        jax.lax.stop_gradient(teacher_logits_BLV).astype(jnp.float32) / t, axis=-1)
    p = jnp.exp(log_p)
    kl_BL = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)
    mask = mask_BL.astype(jnp.float32)
    return (t * t) * jnp.sum(kl_BL * mask), jnp.sum(mask)


def topk_logits(logits_BLV, k: int):
    """(values [B, L, k] float, indices [B, L, k] int32): the k largest logits per token.

    Values keep the logits' dtype and are sorted in decreasing order. What DER stores for a
    row when it is first seen. Memory per token, storing values as 2-byte floats and indices
    as int32 (6 bytes per entry), against the full logits in bf16 (2 bytes per entry):

    - V = 32000 (Llama 2): full 64,000 B/token, 131,072,000 B (131 MB, 125 MiB) per
      2048-token row; top-32: 192 B/token, 393,216 B (384 KiB) per row: 333x less.
    - V = 128256 (Llama 3): full 256,512 B/token (525 MB per row); top-32: 1336x less.

    So 10,000 stored 2048-token rows take 3.9 GB at k = 32, against 1.3 TB of full logits.
    """
    if not 1 <= int(k) <= logits_BLV.shape[-1]:
        raise ValueError(f"k={k} must be in [1, vocab size {logits_BLV.shape[-1]}].")
    values, indices = jax.lax.top_k(logits_BLV, int(k))
    return values, indices.astype(jnp.int32)


def der_loss(student_logits_BLV, stored_values_BLK, stored_indices_BLK, mask_BL):
    """(sum over masked tokens of mean_k (z[idx_k] - v_k)^2, masked token count), float32.

    Dark Experience Replay (Buzzega et al. 2020) adds ``alpha * ||z - h(x)||^2`` on buffer
    examples, where ``h(x)`` are the logits recorded when the example was first seen and z
    the current logits; the authors' code computes it as a mean squared error over the
    logits. DER matches *logits* rather than probabilities on purpose: logits keep the
    information that softmax removes (their scale and shift).

    Variant here: only the k stored entries are compared: the student's logits gathered at
    the stored indices against the stored values, squared error averaged over the k entries
    of a token (so the term's scale does not depend on k), summed over masked tokens. The
    other V - k logits are unconstrained. (An alternative for top-k storage is a KL between
    the stored top-k renormalised by softmax and the student's softmax over the same k
    indices; that ignores logit shifts, which is what DER deliberately does not do.) When
    the replayed rows also get the ordinary next-token loss, as in this codebase's replay,
    the combination is DER++ (Buzzega et al.'s variant with the extra label term).
    """
    gathered_BLK = jnp.take_along_axis(student_logits_BLV.astype(jnp.float32),
                                       stored_indices_BLK.astype(jnp.int32), axis=-1)
    se_BL = jnp.mean(jnp.square(gathered_BLK - stored_values_BLK.astype(jnp.float32)), axis=-1)
    mask = mask_BL.astype(jnp.float32)
    return jnp.sum(se_BL * mask), jnp.sum(mask)
