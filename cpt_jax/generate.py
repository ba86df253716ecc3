"""Text generation with a KV cache: how a researcher sanity-checks a continued model.

``generate(config, params, prompt_ids, max_new_tokens, ...)`` continues a batch of prompts
of any lengths. The prompts are left-padded to a common length P and run through the
model once (prefill), which fills a key/value cache of P + max_new_tokens positions per
layer; then one token per step is decoded against the cache in a ``lax.while_loop`` that
stops when every row has produced a stop id (EOS) or the budget is spent. Each row's
positions start at 0 at its first real token and padding is masked out of every key
set, so a row's continuation does not depend on the other prompts in the batch.

The layer math is the model's (``cpt_jax.model``: RMSNorm in float32, rotate-half RoPE with
Llama-3 scaling, grouped-query attention with a float32 softmax, SwiGLU, tied or untied
output), applied to the same parameter tree, in the config's compute dtype. Parameters
keep the shardings they come with (e.g. the run's state shardings), so the jitted decode
runs sharded as the eval step does.

Decoding: greedy (``temperature=0``), or sampling from softmax(logits / temperature)
restricted to the ``top_k`` most likely tokens and/or the smallest set whose probability
reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020), with a key derived from
``seed`` and the step, so a call is a pure function of its arguments.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax import attention as attention_lib
from cpt_jax import model as model_lib

_LAYER_KEYS = ("attn_norm", "attn", "mlp_norm", "mlp")


def _rms_norm(x, scale, eps: float, dtype):
    """``cpt_jax.model.RMSNorm``: normalised in float32, scaled in the compute dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * xf.astype(dtype)


def stacked_layers(config: model_lib.LlamaConfig, params) -> dict:
    """The per-layer parameters stacked on a leading [n_layers] axis (``layers``), also
    for a tree saved with ``scan_layers=False`` (``layers_0`` ... ``layers_{n-1}``)."""
    if "layers" in params:
        return params["layers"]
    per_layer = [params[f"layers_{i}"] for i in range(config.n_layers)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)


