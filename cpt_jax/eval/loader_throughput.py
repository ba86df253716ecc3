"""How many rows per second a run's input pipeline delivers, measured on synthetic data.

A train step can only be as fast as its batches arrive. ``loader_rows_per_s`` measures
the input side alone, for a config's batch shape (``global_batch`` rows of
``seq_len + 1`` tokens, ids below ``model.vocab_size``) and with replay, so that a step
time can be compared with the rate at which the loader can feed it.

The data is synthetic but the pipeline is not: two sources of random token ids, packed
from documents of random lengths into rows with segment ids and written as array_record
by the writer that data preparation uses (``cpt_jax.data.packed_rows``), are opened as
``PackedRows``, sampled by a ``ReplaySampler`` built with the run's seed and accounting,
and read by the run's ``BatchLoader`` on the mesh of ``config.mesh``. The timed batches
are those of the second task, which replays rows of the first at ``replay.rate`` (0.25
when the config has no replay), so every batch reads from both files, as during
continual pre-training. A run's replay policy, rate schedule and per-method extras are
not reproduced: replay is uniform over the first source at a constant rate.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import NamedTuple

import jax
import numpy as np

from cpt_jax import sharding as sharding_lib
from cpt_jax.data import packed_rows
from cpt_jax.data.loader import BatchLoader
from cpt_jax.replay.sampler import ReplaySampler

DEFAULT_REPLAY_RATE = 0.25  # the paper's common setting, when the config replays nothing
WARMUP_BATCHES = 3  # untimed: thread start-up, first file opens, first transfers
MIN_ROWS = 4096  # rows per source, at least 64 global batches of rows when larger
SOURCE_BYTES_CAP = 90_000_000  # per source: two sources stay under 200 MB on disk
MEASURED_TASK = 1  # the second task: new rows of source 1, replayed rows of source 0


class ThroughputLoader(NamedTuple):
    """The pieces ``loader_rows_per_s`` times: ``loader`` reads batches of task ``task``,
    mixing ``sampler.n_replay(task, step)`` rows of ``sources[0]`` into rows of
    ``sources[1]``, at replay fraction ``replay_rate``."""

    loader: BatchLoader
    sampler: ReplaySampler
    sources: list
    task: int
    replay_rate: float


def loader_rows_per_s(config, workdir: str, steps: int = 50, prefetch: int = 2) -> dict:
    """Rows per second the run's ``BatchLoader`` delivers for ``config``'s batch shape.

    Writes two synthetic packed-row sources in ``workdir`` (a scratch directory), then
    times ``steps`` batches of the second task, read ``prefetch``
    steps ahead on the loader's thread, after ``WARMUP_BATCHES`` untimed ones. A batch
    counts as delivered once its arrays are ready on the devices. ``batch_s_median`` is
    the median time between consecutive delivered batches; ``rows_per_s`` is
    ``global_batch / batch_s_median`` and ``tokens_per_s`` is ``rows_per_s * seq_len``
    (the tokens a train step learns from per row).

    Returns {"rows_per_s", "tokens_per_s", "batch_s_median", "steps", "global_batch",
    "seq_len", "replay_rate", "replay_rows"}: ``replay_rows`` is how many rows of each
    timed batch were replayed.
    """
    _check_count("steps", steps, 1)
    _check_count("prefetch", prefetch, 1)
    parts = build_loader(config, workdir)
    intervals = _time_batches(parts.loader, parts.task, steps, prefetch)
    median = statistics.median(intervals)
    rows_per_s = config.global_batch / median
    return {"rows_per_s": rows_per_s, "tokens_per_s": rows_per_s * config.seq_len,
            "batch_s_median": median, "steps": int(steps),
            "global_batch": int(config.global_batch), "seq_len": int(config.seq_len),
            "replay_rate": parts.replay_rate,
            "replay_rows": parts.sampler.n_replay(parts.task, WARMUP_BATCHES)}


def build_loader(config, workdir: str) -> ThroughputLoader:
    """Synthetic sources in ``workdir`` (a scratch directory) and the sampler and loader
    a run would build on them (single process; the mesh of ``config.mesh``)."""
    _check_config(config)
    rate = replay_rate(config)
    mesh = sharding_lib.make_mesh(config.mesh.to_dict())
    _check_batch_shards(config.global_batch, mesh)
    rows = rows_per_source(config.global_batch, config.seq_len)
    names = [f"synthetic{i}" for i in range(MEASURED_TASK + 1)]
    sources = [synthetic_source(os.path.join(workdir, name), rows, config.seq_len,
                                config.model.vocab_size, seed=(int(config.seed), i))
               for i, name in enumerate(names)]
    sampler = ReplaySampler([len(s) for s in sources], config.global_batch, rate=rate,
                            accounting=config.replay.accounting, seed=config.seed,
                            names=names)
    return ThroughputLoader(BatchLoader(sampler, sources, mesh), sampler, sources,
                            MEASURED_TASK, rate)


def replay_rate(config) -> float:
    """The replay fraction to measure with: ``config.replay.rate``, or 0.25 when it is 0."""
    rate = float(config.replay.rate)
    if not 0.0 <= rate <= 1.0:  # also rejects NaN
        raise ValueError(f"config.replay.rate={config.replay.rate} must be in [0, 1].")
    return rate if rate > 0 else DEFAULT_REPLAY_RATE


def rows_per_source(global_batch: int, seq_len: int) -> int:
    """Rows of each synthetic source: max(64 * global_batch, 4096), so batches are not
    the same few rows again, capped at ``SOURCE_BYTES_CAP`` bytes of records (about 5,500
    rows at seq_len 2048), so that both sources fit in under 200 MB."""
    record_bytes = 2 * 4 * (seq_len + 1)  # int32 tokens and segment ids
    return max(1, min(max(64 * global_batch, MIN_ROWS), SOURCE_BYTES_CAP // record_bytes))


def synthetic_source(folder: str, rows: int, seq_len: int, vocab_size: int,
                     seed=0) -> packed_rows.PackedRows:
    """A train split of exactly ``rows`` packed rows of random token ids in
    ``[0, vocab_size)``, written to the new folder ``folder`` as data preparation lays out
    a domain (scratch data: the caller gives a fresh directory)."""
    os.makedirs(folder)
    spec = {"format": packed_rows.FORMAT_VERSION, "writer": packed_rows.WRITER_OPTIONS,
            "rows": int(rows), "seq_len": int(seq_len), "vocab_size": int(vocab_size),
            "seed": [int(s) for s in np.atleast_1d(seed)]}
    _write_split(folder, os.path.basename(folder), spec)
    return packed_rows.PackedRows(os.path.join(folder, "train.array_record"))


def _write_split(folder: str, name: str, spec: dict) -> None:
    """train.array_record of random documents, through preparation's split writer, and a
    meta.json (written last) that ``PackedRows`` reads and checks."""
    row_len = spec["seq_len"] + 1
    writer = packed_rows.SplitWriter(
        os.path.join(folder, "train.array_record"), row_len, pad_id=0)
    try:
        for doc in random_documents(spec["rows"] * row_len, row_len, spec["vocab_size"],
                                    spec["seed"]):
            writer.add(doc, 0)
    finally:
        stats = writer.close()
    files = {"train.array_record": packed_rows.file_integrity(
        os.path.join(folder, "train.array_record"))}
    meta = {**spec, "name": name, "synthetic": True, "row_len": row_len,
            "record": "int32 [2, seq_len + 1]: tokens, segment_ids (0 = padding)",
            "pad_id": 0, "n_documents": stats["docs"], "splits": {"train": stats},
            "files": files}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)


def random_documents(total_tokens: int, row_len: int, vocab_size: int, seed=0):
    """Documents of uniformly random ids in ``[0, vocab_size)`` with lengths uniform in
    ``[1, 2 * row_len)`` (about two per row), ``total_tokens`` tokens in all, so they pack
    into exactly ``total_tokens / row_len`` full rows."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, total_tokens, dtype=np.int32)
    lengths = rng.integers(1, 2 * row_len, total_tokens // row_len + 2)
    while lengths.sum() < total_tokens:  # rare: too many short draws
        lengths = np.concatenate([lengths, rng.integers(1, 2 * row_len, len(lengths))])
    ends = np.minimum(np.cumsum(lengths), total_tokens)
    starts = np.concatenate([[0], ends[:-1]])
    for a, b in zip(starts, ends):
        if b > a:
            yield tokens[a:b]


def _time_batches(loader: BatchLoader, task: int, steps: int, prefetch: int) -> list[float]:
    """Seconds between consecutive batches ready on the devices, for ``steps`` batches
    after ``WARMUP_BATCHES`` untimed ones."""
    intervals, last = [], None
    for i, batch in enumerate(loader.iterate(task, 0, WARMUP_BATCHES + steps, prefetch)):
        jax.block_until_ready(batch.arrays)
        now = time.perf_counter()
        if i >= WARMUP_BATCHES:
            intervals.append(now - last)
        last = now
    return intervals


def _check_config(config) -> None:
    """The shape keys the measurement needs, as positive integers."""
    for key, value in (("global_batch", config.global_batch), ("seq_len", config.seq_len),
                       ("model.vocab_size", config.model.vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{key}={value!r} must be an integer >= 1.")


def _check_batch_shards(global_batch: int, mesh) -> None:
    """Fail before writing any data when the batch does not split over the mesh (the
    loader's own check, made early)."""
    div = sharding_lib.batch_divisor(mesh)
    if global_batch % div:
        raise ValueError(f"config.global_batch={global_batch} must be a multiple of the "
                         f"{div} batch shards (mesh data x fsdp); change global_batch or "
                         f"config.mesh.")


def _check_count(name: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name}={value!r} must be an integer >= {least}.")
