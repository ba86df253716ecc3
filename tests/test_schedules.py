"""LR schedules: hand-computed values, continuity, monotone pieces, jit, config dispatch."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cpt_jax.optim import schedules as sch

PEAK, MIN = 1.0, 0.1


def _values(schedule, n):
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(n, dtype=jnp.int32)), np.float64)


def _cos(a, b, frac):  # independent re-statement: a -> b along half a cosine
    return b + (a - b) * (1 + math.cos(math.pi * frac)) / 2


# ---------------------------------------------------------------------------------------
# warmup_cosine (unchanged)


def test_warmup_cosine_values():
    f = sch.warmup_cosine(PEAK, total_steps=110, warmup_steps=10, min_lr=MIN)
    assert float(f(0)) == pytest.approx(0.1)
    assert float(f(9)) == pytest.approx(1.0)
    assert float(f(10)) == pytest.approx(1.0)
    assert float(f(60)) == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert float(f(110)) == pytest.approx(MIN)
    assert float(f(500)) == pytest.approx(MIN)


# ---------------------------------------------------------------------------------------
# rewarm_cosine


def test_rewarm_cosine_hand_values():
    # Tasks [0, 100), [100, 150), [150, 200); warmup 10% of each task: 10, 5, 5 steps.
    f = sch.rewarm_cosine(PEAK, [100, 150, 200], warmup_frac=0.1, min_lr=MIN)
    # Task 0: warmup from 0.
    assert float(f(0)) == pytest.approx(0.1)
    assert float(f(4)) == pytest.approx(0.5)
    assert float(f(9)) == pytest.approx(1.0)
    assert float(f(10)) == pytest.approx(1.0)
    assert float(f(55)) == pytest.approx(0.55)  # cosine midpoint: 45 of 90 decay steps
    assert float(f(99)) == pytest.approx(_cos(1.0, 0.1, 89 / 90))
    # Task 1: re-warm from min_lr over 5 steps, then cosine over 45.
    assert float(f(100)) == pytest.approx(0.1 + 0.9 * 1 / 5)
    assert float(f(104)) == pytest.approx(1.0)
    assert float(f(105)) == pytest.approx(1.0)
    assert float(f(105 + 15)) == pytest.approx(_cos(1.0, 0.1, 15 / 45))
    # Task 2 and past the end.
    assert float(f(150)) == pytest.approx(0.28)
    assert float(f(199)) == pytest.approx(_cos(1.0, 0.1, 44 / 45))
    assert float(f(200)) == pytest.approx(MIN)
    assert float(f(10_000)) == pytest.approx(MIN)


def test_rewarm_cosine_single_task_is_warmup_cosine():
    a = sch.rewarm_cosine(3e-4, [137], warmup_steps=11, min_lr=3e-5)
    b = sch.warmup_cosine(3e-4, 137, 11, 3e-5)
    np.testing.assert_allclose(_values(a, 150), _values(b, 150), rtol=1e-6)


def test_rewarm_cosine_per_task_warmup_and_monotone_pieces():
    bounds, warm = [40, 70, 130], [4, 0, 12]
    v = _values(sch.rewarm_cosine(PEAK, bounds, warmup_steps=warm, min_lr=MIN), 130)
    starts = [0, 40, 70]
    for s, e, w in zip(starts, bounds, warm):
        up, down = v[s:s + w], v[s + w:e]
        assert (np.diff(up) > 0).all()
        assert (np.diff(down) < 0).all()
        assert down[0] == pytest.approx(PEAK)  # the decay starts at the peak
        assert v[s:e].min() >= MIN - 1e-7 and v[s:e].max() <= PEAK + 1e-7
    assert v[40] == pytest.approx(PEAK)  # no warmup in task 1: straight back to peak


def test_rewarm_cosine_continuous_across_boundaries():
    # With warmup, a boundary step moves the LR by no more than one warmup increment:
    # the previous decay ends near min_lr and the re-warm starts from min_lr.
    f = sch.rewarm_cosine(PEAK, [100, 200, 300], warmup_steps=20, min_lr=MIN)
    v = _values(f, 300)
    for b in (100, 200):
        assert abs(v[b] - v[b - 1]) <= (PEAK - MIN) / 20 + 1e-6
        assert v[b - 1] == pytest.approx(MIN, abs=1e-3)


def test_rewarm_cosine_bad_inputs():
    with pytest.raises(ValueError, match="strictly increasing"):
        sch.rewarm_cosine(PEAK, [100, 100], min_lr=MIN)
    with pytest.raises(ValueError, match="Task 1 has 5 steps"):
        sch.rewarm_cosine(PEAK, [100, 105], warmup_steps=10, min_lr=MIN)
    with pytest.raises(ValueError, match="one per task"):
        sch.rewarm_cosine(PEAK, [100, 105], warmup_steps=[1, 2, 3], min_lr=MIN)


# ---------------------------------------------------------------------------------------
# infinite


def _inf(**kw):
    args = dict(peak_lr=PEAK, task_boundaries=[100, 150, 200], warmup_steps=10,
                cooldown_steps=20, constant_lr=0.5, anneal_steps=10, min_lr=0.05)
    args.update(kw)
    return sch.infinite(**args)


def test_infinite_hand_values():
    f = _inf()
    assert float(f(0)) == pytest.approx(0.1)
    assert float(f(9)) == pytest.approx(1.0)
    assert float(f(10)) == pytest.approx(1.0)  # cooldown starts at the peak
    assert float(f(20)) == pytest.approx(0.75)  # cosine midpoint of 1 -> 0.5
    assert float(f(30)) == pytest.approx(0.5)
    assert float(f(89)) == pytest.approx(0.5)
    # Anneal over [90, 100): 0.5 * 0.1 ** ((t - 90 + 1) / 10).
    assert float(f(90)) == pytest.approx(0.5 * 0.1 ** 0.1)
    assert float(f(94)) == pytest.approx(0.5 * 0.1 ** 0.5)
    assert float(f(99)) == pytest.approx(0.05)
    # Next task: straight back to the constant LR (no warmup), anneal over [140, 150).
    assert float(f(100)) == pytest.approx(0.5)
    assert float(f(139)) == pytest.approx(0.5)
    assert float(f(149)) == pytest.approx(0.05)
    assert float(f(150)) == pytest.approx(0.5)
    assert float(f(199)) == pytest.approx(0.05)
    assert float(f(1000)) == pytest.approx(0.05)


def test_infinite_monotone_and_continuous_pieces():
    v = _values(_inf(anneal_steps=[10, 0, 25]), 200)
    assert (np.diff(v[:10]) > 0).all()
    assert (np.diff(v[10:31]) < 0).all()  # cooldown, ending at the constant
    np.testing.assert_allclose(v[30:90], 0.5, rtol=1e-6)
    np.testing.assert_allclose(v[100:175], 0.5, rtol=1e-6)  # task 1 has no anneal
    for lo, hi in ((90, 100), (175, 200)):
        assert (np.diff(v[lo:hi]) < 0).all()
        assert v[hi - 1] == pytest.approx(0.05)
        # exponential: constant ratio between consecutive steps
        ratios = v[lo + 1:hi] / v[lo:hi - 1]
        np.testing.assert_allclose(ratios, ratios[0], rtol=1e-5)
    # Every step inside a phase moves the LR by a small amount (no jumps except the
    # deliberate return to the constant LR after an anneal).
    jumps = np.flatnonzero(np.abs(np.diff(v)) > 0.25)
    assert jumps.tolist() == [99]


def test_infinite_bad_inputs():
    with pytest.raises(ValueError, match="min_lr"):
        _inf(min_lr=0.0)
    with pytest.raises(ValueError, match="Task 0 has 100 steps"):
        _inf(warmup_steps=50, cooldown_steps=45)
    with pytest.raises(ValueError, match="Task 1 has 50 steps"):
        _inf(anneal_steps=[10, 60, 10])


# ---------------------------------------------------------------------------------------
# jit and config


@pytest.mark.parametrize("kind", sch.SCHEDULES)
def test_schedules_jit_with_traced_step(kind):
    cfg = ml_collections.ConfigDict(dict(schedule=kind, lr=1.0, min_lr_ratio=0.1,
                                         warmup_frac=0.1, warmup_steps=None))
    f = sch.make_lr_schedule(cfg, [100, 50, 50])
    steps = jnp.arange(220, dtype=jnp.int32)
    jitted = np.asarray(jax.jit(jax.vmap(f))(steps))
    picks = [0, 9, 10, 55, 99, 100, 149, 150, 199, 200, 219]
    eager = [float(f(s)) for s in picks]  # Python ints, no tracing
    np.testing.assert_allclose(jitted[picks], eager, rtol=1e-6)
    assert jax.jit(f)(jnp.int32(3)).dtype == jnp.float32
    assert np.isfinite(jitted).all() and (jitted >= 0).all()


def test_make_lr_schedule_dispatch():
    base = dict(lr=2.0, min_lr_ratio=0.1, warmup_frac=0.1, warmup_steps=None)
    steps = [100, 50, 50]
    # cosine: over the whole run, warmup 10% of 200.
    f = sch.make_lr_schedule(dict(base, schedule="cosine"), steps)
    g = sch.warmup_cosine(2.0, 200, 20, 0.2)
    np.testing.assert_allclose(_values(f, 210), _values(g, 210))
    # rewarm_cosine: warmup 10% of each task; warmup_steps overrides.
    f = sch.make_lr_schedule(dict(base, schedule="rewarm_cosine", warmup_steps=3), steps)
    g = sch.rewarm_cosine(2.0, [100, 150, 200], warmup_steps=3, min_lr=0.2)
    np.testing.assert_allclose(_values(f, 210), _values(g, 210))
    # infinite: warmup/cooldown fractions of task 0, anneal fraction of each task.
    f = sch.make_lr_schedule(dict(base, schedule="infinite", cooldown_frac=0.2,
                                  constant_lr_ratio=0.5, anneal_frac=0.1), steps)
    g = sch.infinite(2.0, [100, 150, 200], warmup_steps=10, cooldown_steps=20,
                     constant_lr=1.0, anneal_steps=[10, 5, 5], min_lr=0.2)
    np.testing.assert_allclose(_values(f, 210), _values(g, 210))
    # Defaults for the infinite-only keys when absent.
    f = sch.make_lr_schedule(dict(base, schedule="infinite"), steps)
    g = sch.infinite(2.0, [100, 150, 200], 10, 10, 1.0, [10, 5, 5], 0.2)
    np.testing.assert_allclose(_values(f, 210), _values(g, 210))


def test_make_lr_schedule_unknown():
    with pytest.raises(ValueError, match=r"optim.schedule='step'.*rewarm_cosine"):
        sch.make_lr_schedule(dict(schedule="step", lr=1.0), [10])


def test_schedules_accept_step_arrays():
    steps = np.arange(210)
    for f in (sch.rewarm_cosine(PEAK, [100, 150, 200], warmup_steps=5, min_lr=MIN), _inf()):
        np.testing.assert_allclose(np.asarray(f(jnp.asarray(steps))), _values(f, 210),
                                   rtol=1e-6)