def _layer(c: model_lib.LlamaConfig, x_BLD, lp, cos, sin, k_cache, v_cache, index,
           mask_BLT):
    """One decoder layer on new tokens x [B, L, D] written at cache slots index..index+L-1;
    returns (x, k_cache, v_cache) with caches [B, T, KV, Dh]."""
    dtype = jnp.dtype(c.dtype)
    w = lambda *path: functools.reduce(lambda t, k: t[k], path, lp).astype(dtype)
    B, L, _ = x_BLD.shape
    H, K, Dh = c.n_heads, c.n_kv_heads, c.dim_per_head
    h = _rms_norm(x_BLD, lp["attn_norm"]["scale"], c.norm_eps, dtype)
    q = attention_lib.rotate(jnp.einsum("bld,dhk->blhk", h, w("attn", "q", "kernel")), cos, sin)
    k = attention_lib.rotate(jnp.einsum("bld,dhk->blhk", h, w("attn", "k", "kernel")), cos, sin)
    v = jnp.einsum("bld,dhk->blhk", h, w("attn", "v", "kernel"))
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
    q5 = q.reshape(B, L, K, H // K, Dh)  # query heads grouped by their shared kv head
    s = jnp.einsum("blkgd,btkd->bkglt", q5, k_cache,
                   preferred_element_type=jnp.float32) / math.sqrt(Dh)
    s = jnp.where(mask_BLT[:, None, None], s, -jnp.inf)
    probs = jax.nn.softmax(s, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkglt,btkd->blkgd", probs, v_cache).reshape(B, L, H, Dh)
    x = x_BLD + jnp.einsum("blhk,hkd->bld", out, w("attn", "o", "kernel"))
    h = _rms_norm(x, lp["mlp_norm"]["scale"], c.norm_eps, dtype)
    x = x + model_lib.swiglu(h, w("mlp", "gate", "kernel"), w("mlp", "up", "kernel"),
                             w("mlp", "down", "kernel"))
    return x, k_cache, v_cache


def _forward_cached(c: model_lib.LlamaConfig, params, layers, tokens_BL, positions_BL,
                    caches, index, mask_BLT):
    """Logits [B, V] float32 of the last of ``tokens_BL`` and the updated caches
    ([n_layers, B, T, KV, Dh] each)."""
    dtype = jnp.dtype(c.dtype)
    x = params["embed"]["embedding"].astype(dtype)[tokens_BL]
    cos, sin = model_lib.rope_cos_sin(positions_BL, model_lib.rope_inv_freq(c), dtype)

    def body(x, layer):
        lp, kc, vc = layer
        x, kc, vc = _layer(c, x, lp, cos, sin, kc, vc, index, mask_BLT)
        return x, (kc, vc)

    x, caches = jax.lax.scan(body, x, (layers, *caches))
    x = _rms_norm(x[:, -1], params["final_norm"]["scale"], c.norm_eps, dtype)
    out = model_lib.output_matrix(c, params).astype(dtype)
    return (x @ out).astype(jnp.float32), caches


def sample_logits(logits_BV, key, temperature: float, top_k: int, top_p: float):
    """Next tokens [B]: argmax when ``temperature`` is 0, else a draw from
    softmax(logits / temperature) over the ``top_k`` most likely tokens (0: all) and the
    smallest most-likely set whose probability reaches ``top_p`` (1.0: all)."""
    if temperature <= 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        kept = jnp.where(before < top_p, sorted_desc, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature",
                                             "top_k", "top_p", "stop_ids"))
def _generate(params, tokens_BP, pads_B, seed, *, config, max_new_tokens, temperature,
              top_k, top_p, stop_ids):
    c = config
    B, P = tokens_BP.shape
    T = P + max_new_tokens
    layers = stacked_layers(c, params)
    shape = (c.n_layers, B, T, c.n_kv_heads, c.dim_per_head)
    caches = (jnp.zeros(shape, jnp.dtype(c.dtype)), jnp.zeros(shape, jnp.dtype(c.dtype)))
    slots = jnp.arange(T)
    real_T = slots[None, :] >= pads_B[:, None]  # [B, T]: not left padding
    positions = jnp.maximum(jnp.arange(P)[None, :] - pads_B[:, None], 0)
    query = jnp.arange(P)[None, :, None]
    # real tokens see the real tokens up to themselves; a padding slot sees only itself
    # (finite values in its cache slot, which no real token ever reads)
    mask = (real_T[:, None, :] & (slots[None, None, :] <= query)) | (slots == query)
    logits, caches = _forward_cached(c, params, layers, tokens_BP, positions, caches, 0, mask)
    key = jax.random.key(seed)
    stops = jnp.asarray(stop_ids, jnp.int32)

    def cond(carry):
        t, _, _, done, _ = carry
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        t, logits, caches, done, out = carry
        token = sample_logits(logits, jax.random.fold_in(key, t), temperature, top_k, top_p)
        token = jnp.where(done, -1, token)
        out = out.at[:, t].set(token)
        done = done | jnp.isin(token, stops)
        pos = (P + t - pads_B)[:, None]
        step_mask = (real_T & (slots[None, :] <= P + t))[:, None, :]
        logits, caches = _forward_cached(c, params, layers, jnp.maximum(token, 0)[:, None],
                                         pos, caches, P + t, step_mask)
        return t + 1, logits, caches, done, out

    out = jnp.full((B, max_new_tokens), -1, jnp.int32)
    carry = (jnp.int32(0), logits, caches, jnp.zeros((B,), bool), out)
    return jax.lax.while_loop(cond, body, carry)[-1]


def generate(config: model_lib.LlamaConfig, params, prompt_ids: Sequence[Sequence[int]],
             max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = ()
             ) -> list[list[int]]:
    """Continuations of a batch of prompts (lists of token ids, BOS included if wanted):
    per prompt the new token ids, up to and including the first of ``stop_ids`` (EOS),
    at most ``max_new_tokens``. Greedy with ``temperature=0``; see ``sample_logits``."""
    prompts = [list(map(int, p)) for p in prompt_ids]
    if not prompts or any(not p for p in prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token "
                         "(e.g. just BOS)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not 0.0 < top_p <= 1.0 or top_k < 0 or temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0, top_k={top_k} >= 0 and "
                         f"top_p={top_p} in (0, 1]")
    bad = [i for p in prompts for i in p if not 0 <= i < config.vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the model's vocabulary "
                         f"[0, {config.vocab_size})")
    P = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), P), np.int32)
    for row, p in zip(tokens, prompts):
        row[P - len(p):] = p
    pads = np.array([P - len(p) for p in prompts], np.int32)
    out = np.asarray(_generate(params, tokens, pads, int(seed), config=config,
                               max_new_tokens=int(max_new_tokens),
                               temperature=float(temperature), top_k=int(top_k),
                               top_p=float(top_p), stop_ids=tuple(int(s) for s in stop_ids)))
    result = []
    for row in out:
        row = [int(t) for t in row if t >= 0]
        result.append(row)
    return result
