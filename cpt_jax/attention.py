"""Causal grouped-query attention over packed rows, in two implementations.

Both compute ``softmax(q k^T / sqrt(Dh) + mask) v`` per head, where a query attends to a key
only if the key is not later and lies in the same document (``segment_ids``, 0 = padding),
with scores and softmax in float32 whatever the compute dtype (as Hugging Face's Llama).

- ``"xla"`` (any backend): the scores are materialised in float32 one query block at a
  time (``query_blocks``: block [lo, hi) against keys [0, hi), so the causal mask's upper
  triangle is mostly skipped), but only the row log-sum-exp [B, K, G, L] is kept for the
  backward pass, which recomputes the probabilities and uses the FlashAttention-2 gradient
  (Dao 2023, "FlashAttention-2", section 2.3: ``dS = P * (dP - rowsum(dO * O))``) instead of
  differentiating through the softmax. Stacked over layers by ``nn.scan``, the probabilities
  of every layer are then never held at once (16 x 32 MB at 99M, 4 x 512; 16 x 512 MB at
  seq 2048), and the softmax backward is one fused pass (its CPU timings, and the query
  blocks', are in README "Sharding and speed"). On a CPU, where host memory is plentiful
  and the recomputation (a matmul and an exp pass per block) is not cheap, the sublayer
  keeps the probabilities for its backward pass when they are small
  (``keeps_probabilities``), computed as the backward would recompute them, so the
  gradients are the same bits either way.
- ``"cudnn"`` (NVIDIA GPU, bfloat16/float16): cuDNN's fused flash attention through
  ``jax.nn.dot_product_attention(implementation="cudnn")``, causal, with the same-document
  mask passed as its boolean mask (cuDNN adds it as a bias, so packed rows stay exact).

``"auto"`` picks cudnn on a GPU with a 16-bit compute dtype (and a length that is a
multiple of 64) and xla otherwise. On the xla
path the model runs the whole sublayer (projections, rotary embedding, attention, output
projection) as ``attention_block``, whose backward pass is written out too.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def resolve(implementation: str, dtype, seq_len: int) -> str:
    """The implementation ``"auto"`` stands for on this backend, compute dtype and length:
    cudnn on a GPU with a 16-bit dtype and a length cuDNN tiles (a multiple of 64; it
    refuses others), else xla."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r}: choose one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    tiled = seq_len % 64 == 0
    return "cudnn" if half and tiled and jax.default_backend() == "gpu" else "xla"


def attention_mask(segment_ids_BL):
    """[B, L, S] bool: key s is visible from query l (s <= l, same document)."""
    return _block_mask(segment_ids_BL, segment_ids_BL, 0)


def _block_mask(segment_ids_BLq, segment_ids_BS, offset: int):
    """[B, Lq, S] bool for queries at positions offset .. offset + Lq - 1 and keys 0 .. S - 1:
    key s visible from query l iff s <= l and both lie in one document."""
    Lq, S = segment_ids_BLq.shape[-1], segment_ids_BS.shape[-1]
    causal = jnp.arange(S)[None, :] <= jnp.arange(Lq)[:, None] + offset
    return causal[None] & (segment_ids_BLq[:, :, None] == segment_ids_BS[:, None, :])


# Query blocks of the xla path: up to MAX_QUERY_BLOCKS blocks of at least MIN_QUERY_BLOCK
# queries. More blocks skip more of the causal square but make smaller matmuls; the
# bounds were chosen by the sweep of block counts in README "Sharding and speed".
MIN_QUERY_BLOCK = 32
MAX_QUERY_BLOCKS = 8
# At most this many float32 probabilities per layer are kept for the backward pass
# (32 MB), and only on CPU (``keeps_probabilities``).
KEEP_PROBABILITIES_MAX = 1 << 23


