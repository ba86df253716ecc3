"""Gradient coresets: pick k of M candidate rows, with weights, whose (projected) gradients
stand in for all M. Pure, jit-able functions of ``features [M, d]`` (one row per
candidate, e.g. projected last-layer gradients) and ``k`` -> ``(indices [k] int32,
weights [k] float32 >= 0)``.

- ``craig`` (Mirzasoleiman et al. 2020, "Coresets for Data-efficient Training of Machine
  Learning Models"): greedy maximisation of the facility-location function
  ``F(S) = sum_i max_{j in S} s(i, j)`` with similarity ``s = d_max - ||f_i - f_j||``;
  a row's weight is the number of candidates it is the most similar selected row for.
  Greedy is within (1 - 1/e) of the best subset (F is monotone submodular).
- ``grad_match`` (Killamsetty et al. 2021, "GRAD-MATCH: Gradient Matching based Data
  Subset Selection for Efficient Deep Model Training"): orthogonal matching pursuit with
  non-negative weights towards the candidates' summed gradient: at each step the row most
  aligned with the residual joins, and the weights are refit by non-negative least
  squares (projected gradient, ``nnls_steps`` steps), so ``sum_j w_j f_j`` approaches
  ``sum_i f_i``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def facility_location(features, indices) -> jax.Array:
    """F(S) of ``craig`` for the rows ``indices``: sum over candidates of their best
    similarity to a selected row."""
    sim = _similarity(jnp.asarray(features, jnp.float32))
    return jnp.sum(jnp.max(sim[:, jnp.asarray(indices)], axis=1))


def _similarity(f):
    sq = jnp.sum(f * f, axis=1)
    dist = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * f @ f.T, 0.0))
    return jnp.max(dist) - dist  # >= 0, largest on the diagonal


@functools.partial(jax.jit, static_argnums=1)
def craig(features, k: int):
    """k rows by greedy facility location and their coverage counts as weights."""
    f = jnp.asarray(features, jnp.float32)
    m = f.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"craig: k={k} must be in [1, {m}]")
    sim = _similarity(f)

    def pick(t, carry):
        best, chosen, taken = carry
        gain = jnp.sum(jnp.maximum(sim - best[:, None], 0.0), axis=0)
        j = jnp.argmax(jnp.where(taken, -jnp.inf, gain))
        return jnp.maximum(best, sim[:, j]), chosen.at[t].set(j), taken.at[j].set(True)

    init = (jnp.zeros(m, jnp.float32), jnp.zeros(k, jnp.int32), jnp.zeros(m, bool))
    _, chosen, _ = jax.lax.fori_loop(0, k, pick, init)
    owner = jnp.argmax(sim[:, chosen], axis=1)  # the selected row each candidate is closest to
    weights = jnp.zeros(k, jnp.float32).at[owner].add(1.0)
    return chosen, weights


def _nnls(gram, rhs, mask, w, steps: int):
    """min_w ||A w - b||^2 over w >= 0 with w = 0 off ``mask``, by projected gradient on
    the normal equations (gram = A A^T, rhs = A b), warm-started at ``w``. The step is
    1 / ||gram||_F, a bound on the spectral norm that costs O(k^2) where an SVD per pick
    costs O(k^3) (README "Replay selection" has the measured difference)."""
    lipschitz = jnp.maximum(jnp.sqrt(jnp.sum(gram * gram)), 1e-12)

    def step(_, w):
        w = w - (gram @ w - rhs) / lipschitz
        return jnp.where(mask, jnp.maximum(w, 0.0), 0.0)

    return jax.lax.fori_loop(0, steps, step, w)


@functools.partial(jax.jit, static_argnums=(1, 2))
def grad_match(features, k: int, nnls_steps: int = 200):
    """k rows by non-negative orthogonal matching pursuit towards ``sum_i features_i``."""
    f = jnp.asarray(features, jnp.float32)
    m = f.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"grad_match: k={k} must be in [1, {m}]")
    target = jnp.sum(f, axis=0)

    def pick(t, carry):
        chosen, taken, rows, gram, rhs, w = carry
        residual = target - rows.T @ w
        score = jnp.where(taken, -jnp.inf, f @ residual)
        j = jnp.argmax(score)
        rows = rows.at[t].set(f[j])
        col = rows @ f[j]
        gram = gram.at[t, :].set(col).at[:, t].set(col)
        rhs = rhs.at[t].set(f[j] @ target)
        mask = jnp.arange(k) <= t
        w = _nnls(gram, rhs, mask, w, nnls_steps)
        return chosen.at[t].set(j), taken.at[j].set(True), rows, gram, rhs, w

    init = (jnp.zeros(k, jnp.int32), jnp.zeros(m, bool), jnp.zeros((k, f.shape[1]), f.dtype),
            jnp.zeros((k, k), f.dtype), jnp.zeros(k, f.dtype), jnp.zeros(k, f.dtype))
    chosen, _, _, _, _, w = jax.lax.fori_loop(0, k, pick, init)
    return chosen, w
