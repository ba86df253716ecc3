"""Llama in Flax linen, numerically the same function as Hugging Face's LlamaForCausalLM.

Architecture (Touvron et al. 2023, "Llama 2"; Grattafiori et al. 2024, "The Llama 3 Herd of
Models"): pre-norm decoder blocks with RMSNorm, rotary position embeddings (rotate-half
convention, as Hugging Face stores q/k weights), grouped-query attention, SwiGLU MLP, no
biases, optional tied input/output embeddings, and Llama-3 frequency-dependent RoPE scaling.

Beyond the reference, attention respects packed rows: ``segment_ids`` [B, L] mark which
document each token belongs to (0 = padding); a token attends only to earlier tokens of its
own document and its rotary position restarts at 0 with every document.

Every parameter and the main activations carry logical axis names (``embed``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``, ``vocab``, ``batch``, ``length``, ``layers``); a rule set in
the config (see ``cpt_jax.sharding``) decides how they map onto the device mesh.

Parameter tree (``L`` = n_layers, stacked by ``nn.scan`` so compile time does not grow with
depth)::

    embed/embedding                 [V, D]
    layers/attn_norm/scale          [L, D]
    layers/attn/{q,k,v}/kernel      [L, D, H|KV, Dh]
    layers/attn/o/kernel            [L, H, Dh, D]
    layers/mlp_norm/scale           [L, D]
    layers/mlp/{gate,up}/kernel     [L, D, F]
    layers/mlp/down/kernel          [L, F, D]
    final_norm/scale                [D]
    lm_head/kernel                  [D, V]   (absent when tie_embeddings)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from cpt_jax import attention as attention_lib

Array = jax.Array

REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama model. Field names follow the papers, not HF."""

    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    d_ff: int = 11008
    head_dim: int | None = None  # default d_model // n_heads
    rope_theta: float = 10000.0
    # Llama-3 style scaling: None, or dict(factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings).
    rope_scaling: dict | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype, e.g. "bfloat16"
    param_dtype: str = "float32"
    remat: str = "none"  # one of REMAT_POLICIES
    scan_layers: bool = True
    # "auto" (cuDNN flash attention on a GPU with a 16-bit dtype, else "xla"), "xla" or
    # "cudnn": see cpt_jax.attention.
    attention: str = "auto"

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "set head_dim explicitly"
            )
        if self.attention not in attention_lib.IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}: choose one of "
                             f"{attention_lib.IMPLEMENTATIONS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: choose one of {sorted(REMAT_POLICIES)}")
        if self.rope_scaling is not None:
            missing = {"factor", "low_freq_factor", "high_freq_factor",
                       "original_max_position_embeddings"} - set(self.rope_scaling)
            if missing:
                raise ValueError(f"rope_scaling lacks {sorted(missing)} (Llama-3 style scaling)")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, _FrozenDict):
            object.__setattr__(self, "rope_scaling", _FrozenDict(self.rope_scaling))

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, d) -> "LlamaConfig":
        """Build from a mapping (e.g. an ml_collections ConfigDict); unknown keys are an error."""
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown LlamaConfig field(s) {unknown}; valid: {sorted(names)}")
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = dict(d["rope_scaling"])
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.rope_scaling is not None:
            d["rope_scaling"] = dict(self.rope_scaling)
        return d

    def num_params(self, include_embedding: bool = True) -> int:
        d, f, h, kv, dh = self.d_model, self.d_ff, self.n_heads, self.n_kv_heads, self.dim_per_head
        per_layer = d * dh * (2 * h + 2 * kv) + 3 * d * f + 2 * d
        n = self.n_layers * per_layer + d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return n + (emb if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * (matmul params) + 12 * n_layers * seq_len * H * Dh.

        The first term counts forward (2) and backward (4) FLOPs of every weight matmul,
        output projection included and the embedding lookup excluded (it is a gather). The
        second is attention's QK^T and AV, counted over the full L x L square as in PaLM
        (Chowdhery et al. 2022, appendix B), i.e. without halving for the causal mask.
        """
        d, dh = self.d_model, self.dim_per_head
        per_layer = d * dh * (2 * self.n_heads + 2 * self.n_kv_heads) + 3 * d * self.d_ff
        matmul_params = self.n_layers * per_layer + self.vocab_size * d  # no norm scales
        attn = 12 * self.n_layers * seq_len * self.n_heads * self.dim_per_head
        return 6.0 * matmul_params + attn


def resolve_attention(config: LlamaConfig, seq_len: int) -> str:
    """The attention implementation a config runs with on this backend at this sequence
    length ("xla" or "cudnn")."""
    return attention_lib.resolve(config.attention, config.dtype, seq_len)


class _FrozenDict(dict):
    """A hashable dict so that LlamaConfig stays hashable (usable as a jit static arg)."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))

    def __setitem__(self, *_):
        raise TypeError("rope_scaling is immutable")


# ----------------------------------------------------------------------------- rotary


def rope_inv_freq(config: LlamaConfig) -> Array:
    """Inverse frequencies [Dh/2] (float32), with Llama-3 frequency-dependent scaling."""
    dh = config.dim_per_head
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (low frequencies) are slowed down by `factor`, short ones are kept,
    # and the band between is interpolated smoothly.
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions_BL: Array, inv_freq: Array, dtype) -> tuple[Array, Array]:
    """cos and sin [B, L, 1, Dh] of the rotary angles (computed in float32, cast to dtype)."""
    angles = positions_BL[..., None].astype(jnp.float32) * inv_freq  # [B, L, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, L, 1, Dh]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x_BLHD: Array, positions_BL: Array, inv_freq: Array) -> Array:
    """Rotate-half rotary embedding; angles computed in float32, result in x's dtype."""
    cos, sin = rope_cos_sin(positions_BL, inv_freq, x_BLHD.dtype)
    return attention_lib.rotate(x_BLHD, cos, sin)


