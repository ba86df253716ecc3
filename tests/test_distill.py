"""Distillation terms: KL (closed forms, finite differences), top-k, DER loss, DERStore."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax.methods.der import DERStore
from cpt_jax.methods import der, distill


def _logits(seed, shape=(2, 3, 7), scale=3.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


# ---------------------------------------------------------------------------------------
# KL distillation


def test_kl_zero_for_identical_and_positive_otherwise():
    s, t = _logits(0), _logits(1)
    mask = jnp.asarray([[1, 1, 0], [1, 0, 1]], jnp.float32)
    total, count = distill.kl_distill_loss(s, s, mask, temperature=2.0)
    assert abs(float(total)) < 1e-5 and float(count) == 4.0
    total, _ = distill.kl_distill_loss(s, t, mask, temperature=2.0)
    assert float(total) > 0.1


def test_kl_hand_computed_three_classes():
    # T = 2, teacher/T = log([1, 1, 2]) -> p = [1/4, 1/4, 1/2]; student/T = log([1, 2, 1])
    # -> q = [1/4, 1/2, 1/4]. KL(p || q) = 1/4 ln(1/2) + 1/2 ln 2 = ln2 / 4; times T^2 = ln 2.
    ln2 = math.log(2.0)
    teacher = jnp.asarray([[[0.0, 0.0, 2 * ln2]]])
    student = jnp.asarray([[[0.0, 2 * ln2, 0.0]]])
    mask = jnp.ones((1, 1))
    total, count = distill.kl_distill_loss(student, teacher, mask, temperature=2.0)
    assert float(total) == pytest.approx(ln2, rel=1e-6) and float(count) == 1.0
    # T = 1 on the same logits: p = [1, 1, 4] / 6, q = [1, 4, 1] / 6:
    # KL = 1/6 ln(1/4) + 4/6 ln 4 = ln 2.
    total, _ = distill.kl_distill_loss(student, teacher, mask, temperature=1.0)
    assert float(total) == pytest.approx(ln2, rel=1e-6)


def test_kl_masked_tokens_do_not_count():
    s, t = _logits(2), _logits(3)
    mask = jnp.asarray([[1, 0, 0], [0, 0, 1]], jnp.float32)
    total, _ = distill.kl_distill_loss(s, t, mask, 1.5)
    t_only = t.at[0, 1:].set(s[0, 1:]).at[1, :2].set(s[1, :2])  # masked tokens agree
    other, _ = distill.kl_distill_loss(s, t_only, jnp.ones((2, 3)), 1.5)
    assert float(total) == pytest.approx(float(other), rel=1e-5)


def test_kl_gradient_matches_finite_differences_and_closed_form():
    with jax.enable_x64(True):
        s = jnp.asarray(np.random.default_rng(4).normal(size=(1, 2, 5)) * 2, jnp.float64)
        t = jnp.asarray(np.random.default_rng(5).normal(size=(1, 2, 5)) * 2, jnp.float64)
        mask = jnp.asarray([[1.0, 0.5]], jnp.float64)
        T = 1.7

        @jax.jit
        def f(x):  # computed in float32 inside, hence the loose finite-difference tolerance
            return distill.kl_distill_loss(x, t, mask, T)[0]

        grad = np.asarray(jax.grad(f)(s))
        eps = 1e-2
        fd = np.zeros(s.shape)
        for idx in np.ndindex(*s.shape):
            e = jnp.zeros(s.shape).at[idx].set(eps)
            fd[idx] = (float(f(s + e)) - float(f(s - e))) / (2 * eps)
        np.testing.assert_allclose(grad, fd, atol=2e-4)
        # Closed form: T * (q_T - p_T) per token, times its mask weight.
        q = np.asarray(jax.nn.softmax(s / T, -1))
        p = np.asarray(jax.nn.softmax(t / T, -1))
        np.testing.assert_allclose(grad, T * (q - p) * np.asarray(mask)[..., None], atol=1e-6)
        assert not np.asarray(jax.grad(lambda y: distill.kl_distill_loss(s, y, mask, T)[0])(t)
                              ).any()  # no gradient into the teacher


def test_kl_t_squared_makes_gradient_t_independent_at_high_t():
    # For large T, T * (q_T - p_T) -> ((s - t) - mean(s - t)) / V (Hinton et al. 2015).
    s, t = _logits(6, (1, 1, 6), 1.0), _logits(7, (1, 1, 6), 1.0)
    d = np.asarray(s - t)[0, 0]
    limit = (d - d.mean()) / 6
    for T in (200.0, 400.0):
        g = jax.grad(lambda x: distill.kl_distill_loss(x, t, jnp.ones((1, 1)), T)[0])(s)
        np.testing.assert_allclose(np.asarray(g)[0, 0], limit, atol=5e-3)


def test_kl_finite_with_neg_inf_teacher_logits():
    t = jnp.asarray([[[0.0, -jnp.inf, 1.0]]])
    s = jnp.asarray([[[0.5, 0.2, 0.1]]])
    total, _ = distill.kl_distill_loss(s, t, jnp.ones((1, 1)), 1.0)
    g = jax.grad(lambda x: distill.kl_distill_loss(x, t, jnp.ones((1, 1)), 1.0)[0])(s)
    assert np.isfinite(float(total)) and np.isfinite(np.asarray(g)).all()


# ---------------------------------------------------------------------------------------
# Top-k and DER loss


def test_topk_logits_is_true_topk():
    x = _logits(8, (2, 3, 11))
    values, indices = der.topk_logits(x, 4)
    assert values.shape == indices.shape == (2, 3, 4) and indices.dtype == jnp.int32
    want = np.argsort(-np.asarray(x), axis=-1)[..., :4]
    np.testing.assert_array_equal(np.asarray(indices), want)
    np.testing.assert_array_equal(np.asarray(values),
                                  np.take_along_axis(np.asarray(x), want, -1))
    with pytest.raises(ValueError, match="k=12"):
        der.topk_logits(x, 12)


def test_der_loss_zero_for_own_topk_and_hand_value():
    x = _logits(9)
    v, i = der.topk_logits(x, 3)
    total, count = der.der_loss(x, v, i, jnp.ones((2, 3)))
    assert float(total) == 0.0 and float(count) == 6.0
    # One token, logits [1, 2, 3, 4]; stored (index 3 -> 2.0), (index 0 -> 1.0):
    # differences (4 - 2, 1 - 1) -> mean of squares (4 + 0) / 2 = 2. Second token masked.
    z = jnp.asarray([[[1.0, 2.0, 3.0, 4.0], [9.0, 9.0, 9.0, 9.0]]])
    vals = jnp.asarray([[[2.0, 1.0], [0.0, 0.0]]])
    idx = jnp.asarray([[[3, 0], [1, 2]]], jnp.int32)
    total, count = der.der_loss(z, vals, idx, jnp.asarray([[1.0, 0.0]]))
    assert float(total) == pytest.approx(2.0) and float(count) == 1.0
    # Gradient: 2 (z_idx - v) / k at the stored indices, 0 elsewhere.
    g = jax.grad(lambda a: der.der_loss(a, vals, idx, jnp.asarray([[1.0, 0.0]]))[0])(z)
    np.testing.assert_allclose(np.asarray(g), [[[0.0, 0.0, 0.0, 2.0], [0.0] * 4]])


# ---------------------------------------------------------------------------------------
# DERStore


def _entries(n, L=3, k=2, offset=0.0):
    """Values exactly representable in float16, distinct per row."""
    vals = (np.arange(n * L * k, dtype=np.float32).reshape(n, L, k) / 4 + offset)
    idx = np.arange(n * L * k, dtype=np.int32).reshape(n, L, k) % 50
    return vals, idx


def test_store_selection_is_deterministic_sample():
    store = DERStore(k=2, rows_per_domain=10, seed=3)
    sel = store.selected(0, 1000)
    assert sel.size == 10 and np.unique(sel).size == 10 and sel.min() >= 0 and sel.max() < 1000
    np.testing.assert_array_equal(sel, DERStore(2, 10, seed=3).selected(0, 1000))
    assert not np.array_equal(sel, store.selected(1, 1000))
    assert not np.array_equal(sel, DERStore(2, 10, seed=4).selected(0, 1000))
    np.testing.assert_array_equal(store.selected(0, 7), np.arange(7))  # fewer rows than cap
    wants = store.wants(0, np.arange(1000), 1000)
    np.testing.assert_array_equal(np.flatnonzero(wants), sel)


def test_store_add_has_get_round_trip():
    store = DERStore(k=2, rows_per_domain=3)
    v, i = _entries(2)
    assert store.add(1, [5, 9], v, i) == 2
    np.testing.assert_array_equal(store.has(1, [9, 5, 4]), [True, True, False])
    np.testing.assert_array_equal(store.has([0, 1], [5, 5]), [False, True])
    gv, gi = store.get(1, [9, 5])
    np.testing.assert_array_equal(gv, v[::-1])
    np.testing.assert_array_equal(gi, i[::-1])
    # First logits win: re-adding a stored row changes nothing.
    v2, i2 = _entries(2, offset=100.0)
    assert store.add(1, [5, 7], v2, i2) == 1
    np.testing.assert_array_equal(store.get(1, [5])[0], v[:1])
    np.testing.assert_array_equal(store.get(1, [7])[0], v2[1:])
    assert len(store) == 3 and store.nbytes == 3 * 3 * 2 * (2 + 4)
    # Mixed domains with missing rows.
    with pytest.raises(KeyError, match="domain 0, row 5"):
        store.get([1, 0], [5, 5])
    gv, _ = store.get([1, 0], [5, 5], fill_missing=True)
    np.testing.assert_array_equal(gv[0], v[0])
    assert not gv[1].any()
    with pytest.raises(ValueError, match="over rows_per_domain=3"):
        store.add(1, [11], *_entries(1))
    with pytest.raises(ValueError, match="k=2"):
        store.add(2, [0], np.zeros((1, 3, 4)), np.zeros((1, 3, 4), np.int32))


def test_store_round_trips_through_arrays():
    """to_arrays / from_arrays: what run checkpoints store (tests/test_resume.py)."""
    store = DERStore(k=2, rows_per_domain=4, seed=11)
    store.add(0, [3, 1], *_entries(2))
    store.add(2, [8], *_entries(1, offset=7.0))
    arrays = store.to_arrays()
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in arrays.values())
    back = DERStore.from_arrays(arrays)
    assert (back.k, back.rows_per_domain, back.seed) == (2, 4, 11)
    assert back.values_dtype == np.float16 and len(back) == 3
    for d, rows in ((0, [1, 3]), (2, [8])):
        for a, b in zip(back.get(d, rows), store.get(d, rows)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.selected(0, 100), store.selected(0, 100))
