"""Replay-rate schedules (hand values, bounds, sampler use) and ConcatRows (joint training)."""

import json
import math
import pickle

import numpy as np
import pytest

from cpt_jax.data import mixing, prepare
from cpt_jax.data import tokenizer as tk
from cpt_jax.data.sampler import ReplaySampler

# ---------------------------------------------------------------------------------------
# Replay-rate schedules


def test_constant_and_linear_decay_values():
    f = mixing.replay_rate_schedule("constant", 0.25, 100, end_rate=0.9)
    assert [f(s) for s in (0, 50, 100, 1000)] == [0.25] * 4
    f = mixing.replay_rate_schedule("linear_decay", 0.5, 100)
    assert f(0) == 0.5
    assert f(25) == pytest.approx(0.375)
    assert f(50) == pytest.approx(0.25)
    assert f(100) == 0.0 and f(250) == 0.0
    f = mixing.replay_rate_schedule("linear_decay", 0.2, 10, end_rate=0.6)  # may rise too
    assert f(5) == pytest.approx(0.4) and f(10) == pytest.approx(0.6)


def test_exp_decay_values():
    # rate 0.5 -> 0.05 over 100 steps: 0.5 * 0.1 ** (s / 100).
    f = mixing.replay_rate_schedule("exp_decay", 0.5, 100, end_rate=0.05)
    assert f(0) == 0.5
    assert f(50) == pytest.approx(0.5 / math.sqrt(10))
    assert f(100) == pytest.approx(0.05) and f(10**6) == pytest.approx(0.05)
    # Constant factor per step.
    v = np.asarray([f(s) for s in range(101)])
    np.testing.assert_allclose(v[1:] / v[:-1], 0.1 ** 0.01)
    # Mix-review's per-epoch decay d over E epochs: end_rate = rate * d**E.
    g = mixing.replay_rate_schedule("exp_decay", 0.8, 30, end_rate=0.8 * 0.7 ** 3)
    assert g(10) == pytest.approx(0.8 * 0.7) and g(20) == pytest.approx(0.8 * 0.49)


@pytest.mark.parametrize("kind", mixing.RATE_SCHEDULES)
def test_schedules_stay_in_bounds_and_are_pure(kind):
    for rate, end in ((1.0, 1e-9), (0.3, 0.3), (1e-6, 1e-7)):
        f = mixing.replay_rate_schedule(kind, rate, 7, end_rate=end)
        v = [f(s) for s in range(20)]
        assert all(0.0 <= x <= 1.0 and isinstance(x, float) for x in v)
        assert v == [f(s) for s in range(20)]


def test_schedule_bad_inputs():
    with pytest.raises(ValueError, match=r"replay.schedule='cosine'.*exp_decay"):
        mixing.replay_rate_schedule("cosine", 0.5, 10)
    with pytest.raises(ValueError, match="replay.rate=1.5"):
        mixing.replay_rate_schedule("constant", 1.5, 10)
    with pytest.raises(ValueError, match="end_rate"):
        mixing.replay_rate_schedule("exp_decay", 0.5, 10)  # end_rate 0
    with pytest.raises(ValueError, match="span_steps"):
        mixing.replay_rate_schedule("constant", 0.5, 0)
    with pytest.raises(ValueError, match=">= 0"):
        mixing.replay_rate_schedule("linear_decay", 0.5, 10)(-1)


def test_schedule_drives_the_sampler():
    f = mixing.replay_rate_schedule("linear_decay", 0.5, 8)
    sampler = ReplaySampler([40, 40], global_batch=8, rate=f)
    # round(rate * 8): 0.5 -> 4, step 4: 0.25 -> 2, step 8 on: 0.
    assert [sampler.n_replay(1, s) for s in (0, 4, 8, 9)] == [4, 2, 0, 0]
    assert sampler.n_replay(0, 0) == 0
    b = sampler.batch(1, 0)
    assert b.is_replay.sum() == 4 and (b.domain[b.is_replay] == 0).all()


# ---------------------------------------------------------------------------------------
# ConcatRows