def positions_from_segments(segment_ids_BL: Array) -> Array:
    """Per-document positions: the index of each token within its own segment."""
    L = segment_ids_BL.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), segment_ids_BL.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids_BL[:, :1], dtype=bool),
         segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1)
    first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - first


# ----------------------------------------------------------------------------- layers


def _dense_init(std: float):
    return nn.initializers.normal(stddev=std)


def _param(module: nn.Module, name: str, shape, axes, std: float, param_dtype):
    """A weight `name`/kernel of `shape` with logical `axes`, drawn from N(0, std^2)."""
    sub = _Kernel(shape=tuple(shape), axes=tuple(axes), std=std, param_dtype=param_dtype,
                  name=name)
    return sub()


class _Kernel(nn.Module):
    """Holds one weight under `<name>/kernel` (the tree layout in the module docstring)."""

    shape: tuple
    axes: tuple
    std: float
    param_dtype: Any

    @nn.compact
    def __call__(self):
        init = nn.with_logical_partitioning(_dense_init(self.std), self.axes)
        return self.param("kernel", init, self.shape, self.param_dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32 and cast back (as Hugging Face does)."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * xf.astype(self.dtype)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL, positions_BL):
        c = self.config
        dtype, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        dh = c.dim_per_head

        def kernel(name, shape, axes, std):
            return _param(self, name, shape, axes, std, pdt).astype(dtype)

        x = x_BLD.astype(dtype)
        wq = kernel("q", (c.d_model, c.n_heads, dh), ("embed", "heads", "head_dim"), c.init_std)
        wk = kernel("k", (c.d_model, c.n_kv_heads, dh), ("embed", "kv_heads", "head_dim"),
                    c.init_std)
        wv = kernel("v", (c.d_model, c.n_kv_heads, dh), ("embed", "kv_heads", "head_dim"),
                    c.init_std)
        o = kernel("o", (c.n_heads, dh, c.d_model), ("heads", "head_dim", "embed"),
                   c.init_std / math.sqrt(2 * c.n_layers))
        inv_freq = rope_inv_freq(c)
        implementation = resolve_attention(c, x.shape[1])
        if implementation == "xla":  # one sublayer with a written-out backward pass
            cos, sin = rope_cos_sin(positions_BL, inv_freq, dtype)
            return attention_lib.attention_block(x, wq, wk, wv, o, cos, sin, segment_ids_BL)
        q = jnp.einsum("bld,dhk->blhk", x, wq)
        k = jnp.einsum("bld,dhk->blhk", x, wk)
        v = jnp.einsum("bld,dhk->blhk", x, wv)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))

        q = apply_rope(q, positions_BL, inv_freq)
        k = apply_rope(k, positions_BL, inv_freq)

        out = attention_lib.dot_product_attention(q, k, v, segment_ids_BL,
                                                  implementation)  # [B, L, H, Dh]
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        return jnp.einsum("blhk,hkd->bld", out, o)


