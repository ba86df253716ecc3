"""Per-row gradient features for gradient coresets: projected last-layer gradients.

``cpt_jax.replay.coresets`` (``craig``, ``grad_match``) choose rows from ``features [M, d']``,
one vector per candidate row standing for that row's gradient. A full per-row gradient has
as many entries as the model, so, as CRAIG (Mirzasoleiman et al. 2020, "Coresets for
Data-efficient Training of Machine Learning Models") and GRAD-MATCH (Killamsetty et al.
2021, "GRAD-MATCH: Gradient Matching based Data Subset Selection for Efficient Deep Model
Training") do for deep networks, we use the gradient with respect to the last layer only:
the variation of gradient norms across examples is mostly captured by the gradient at the
last layer (the argument of Katharopoulos & Fleuret 2018, which both papers follow), and
it needs nothing but the forward pass.

For an LLM the last layer is the output projection ``W`` [d, V] (``lm_head``, or the
transposed embedding when tied). Row r's gradient of its MEAN next-token loss is

    G_r = (1 / n_r) sum_t m_t h_t (softmax(z_t) - e_{y_t})^T            [d, V]

with ``h_t`` the final hidden state (after ``final_norm``), ``z_t`` the logits, ``y_t``
the target and ``m_t`` the token mask of ``cpt_jax.core.losses.token_losses`` (target in
the same document as the input, not padding), ``n_r = sum_t m_t`` (a row with no token has
G_r = 0). The mean, not the sum, so that rows of different lengths compare.

``d * V`` is 65M numbers for Llama-2 7B, per row: ``dense_last_layer_grads`` forms it only
as the reference for tiny models. ``projected_last_layer_grads`` never does. It sketches
``G_r`` with a Kronecker-factored Gaussian projection (as LoGra, Choe et al. 2024, does per
layer): ``P_h`` [d, a] with entries N(0, 1/a), ``P_v`` [V, b] with entries N(0, 1/b),

    feature_r = vec(P_h^T G_r P_v)
              = vec( (1 / n_r) sum_t m_t (P_h^T h_t) (P_v^T p_t - P_v[y_t])^T )    [a * b]

so each token costs one [d] x [d, a] and one [V] x [V, b] product (``P_v^T e_y`` is the
row gather ``P_v[y]``), and no [d, V] matrix exists at any point. Since E[P P^T] = I for
both factors and they are independent, E <feature_r, feature_s> = <G_r, G_s> (Frobenius):
inner products, norms and distances of gradients are preserved in expectation, with
relative variance of a norm ``2/(ab) + 2(a+b+1)/(ab) * ||G G^T||^2 / ||G||^4`` (at most
``(1+2/a)(1+2/b) - 1``, for a rank-one G; much less for rows of many tokens).

``make_feature_step`` is the jitted, sharded entry point the training loop calls (the
batch's rows over the batch axes, parameters as the run shards them, features replicated).

``trajectory_features`` concatenates features taken at several parameter points (e.g.
checkpoints along training, or several inits), as Balles et al. 2022 ("Gradient-Matching
Coresets for Rehearsal-Based Continual Learning") do to pick a coreset whose gradients
match along the trajectory rather than at one point.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax import model as model_lib
from cpt_jax import sharding as sharding_lib


# ----------------------------------------------------------------------------- the pieces


def _row_terms(mcfg: model_lib.LlamaConfig, params, batch):
    """(hidden [B, L, d], probabilities [B, L, V], targets [B, L], token weights [B, L]),
    float32; a token's weight is m_t / n_r (0 for masked tokens and empty rows)."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    hidden, logits = model_lib.forward_hidden(mcfg, params, tokens[:, :-1], seg[:, :-1])
    targets = tokens[:, 1:]
    mask = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)).astype(jnp.float32)
    n = jnp.sum(mask, axis=1, keepdims=True)
    weights = mask / jnp.maximum(n, 1.0)
    return hidden, jax.nn.softmax(logits, axis=-1), targets, weights


