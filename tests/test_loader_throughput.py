"""The loader throughput measurement times real batches of the config's shape, with replay."""

import json
import os

import jax
import numpy as np
import pytest

from cpt_jax import cli
from cpt_jax.eval import loader_throughput as throughput
from cpt_jax.data.prepare import PackedRows

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")


def tiny_config(*overrides):
    # 8 forced CPU devices (conftest): global_batch 16 is 2 rows per batch shard
    return cli.load_config(TINY, [("seq_len", "16"), ("global_batch", "16"), *overrides])


def test_synthetic_source_is_packed_rows_in_vocab(tmp_path):
    src = throughput.synthetic_source(str(tmp_path / "s"), rows=50, seq_len=7, vocab_size=11)
    assert isinstance(src, PackedRows) and len(src) == 50 and src.row_len == 8
    tokens, segs = src.read(np.arange(50))
    assert tokens.min() >= 0 and tokens.max() < 11 and len(np.unique(tokens)) == 11
    assert (segs >= 1).all()  # exactly full rows: no padding
    assert (segs.max(axis=1) > 1).mean() > 0.3  # several documents per row, as packed
    meta = json.load(open(os.path.join(os.path.dirname(src.path), "meta.json")))
    assert meta["splits"]["train"]["rows"] == 50
    other = throughput.synthetic_source(str(tmp_path / "t"), rows=50, seq_len=7,
                                        vocab_size=11, seed=1)
    assert not np.array_equal(other.read(np.arange(50))[0], tokens)


def test_rows_per_source_floor_and_disk_cap():
    assert throughput.rows_per_source(8, 16) == 4096
    assert throughput.rows_per_source(128, 16) == 64 * 128
    rows = throughput.rows_per_source(4096, 2048)
    assert 2 * rows * 2 * 4 * 2049 < 200e6 and rows > 4096


def test_loader_batches_have_the_config_shape_and_replay_the_first_source(tmp_path):
    config = tiny_config()  # replay.rate 0 in the config: measured at 0.25
    parts = throughput.build_loader(config, str(tmp_path))
    assert parts.replay_rate == 0.25 and parts.task == 1
    assert len(parts.sources[0]) == len(parts.sources[1]) == 4096
    n_rep = parts.sampler.n_replay(parts.task, 0)
    assert n_rep == 4
    seen = set()
    for step, batch in enumerate(parts.loader.iterate(parts.task, 0, 3)):
        tokens = np.asarray(batch.arrays["tokens"])
        segs = np.asarray(batch.arrays["segment_ids"])
        assert tokens.shape == segs.shape == (16, 17) and tokens.dtype == np.int32
        assert tokens.min() >= 0 and tokens.max() < config.model.vocab_size
        assert len(batch.arrays["tokens"].sharding.device_set) == len(jax.devices())
        assert batch.n_replay == n_rep == batch.is_replay.sum()
        idx = parts.sampler.batch(parts.task, step)
        rep, new = idx.is_replay, ~idx.is_replay
        assert (idx.domain[rep] == 0).all() and (idx.domain[new] == 1).all()
        np.testing.assert_array_equal(tokens[rep], parts.sources[0].read(idx.row[rep])[0])
        np.testing.assert_array_equal(tokens[new], parts.sources[1].read(idx.row[new])[0])
        # the replayed rows are not what source 1 holds at those row numbers
        assert not np.array_equal(tokens[rep], parts.sources[1].read(idx.row[rep])[0])
        seen.add(tokens.tobytes())
    assert len(seen) == 3  # different rows every step


def test_config_replay_rate_is_used(tmp_path):
    parts = throughput.build_loader(tiny_config(("replay.rate", "0.5")), str(tmp_path))
    assert parts.replay_rate == 0.5 and parts.sampler.n_replay(1, 0) == 8


def test_numbers_are_consistent_and_timed_batches_are_the_loaders(tmp_path, monkeypatch):
    config = tiny_config()
    timed = []
    build = throughput.build_loader

    def spying_build(*args):
        parts = build(*args)
        iterate = parts.loader.iterate

        def recording_iterate(*a, **k):
            for batch in iterate(*a, **k):
                timed.append(batch)
                yield batch

        parts.loader.iterate = recording_iterate
        return parts

    monkeypatch.setattr(throughput, "build_loader", spying_build)
    out = throughput.loader_rows_per_s(config, str(tmp_path), steps=5, prefetch=2)
    assert len(timed) == throughput.WARMUP_BATCHES + 5
    assert {np.asarray(b.arrays["tokens"]).shape for b in timed} == {(16, 17)}
    assert {b.n_replay for b in timed} == {4} == {out["replay_rows"]}
    assert out["steps"] == 5 and out["global_batch"] == 16 and out["seq_len"] == 16
    assert out["replay_rate"] == 0.25
    assert out["batch_s_median"] > 0
    assert out["rows_per_s"] == pytest.approx(16 / out["batch_s_median"], rel=1e-9)
    assert out["tokens_per_s"] == pytest.approx(out["rows_per_s"] * 16, rel=1e-9)


@pytest.mark.parametrize("kwargs, name", [
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(prefetch=0), "prefetch")])
def test_bad_counts_are_named(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        throughput.loader_rows_per_s(tiny_config(), str(tmp_path), **kwargs)


def test_bad_config_is_named_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="config.global_batch=12 must be a multiple of the 8"):
        throughput.build_loader(tiny_config(("global_batch", "12")), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists() or not os.listdir(tmp_path / "w")  # nothing written
    with pytest.raises(ValueError, match="config.seq_len=0"):
        throughput.build_loader(tiny_config(("seq_len", "0")), str(tmp_path))