def pinned(x):
    """``x`` as it is, behind an optimisation barrier on CPU. XLA CPU's matmuls want the
    contracted axis last in both operands and copy one of them into that layout; handed a
    transposed operand, XLA folds the transpose into the dot and may copy the larger one
    instead. GPU and TPU matmuls take either layout as it is: no barrier there."""
    return jax.lax.optimization_barrier(x) if jax.default_backend() == "cpu" else x


@jax.custom_vjp
def swiglu(x_BLD, w_gate_DF, w_up_DF, w_down_FD):
    """SwiGLU feed-forward ``(silu(x W_gate) * (x W_up)) W_down`` (Shazeer 2020) with a
    written-out backward pass.

    The backward pass forms the gate and up gradients side by side and multiplies them
    once with the concatenated [W_gate | W_up] for d x and once with x for the weight
    gradients, and computes ``silu'`` from the saved gate pre-activation. Differentiating
    the forward formula instead left XLA CPU with the silu gradient fused into transposed
    copies of the [B L, F] activations. Giving XLA CPU the weights and dy already
    transposed (``pinned``) removes the last transposed [B L, F] copy: the one layout copy
    left is of dy [B L, D]. Both made the CPU train step faster (README, "Sharding and
    speed", has the measurements)."""
    return (nn.silu(x_BLD @ w_gate_DF) * (x_BLD @ w_up_DF)) @ w_down_FD


def _swiglu_fwd(x, wg, wu, wd):
    g, u = x @ wg, x @ wu
    return (nn.silu(g) * u) @ wd, (x, g, u, wg, wu, wd)


def _swiglu_bwd(res, dy_BLD):
    x, g, u, wg, wu, wd = res
    F = g.shape[-1]
    T = dy_BLD.size // dy_BLD.shape[-1]  # tokens
    sig = jax.nn.sigmoid(g)
    act = g * sig  # silu(g)
    dh = dy_BLD @ pinned(wd.T)  # d (silu(g) * u)
    # d W_down = (act u)^T dy, formed as (dy^T (act u))^T: the copy XLA CPU needs to put the
    # contracted token axis last is then of dy [T, D], not of act u [T, F]
    dy_DT = pinned(dy_BLD.reshape(T, -1).T)
    d_wd = pinned(dy_DT @ (act * u).reshape(T, F)).T
    d_gu = jnp.concatenate([dh * u * (sig * (1 + g * (1 - sig))), dh * act], axis=-1)
    dx = d_gu @ pinned(jnp.concatenate([wg, wu], axis=1).T)
    d_wgu = jnp.einsum("...d,...f->df", x, d_gu)
    return dx, d_wgu[:, :F], d_wgu[:, F:], d_wd


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BLD):
        c = self.config
        dtype, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)

        def kernel(name, shape, axes, std):
            return _param(self, name, shape, axes, std, pdt).astype(dtype)

        x = x_BLD.astype(dtype)
        wg = kernel("gate", (c.d_model, c.d_ff), ("embed", "mlp"), c.init_std)
        wu = kernel("up", (c.d_model, c.d_ff), ("embed", "mlp"), c.init_std)
        down = kernel("down", (c.d_ff, c.d_model), ("mlp", "embed"),
                      c.init_std / math.sqrt(2 * c.n_layers))
        return swiglu(x, wg, wu, down)