def dense_last_layer_grads(mcfg: model_lib.LlamaConfig, params, batch) -> jax.Array:
    """Gradients [B, d * V] (float32) of every row's mean token loss with respect to the
    output matrix in the [d, V] layout (``lm_head``'s; for tied embeddings, the output-side
    part of the embedding's gradient, transposed), flattened row-major.

    The plain reference: it forms a [B, d, V] array, so tiny models only.
    """
    hidden, probs, targets, weights = _row_terms(mcfg, params, batch)
    resid = probs - jax.nn.one_hot(targets, mcfg.vocab_size, dtype=jnp.float32)
    g = jnp.einsum("bl,bld,blv->bdv", weights, hidden, resid)
    return g.reshape(g.shape[0], -1)


@dataclasses.dataclass(frozen=True)
class Projection:
    """The two factors of the sketch: ``hidden`` P_h [d, a] ~ N(0, 1/a) and ``vocab``
    P_v [V, b] ~ N(0, 1/b), float32; ``dim = a * b`` features per row."""

    hidden: jax.Array
    vocab: jax.Array

    @property
    def dim(self) -> int:
        return int(self.hidden.shape[1] * self.vocab.shape[1])


jax.tree_util.register_dataclass(Projection, data_fields=["hidden", "vocab"], meta_fields=[])