def query_blocks(L: int) -> list[tuple[int, int]]:
    """Static [lo, hi) query blocks covering 0 .. L - 1, as even as L allows.

    A block attends to keys [0, hi) only: a causal query never sees a later key, so the
    scores right of each block's diagonal are never computed. With n blocks that skips
    (n - 1) / 2n of the L x L square, and each block's scores are a 1/n-th of the layer's.
    """
    n = max(1, min(MAX_QUERY_BLOCKS, L // MIN_QUERY_BLOCK))
    edges = [round(i * L / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def keeps_probabilities(batch: int, heads: int, L: int) -> bool:
    """Whether ``attention_block`` keeps its [B, K, G, hi - lo, hi] probabilities per query
    block for the backward pass instead of recomputing them: on CPU, when they number at
    most ``KEEP_PROBABILITIES_MAX`` floats (the step timings are in README "Sharding and
    speed"). Accelerators recompute them: their memory is the scarcer resource."""
    n = batch * heads * sum((hi - lo) * hi for lo, hi in query_blocks(L))
    return jax.default_backend() == "cpu" and n <= KEEP_PROBABILITIES_MAX


def dot_product_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, implementation="xla"):
    """Attention output [B, L, H, Dh] in q's dtype (H a multiple of the K kv heads)."""
    if implementation == "cudnn":
        mask = attention_mask(segment_ids_BL)[:, None]  # [B, 1, L, S], broadcast over heads
        return jax.nn.dot_product_attention(q_BLHD, k_BLKD, v_BLKD, mask=mask, is_causal=True,
                                            implementation="cudnn")
    if implementation != "xla":
        raise ValueError(f"attention implementation {implementation!r}: use xla or cudnn "
                         "(resolve 'auto' with cpt_jax.attention.resolve)")
    B, L, H, D = q_BLHD.shape
    K = k_BLKD.shape[2]
    q = q_BLHD.reshape(B, L, K, H // K, D)  # query heads grouped by their shared kv head
    out = _attention(q, k_BLKD, v_BLKD, segment_ids_BL)
    return out.reshape(B, L, H, D)


def _masked_scores(q_BLKGD, k_BSKD, segment_ids_BL, lo: int, hi: int):
    """Scaled scores [B, K, G, hi - lo, hi] float32 of queries lo .. hi - 1 against keys
    0 .. hi - 1, -inf where masked."""
    D = q_BLKGD.shape[-1]
    s = jnp.einsum("blkgd,bskd->bkgls", q_BLKGD[:, lo:hi], k_BSKD[:, :hi],
                   preferred_element_type=jnp.float32) / math.sqrt(D)
    mask = _block_mask(segment_ids_BL[:, lo:hi], segment_ids_BL[:, :hi], lo)[:, None, None]
    return jnp.where(mask, s, -jnp.inf)


def _forward(q, k, v, segment_ids, keep: bool = False):
    """(output [B, L, K, G, D], row log-sum-exp [B, K, G, L, 1], kept probabilities),
    block by query block. With ``keep``, the probabilities [B, K, G, hi - lo, hi] of each
    block as ``_attention_bwd`` would recompute them (``exp(scores - lse)``, not the
    forward's ``e / total``), else None."""
    outs, lses, kept = [], [], []
    for lo, hi in query_blocks(q.shape[1]):
        s = _masked_scores(q, k, segment_ids, lo, hi)
        m = jnp.max(s, axis=-1, keepdims=True)  # finite: every query sees itself
        e = jnp.exp(s - m)
        total = jnp.sum(e, axis=-1, keepdims=True)
        probs = (e / total).astype(v.dtype)
        outs.append(jnp.einsum("bkgls,bskd->blkgd", probs, v[:, :hi]))
        lses.append(m + jnp.log(total))
        if keep:
            kept.append(jnp.exp(s - lses[-1]))
    return (jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=3),
            tuple(kept) if keep else None)


@jax.custom_vjp
def _attention(q_BLKGD, k_BSKD, v_BSKD, segment_ids_BL):
    return _forward(q_BLKGD, k_BSKD, v_BSKD, segment_ids_BL)[0]


def _attention_fwd(q, k, v, segment_ids):
    out, lse, _ = _forward(q, k, v, segment_ids)
    return out, (q, k, v, segment_ids, out, lse, None)


def _attention_bwd(res, d_out):
    """Gradients of q, k, v from the residuals; ``probs``: the forward's kept
    probabilities per query block, or None to recompute them from the log-sum-exp."""
    q, k, v, segment_ids, out, lse, probs = res
    L = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    # rowsum(dP * P) = rowsum(dO * O): the softmax Jacobian without an [L, S] reduction
    delta = jnp.einsum("blkgd,blkgd->bkgl", d_out.astype(jnp.float32),
                       out.astype(jnp.float32))[..., None]
    dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for i, (lo, hi) in enumerate(query_blocks(L)):
        p = (probs[i] if probs is not None else
             jnp.exp(_masked_scores(q, k, segment_ids, lo, hi) - lse[:, :, :, lo:hi]))
        do = d_out[:, lo:hi]
        dp = jnp.einsum("blkgd,bskd->bkgls", do, v[:, :hi], preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[:, :, :, lo:hi]) * scale).astype(q.dtype)
        dq.append(jnp.einsum("bkgls,bskd->blkgd", ds, k[:, :hi]))
        # keys 0 .. hi - 1 collect this block's share; the rest of dk, dv is untouched
        pad = [(0, 0), (0, L - hi), (0, 0), (0, 0)]
        dv += jnp.pad(jnp.einsum("bkgls,blkgd->bskd", p.astype(v.dtype), do,
                                 preferred_element_type=jnp.float32), pad)
        dk += jnp.pad(jnp.einsum("bkgls,blkgd->bskd", ds, q[:, lo:hi],
                                 preferred_element_type=jnp.float32), pad)
    return jnp.concatenate(dq, axis=1), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def rotate(x_BLHD, cos_BL1D, sin_BL1D):
    """Rotary embedding, rotate-half convention: ``x cos + rotate_half(x) sin``."""
    half = x_BLHD.shape[-1] // 2
    rotated = jnp.concatenate([-x_BLHD[..., half:], x_BLHD[..., :half]], axis=-1)
    return x_BLHD * cos_BL1D + rotated * sin_BL1D


def _unrotate(dy_BLHD, cos_BL1D, sin_BL1D):
    """The transpose of ``rotate`` (a rotation by -angle): ``dy cos - rotate_half(dy sin)``."""
    return rotate(dy_BLHD, cos_BL1D, -sin_BL1D)


@jax.custom_vjp
def attention_block(x_BLD, wq_DHK, wk_DKK, wv_DKK, wo_HKD, cos_BL1D, sin_BL1D, segment_ids_BL):
    """The whole attention sublayer on the "xla" path: q/k/v projections, rotary
    embedding, causal attention within documents, output projection; [B, L, D] -> [B, L, D].

    Its backward pass is written out: the attention core's as in ``_attention_bwd``, the
    rotary embedding's as the inverse rotation, and the three input projections' as one
    matmul with the concatenated [W_q | W_k | W_v] for d x and one with x for their
    weights. Autodiff of the same forward left XLA CPU with transposed copies around every
    projection and rotation, which this form avoids (the step's timings are in README
    "Sharding and speed")."""
    return _block_fwd(x_BLD, wq_DHK, wk_DKK, wv_DKK, wo_HKD, cos_BL1D, sin_BL1D,
                      segment_ids_BL)[0]


def _block_fwd(x, wq, wk, wv, wo, cos, sin, segment_ids):
    B, L, _ = x.shape
    H, K, D = wq.shape[1], wk.shape[1], wq.shape[2]
    q = rotate(jnp.einsum("bld,dhk->blhk", x, wq), cos, sin)
    k = rotate(jnp.einsum("bld,dhk->blhk", x, wk), cos, sin)
    v = jnp.einsum("bld,dhk->blhk", x, wv)
    q5 = q.reshape(B, L, K, H // K, D)
    out5, lse, probs = _forward(q5, k, v, segment_ids, keeps_probabilities(B, H, L))
    y = jnp.einsum("blhk,hkd->bld", out5.reshape(B, L, H, D), wo)
    return y, (x, q5, k, v, out5, lse, probs, wq, wk, wv, wo, cos, sin, segment_ids)


def _block_bwd(res, dy_BLD):
    x, q5, k, v, out5, lse, probs, wq, wk, wv, wo, cos, sin, segment_ids = res
    B, L, D_model = x.shape
    H, K, D = wq.shape[1], wk.shape[1], wq.shape[2]
    out = out5.reshape(B, L, H, D)
    d_wo = jnp.einsum("blhk,bld->hkd", out, dy_BLD)
    d_out5 = jnp.einsum("bld,hkd->blhk", dy_BLD, wo).reshape(q5.shape)
    dq5, dk, dv, _ = _attention_bwd((q5, k, v, segment_ids, out5, lse, probs), d_out5)
    dq = _unrotate(dq5.reshape(B, L, H, D), cos, sin)
    dk = _unrotate(dk, cos, sin)
    # the three projections as one: [B L, (H + 2K) Dh] against [D, (H + 2K) Dh]
    d_qkv = jnp.concatenate([dq.reshape(B, L, H * D), dk.reshape(B, L, K * D),
                             dv.reshape(B, L, K * D)], axis=-1)
    w_qkv = jnp.concatenate([wq.reshape(D_model, H * D), wk.reshape(D_model, K * D),
                             wv.reshape(D_model, K * D)], axis=-1)
    dx = d_qkv @ w_qkv.T
    d_w = jnp.einsum("bld,blf->df", x, d_qkv)
    d_wq = d_w[:, :H * D].reshape(wq.shape)
    d_wk = d_w[:, H * D:(H + K) * D].reshape(wk.shape)
    d_wv = d_w[:, (H + K) * D:].reshape(wv.shape)
    return dx, d_wq, d_wk, d_wv, d_wo, None, None, None


attention_block.defvjp(_block_fwd, _block_bwd)