class Block(nn.Module):
    """One pre-norm decoder layer. Signature (carry, _) -> (carry, None) so nn.scan can stack it."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, carry, _):
        x, segment_ids, positions = carry
        c = self.config
        dtype, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        h = RMSNorm(c.norm_eps, dtype, pdt, name="attn_norm")(x)
        x = x + Attention(c, name="attn")(h, segment_ids, positions)
        h = RMSNorm(c.norm_eps, dtype, pdt, name="mlp_norm")(x)
        x = x + MLP(c, name="mlp")(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, segment_ids, positions), None


class Llama(nn.Module):
    """Llama causal LM. __call__(tokens [B, L], segment_ids [B, L] | None) -> logits [B, L, V] f32.

    With ``return_hidden=True`` it returns ``(hidden [B, L, D] f32, logits)`` instead, where
    ``hidden`` is the final hidden state after ``final_norm``, the input of the output
    projection (``logits = hidden @ lm_head``, or ``hidden @ embedding.T`` when tied).
    With ``logits=False`` it returns only that hidden state, in the compute dtype, and skips
    the projection (``final_hidden``).
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens_BL, segment_ids_BL=None, positions_BL=None,
                 return_hidden: bool = False, logits: bool = True):
        c = self.config
        dtype, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones_like(tokens_BL, dtype=jnp.int32)
        if positions_BL is None:
            positions_BL = positions_from_segments(segment_ids_BL)

        embed = nn.Embed(
            c.vocab_size, c.d_model, dtype=dtype, param_dtype=pdt, name="embed",
            embedding_init=nn.with_logical_partitioning(_dense_init(c.init_std), ("vocab", "embed")))
        x = embed(tokens_BL)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
        carry = (x, segment_ids_BL, positions_BL)
        if c.scan_layers:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            length=c.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
            carry, _ = stack(c, name="layers")(carry, None)
        else:
            for i in range(c.n_layers):
                carry, _ = block(c, name=f"layers_{i}")(carry, None)
        x = RMSNorm(c.norm_eps, dtype, pdt, name="final_norm")(carry[0])
        if not logits:  # the caller applies the output projection (fused cross-entropy)
            return nn.with_logical_constraint(x, ("batch", "length", "embed"))

        if c.tie_embeddings:
            out = embed.attend(x)
        else:
            head = _param(self, "lm_head", (c.d_model, c.vocab_size), ("embed", "vocab"),
                          c.init_std, pdt)
            out = x @ head.astype(dtype)
        out = nn.with_logical_constraint(out.astype(jnp.float32), ("batch", "length", "vocab"))
        if return_hidden:
            hidden = nn.with_logical_constraint(x.astype(jnp.float32), ("batch", "length", "embed"))
            return hidden, out
        return out


def init_params(config: LlamaConfig, key: Array, boxed: bool = False):
    """Random parameters. With boxed=True the leaves keep their nn.Partitioned axis names."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = Llama(config).init(key, tokens)["params"]
    return params if boxed else nn.meta.unbox(params)


def param_logical_axes(config: LlamaConfig):
    """PartitionSpec of logical axis names for every parameter (computed abstractly)."""
    abstract = jax.eval_shape(functools.partial(init_params, config, boxed=True), jax.random.key(0))
    return nn.get_partition_spec(abstract)


def forward(config: LlamaConfig, params, tokens, segment_ids=None, positions=None) -> Array:
    """Logits [B, L, V] in float32 for tokens [B, L] (int). Pure function of its inputs."""
    return Llama(config).apply({"params": params}, tokens, segment_ids, positions)


def final_hidden(config: LlamaConfig, params, tokens, segment_ids=None,
                 positions=None) -> Array:
    """Hidden states [B, L, D] after ``final_norm``, in the compute dtype, without the output
    projection: what ``cpt_jax.core.cross_entropy`` projects chunk by chunk."""
    return Llama(config).apply({"params": params}, tokens, segment_ids, positions,
                               logits=False)


def output_matrix(config: LlamaConfig, params) -> Array:
    """The output projection [D, V] in the parameter dtype: ``lm_head``, or the transposed
    embedding when tied (``logits = final_hidden @ output_matrix`` up to compute-dtype
    rounding)."""
    if config.tie_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def project_hidden(config: LlamaConfig, params, hidden_BLD) -> Array:
    """Logits [B, L, V] float32 of ``final_hidden``'s states, computed as ``forward``
    computes them (the matmul in the hidden states' dtype): the logits of a few rows whose
    body already ran with the rest of the batch (a loss term on replayed rows only)."""
    w = output_matrix(config, params).astype(hidden_BLD.dtype)
    logits = (hidden_BLD @ w).astype(jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def forward_hidden(config: LlamaConfig, params, tokens, segment_ids=None,
                   positions=None) -> tuple[Array, Array]:
    """(final hidden states [B, L, D], logits [B, L, V]), both float32, for tokens [B, L].

    The hidden states are taken after ``final_norm``: the input of the output projection,
    in the compute dtype and then cast (so ``logits`` is their product with the output
    matrix up to that rounding). What last-layer gradient features need
    (``cpt_jax.replay.features``)."""
    return Llama(config).apply({"params": params}, tokens, segment_ids, positions,
                               return_hidden=True)