def factor_dim(d: int, vocab: int, dim: int) -> tuple[int, int]:
    """(a, b) with a * b = dim, a <= d, b <= vocab, as balanced as possible: a is the
    smallest divisor of ``dim`` that is >= sqrt(dim) and fits (b = dim / a).

    Balanced factors because the norm's relative variance grows like 2/a + 2/b for
    low-rank row gradients (a few tokens), which a = b = sqrt(dim) minimises for a given
    dim; a is taken on the larger side because the hidden side is the cheaper one. Square
    dims (256 = 16 x 16, 1024 = 32 x 32) factor exactly; a prime dim gives a = 1 or b = 1,
    an unbiased but much noisier sketch.
    """
    for name, v in (("dim", dim), ("d", d), ("vocab", vocab)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    if dim > d * vocab:
        raise ValueError(f"dim={dim} exceeds the dense last-layer gradient's d * vocab = "
                         f"{d} * {vocab} = {d * vocab}; choose a smaller dim")
    small = [i for i in range(1, math.isqrt(dim) + 1) if dim % i == 0]
    divisors = sorted(a for a in set(small) | {dim // i for i in small}
                      if a <= d and dim // a <= vocab)
    if not divisors:
        raise ValueError(f"dim={dim} has no factorisation a * b with a <= d={d} and "
                         f"b <= vocab={vocab}; choose a dim such as a power of two")
    root = math.isqrt(dim)
    root += root * root < dim  # ceil(sqrt(dim))
    above = [a for a in divisors if a >= root]
    a = min(above) if above else max(divisors)
    return a, dim // a


def make_projection(d: int, vocab: int, dim: int, seed: int) -> Projection:
    """The seeded sketch of ``dim`` features (factored by ``factor_dim``) for hidden size
    ``d`` and vocabulary ``vocab``. The same (d, vocab, dim, seed) give the same matrices on
    every backend and device count (threefry random bits)."""
    a, b = factor_dim(d, vocab, dim)
    kh, kv = jax.random.split(jax.random.key(int(seed)))
    return Projection(
        hidden=jax.random.normal(kh, (d, a), jnp.float32) / math.sqrt(a),
        vocab=jax.random.normal(kv, (vocab, b), jnp.float32) / math.sqrt(b))


def projected_last_layer_grads(mcfg: model_lib.LlamaConfig, params, batch,
                               projection: Projection) -> jax.Array:
    """Features [B, a * b] (float32): row r's ``vec(P_h^T G_r P_v)``, equal to projecting
    ``dense_last_layer_grads`` with the same factors, computed per token in [a] and [b]."""
    if projection.hidden.shape[0] != mcfg.d_model or projection.vocab.shape[0] != mcfg.vocab_size:
        raise ValueError(
            f"projection is for d={projection.hidden.shape[0]}, vocab="
            f"{projection.vocab.shape[0]}; the model has d_model={mcfg.d_model}, "
            f"vocab_size={mcfg.vocab_size}: build it with "
            "make_projection(d_model, vocab_size, ...)")
    hidden, probs, targets, weights = _row_terms(mcfg, params, batch)
    ph, pv = projection.hidden, projection.vocab
    h_a = jnp.einsum("nld,da->nla", hidden, ph)  # [B, L, a]
    r_b = jnp.einsum("nlv,vb->nlb", probs, pv) - jnp.take(pv, targets, axis=0)  # [B, L, b]
    f = jnp.einsum("nl,nla,nlb->nab", weights, h_a, r_b)
    return f.reshape(f.shape[0], -1)


# ----------------------------------------------------------------------------- sharded step


def make_feature_step(placement, dim: int, seed: int):
    """Jitted ``(params, batch) -> features [B, dim]`` float32 (replicated), for a batch
    ``{"tokens", "segment_ids"}`` of [B, L+1] int32 rows sharded over the batch axes and
    parameters sharded as ``placement.shardings.params`` (``cpt_jax.core.state.Placement``;
    shardings that are a params sharding tree also work). The projection of
    (``dim``, ``seed``) is built once and passed replicated, so it is not a compile-time
    constant. Rows are independent: a row's features do not depend on the other rows of
    the batch (padding rows give zeros) or on the mesh, up to float rounding."""
    mcfg, mesh = placement.mcfg, placement.mesh
    projection = make_projection(mcfg.d_model, mcfg.vocab_size, dim, seed)
    param_shard = getattr(placement.shardings, "params", placement.shardings)
    batch_shard = {k: sharding_lib.batch_sharding(mesh, 2) for k in ("tokens", "segment_ids")}
    rep = sharding_lib.replicated(mesh)
    projection = jax.device_put(projection, rep)

    def features(params, batch, proj):
        return projected_last_layer_grads(mcfg, params, batch, proj)

    jitted = jax.jit(features, in_shardings=(param_shard, batch_shard, rep), out_shardings=rep)

    def step(params, batch):
        batch = {k: batch[k] for k in ("tokens", "segment_ids")}
        with placement.activate():
            return jitted(params, batch, projection)

    def lower(params, batch):
        batch = {k: batch[k] for k in ("tokens", "segment_ids")}
        with placement.activate():
            return jitted.lower(params, batch, projection)

    step.lower = lower
    step.projection = projection
    return step


# ----------------------------------------------------------------------------- trajectories


def trajectory_features(blocks: Sequence) -> jax.Array:
    """Features of the same M rows at several parameter points -> [M, sum_i d_i] float32.

    Balles et al. 2022 match gradients along the training trajectory, not at one point:
    the coreset is chosen on the concatenation of the features from each point. Gradient
    scales differ by orders of magnitude across points (early gradients are large), so
    block i is divided by its root-mean-square row norm ``sqrt(mean_r ||f_ir||^2)``: after
    scaling every block has mean squared row norm 1, so every point contributes equally,
    on average, to the squared norms, inner products and distances ``craig`` and
    ``grad_match`` use. An all-zero block is kept as zeros.
    """
    blocks = [jnp.asarray(b, jnp.float32) for b in blocks]
    if not blocks:
        raise ValueError("blocks is empty: pass one [M, d_i] feature array per parameter point")
    bad = [i for i, b in enumerate(blocks) if b.ndim != 2]
    if bad:
        raise ValueError(f"blocks {bad} are not 2-D [M, d_i] arrays "
                         f"(shapes {[blocks[i].shape for i in bad]})")
    rows = {b.shape[0] for b in blocks}
    if len(rows) != 1:
        raise ValueError(f"blocks have different row counts {[b.shape[0] for b in blocks]}; "
                         "every parameter point must featurise the same M rows")
    out = []
    for b in blocks:
        rms = jnp.sqrt(jnp.mean(jnp.sum(b * b, axis=1)))
        out.append(b / jnp.where(rms > 0, rms, 1.0))
    return jnp.concatenate(out, axis=1)