class _FakeRows:
    """The PackedRows interface over in-memory arrays; counts read calls."""

    def __init__(self, tokens, seq_len):
        self.tokens, self.seq_len, self.row_len = tokens, seq_len, seq_len + 1
        self.calls = 0

    def __len__(self):
        return len(self.tokens)

    def read(self, indices):
        self.calls += 1
        idx = np.asarray(indices, np.int64)
        return self.tokens[idx], self.tokens[idx] % 3


def _fakes(sizes=(3, 1, 5), seq_len=4):
    out, base = [], 0
    for n in sizes:
        rows = np.arange(base, base + n * (seq_len + 1), dtype=np.int32).reshape(n, seq_len + 1)
        out.append(_FakeRows(rows, seq_len))
        base += rows.size
    return out


def test_concat_rows_maps_global_ids_with_one_read_per_source():
    parts = _fakes()
    rows = mixing.ConcatRows(parts)
    assert len(rows) == 9 and rows.seq_len == 4 and rows.row_len == 5
    idx = np.asarray([8, 0, 3, 3, 4, 2, 5])  # any order, repeats
    tokens, segs = rows.read(idx)
    owner = [(2, 4), (0, 0), (1, 0), (1, 0), (2, 0), (0, 2), (2, 1)]  # by hand
    want = np.stack([parts[s].tokens[r] for s, r in owner])
    np.testing.assert_array_equal(tokens, want)
    np.testing.assert_array_equal(segs, want % 3)
    assert tokens.dtype == segs.dtype == np.int32
    assert [p.calls for p in parts] == [1, 1, 1]
    rows.read([0, 1])
    assert [p.calls for p in parts] == [2, 1, 1]  # only the owning source is read
    np.testing.assert_array_equal(rows.read(np.arange(9))[0],
                                  np.concatenate([p.tokens for p in parts]))
    assert rows.read([])[0].shape == (0, 5)


def test_concat_rows_bad_inputs():
    with pytest.raises(IndexError, match=r"\[0, 9\)"):
        mixing.ConcatRows(_fakes()).read([9])
    with pytest.raises(ValueError, match="seq_len"):
        mixing.ConcatRows(_fakes((2,), 4) + _fakes((2,), 5))
    with pytest.raises(ValueError, match="at least one"):
        mixing.ConcatRows([])


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Two tiny prepared jsonl domains: {name: PackedRows of its train split}."""
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "cat", "dog", "sun", "rain", "x = 1"]
    domains = []
    for name in ("a", "b"):
        path = root / f"{name}.jsonl"
        with open(path, "w") as f:
            for _ in range(30):
                f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(3, 20)))})
                        + "\n")
        domains.append({"name": name, "kind": "jsonl", "pattern": str(path), "field": "text"})
    tok = tk.train_tokenizer(domains, str(root / "tok"), 300, sample_chars=20_000)
    out = prepare.prepare_domains(domains, tok, str(root / "data"), seq_len=8,
                                  val_fraction=0.1, progress=False)
    return {name: splits["train"] for name, splits in out.items()}


def test_concat_rows_over_prepared_domains(packed):
    a, b = packed["a"], packed["b"]
    rows = mixing.ConcatRows([a, b])
    assert len(a) > 5 and len(b) > 5, (len(a), len(b))
    assert len(rows) == len(a) + len(b) and rows.row_len == 9
    rng = np.random.default_rng(1)
    idx = rng.integers(0, len(rows), size=20)
    tokens, segs = rows.read(idx)
    for j, i in enumerate(idx):
        src, local = (a, i) if i < len(a) else (b, i - len(a))
        t, s = src.read([local])
        np.testing.assert_array_equal(tokens[j], t[0])
        np.testing.assert_array_equal(segs[j], s[0])
    # Picklable (loader workers) and usable as one task by the sampler.
    again = pickle.loads(pickle.dumps(rows))
    np.testing.assert_array_equal(again.read(idx)[0], tokens)
    batch = ReplaySampler([len(rows)], global_batch=4).batch(0, 0)
    assert rows.read(batch.row)[0].shape == (4, 9)
