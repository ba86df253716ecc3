"""ConcatRows (joint training over the union of the tasks' rows) and read_rows."""

import json
import pickle

import numpy as np
import pytest

from cpt_jax.data import prepare, rows as rows_lib
from cpt_jax.data import tokenizer as tk
from cpt_jax.replay.sampler import ReplaySampler

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
    rows = rows_lib.ConcatRows(parts)
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
        rows_lib.ConcatRows(_fakes()).read([9])
    with pytest.raises(ValueError, match="seq_len"):
        rows_lib.ConcatRows(_fakes((2,), 4) + _fakes((2,), 5))
    with pytest.raises(ValueError, match="at least one"):
        rows_lib.ConcatRows([])


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
    rows = rows_lib.ConcatRows([a, b])
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
