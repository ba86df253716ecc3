"""Gradient coresets against brute force and an independent NNLS: CRAIG's greedy facility
location is within (1 - 1/e) of the best subset and its weights count coverage; GRAD-MATCH's
matching pursuit agrees with a numpy/scipy pursuit and its residual never grows."""

import itertools

import numpy as np
import pytest
from scipy.optimize import nnls

from cpt_jax.replay import coresets


def _features(m=9, d=3, seed=0):
    return np.random.default_rng(seed).normal(size=(m, d)).astype(np.float32)


def _facility(f, subset):
    dist = np.linalg.norm(f[:, None, :] - f[None, :, :], axis=-1)
    sim = dist.max() - dist
    return sim[:, list(subset)].max(axis=1).sum(), sim


@pytest.mark.parametrize("seed,k", [(0, 2), (1, 3), (2, 4)])
def test_craig_is_within_1_minus_1_over_e_of_the_best_subset(seed, k):
    f = _features(seed=seed)
    idx, w = coresets.craig(f, k)
    idx, w = np.asarray(idx), np.asarray(w)
    assert len(set(idx.tolist())) == k
    value, sim = _facility(f, idx)
    best = max(_facility(f, s)[0] for s in itertools.combinations(range(len(f)), k))
    assert value >= (1 - 1 / np.e) * best - 1e-4
    np.testing.assert_allclose(float(coresets.facility_location(f, idx)), value, rtol=1e-4)
    # weights: how many candidates each selected row is the most similar selected row for
    owner = sim[:, idx].argmax(axis=1)
    np.testing.assert_array_equal(w, np.bincount(owner, minlength=k))
    assert w.sum() == len(f)


def test_craig_takes_one_row_per_cluster():
    """Three tight, far-apart clusters of 4, 3 and 2 rows: k = 3 picks one of each, and
    the weights are the cluster sizes (a plausible wrong greedy, e.g. by largest norm,
    picks two from one cluster)."""
    rng = np.random.default_rng(3)
    centres = np.array([[0.0, 0.0], [50.0, 0.0], [0.0, 80.0]])
    sizes = [4, 3, 2]
    f = np.concatenate([c + 0.01 * rng.normal(size=(n, 2)) for c, n in zip(centres, sizes)])
    idx, w = coresets.craig(f.astype(np.float32), 3)
    cluster = np.repeat(np.arange(3), sizes)[np.asarray(idx)]
    assert sorted(cluster.tolist()) == [0, 1, 2]
    np.testing.assert_array_equal(np.asarray(w), np.array(sizes)[cluster])


def _numpy_grad_match(f, k):
    """Non-negative OMP written from the paper: residual, most aligned unselected row,
    exact NNLS refit (scipy) on the selected rows."""
    target = f.sum(axis=0)
    chosen, w = [], np.zeros(0)
    for _ in range(k):
        residual = target - (f[chosen].T @ w if chosen else 0.0)
        score = f @ residual
        score[chosen] = -np.inf
        chosen.append(int(np.argmax(score)))
        w, _ = nnls(f[chosen].T.astype(np.float64), target.astype(np.float64))
    return np.array(chosen), w


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grad_match_agrees_with_an_independent_pursuit(seed):
    f = _features(m=12, d=6, seed=seed)
    k = 4
    idx, w = coresets.grad_match(f, k, nnls_steps=2000)
    want_idx, want_w = _numpy_grad_match(f, k)
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    np.testing.assert_allclose(np.asarray(w), want_w, rtol=1e-3, atol=1e-3)
    assert np.all(np.asarray(w) >= 0)


def test_grad_match_residual_never_grows():
    f = _features(m=16, d=5, seed=4)
    target = f.sum(axis=0)
    residuals = []
    for k in range(1, 7):
        idx, w = coresets.grad_match(f, k, nnls_steps=2000)
        residuals.append(np.linalg.norm(target - f[np.asarray(idx)].T @ np.asarray(w)))
    assert all(b <= a + 1e-4 for a, b in zip(residuals, residuals[1:])), residuals
    assert residuals[-1] < 0.5 * residuals[0]


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="k=0"):
        coresets.craig(_features(), 0)
    with pytest.raises(ValueError, match="k=10"):
        coresets.grad_match(_features(), 10)
