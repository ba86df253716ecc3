"""Tokenize and pack a domain into fixed-length rows stored as array_record files.

Each document becomes ``[BOS] doc [EOS]``; the token streams of a split's documents are
concatenated and cut into rows of ``seq_len + 1`` tokens (the model reads ``row[:-1]`` and
predicts ``row[1:]``). Alongside the tokens each row has segment ids: 1, 2, 3, ... for the
documents within that row (a document that overflows a row continues in the next row under
that row's first segment id), and 0 for the padding at the end of the last row of each
unit's split (see Units), the only padding there is. Padding tokens are the tokenizer's pad id (0 if it has none).

The train/validation split is by document: a document goes to validation when a seeded
hash of its text falls below ``val_fraction`` (so identical documents never straddle the
split, and adding documents does not move the others). If that leaves validation empty
but the domain has at least two documents, the train documents with the smallest hash
(every copy of that text) are moved to validation. A domain of one document (a book, a
manual, one text file) is split inside it: the last ``val_fraction`` of its tokens (at
least one) are its validation rows. So every domain has validation rows and training rows.

Units. The documents, in source order, are cut into units by the data alone: a unit ends
at the first document boundary past ``SHARD_CHARS`` characters or ``SHARD_DOCS``
documents. Each unit is packed on its own (its last row of each split padded), so the
files do not depend on how many processes made them: ``workers`` tokenizer processes
(one process reads, splits, packs and writes in order), or several hosts each writing
its share of the units (``shard=(i, n)``: units ``u % n == i``) into
``<data_dir>/.parts-<folder>/``, assembled by ``finalize_domain``. A text file is read
and tokenized in parts (``sources.iter_long_documents``), so memory does not grow with
its size; a long document's ids wait in a temporary file until its split is known.

Layout, one folder per (domain, source content, tokenizer, seq_len, split settings)::

    <data_dir>/<domain name>-<key[:12]>/train-NNNNN.array_record   unit NNNNN's rows:
    <data_dir>/<domain name>-<key[:12]>/val-NNNNN.array_record     one record per row,
    <data_dir>/<domain name>-<key[:12]>/meta.json                  int32 [2, seq_len + 1]
                                                                   (tokens, segment_ids)

(a unit with no row in a split has no file; ``meta.json`` lists each split's shards;
folders of format 1 hold one ``train.array_record`` and are still read).

``key`` hashes the domain's spec without where it lives (``sources.identity``), the
source's content fingerprint (each file's size and sha256, hashed once and remembered by
(path, size, mtime) in ``<data_dir>/file_hashes.json``; TFDS files; or the Python version
for demos), the tokenizer's sha256, the packing settings and the unit size, so a touched
or copied corpus reuses its folder and changed bytes make a new one. A folder is written
under a temporary name (``.tmp-<folder>@host@pid@x``) and renamed when complete, so a
failure (or a concurrent writer) never leaves a half-written dataset; a temporary folder
whose process is gone is removed by the next preparation on its host. SIGTERM and Ctrl-C
stop a preparation with ``PreparationStopped`` (one line), keeping complete folders and
units.

Integrity. ``meta.json`` records each array_record file's size and sha256 (``"files"``).
Opening a prepared folder (``PackedRows``, so also a cache hit of ``prepare_domain``)
checks that every file exists with its recorded size: a deleted or truncated file is
reported at once. A same-length overwrite is caught by array_record's own per-chunk
checksums when a damaged row is read (and by the record count when the file is first
opened), or at open time with ``verify_sha256=True``, which re-hashes every file: a full
read of the domain, so it is off by default (README "Preparing data at scale" gives the
hashing rate). Every such failure raises ``CorruptDataError`` naming the
file and the folder to delete. A damaged folder is never repaired in place: delete it and
prepare again (preparation is deterministic, so the same rows come back).

Modules. This one is the orchestration: ``prepare_domain(s)``, ``finalize_domain(s)``,
the key and folder of a domain, and the unit size and pool threshold (``SHARD_CHARS``,
``SHARD_DOCS``, ``POOL_MIN_CHARS``: read here when a domain's job is made, so setting
them on this module takes effect). The parts: ``packing`` (rows and segment ids, the
split score; pure), ``packed_rows`` (the row files: format, writer, reader and integrity),
``prepare_units`` (reading, splitting and writing units, and assembling a folder),
``tokenizing`` (in this process or a worker pool), ``temp_folders``, ``stop_signals``,
``prepare_progress`` and ``prepare_errors``. The names other code uses are re-exported
here (``__all__``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

from cpt_jax.data import sources
from cpt_jax.data.packed_rows import (FORMAT_VERSION, SPLITS, WRITER_OPTIONS, PackedRows,
                                      is_complete)
from cpt_jax.data.packing import RowPacker, pack_documents, split_score
from cpt_jax.data.prepare_errors import (CorruptDataError, PreparationStopped, PrepareError,
                                         out_of_space)
from cpt_jax.data.prepare_units import Job, assemble, unit_name
from cpt_jax.data.stop_signals import check_stopped, stop_on_signals
from cpt_jax.data.temp_folders import remove_dead_temps, temp_dir
from cpt_jax.data.tokenizer import Tokenizer

__all__ = ["FORMAT_VERSION", "POOL_MIN_CHARS", "SHARD_CHARS", "SHARD_DOCS", "SPLITS",
           "WRITER_OPTIONS", "CorruptDataError", "PackedRows", "PreparationStopped",
           "PrepareError", "RowPacker", "dataset_key", "default_workers", "domain_folder",
           "finalize_domain", "finalize_domains", "pack_documents", "prepare_domain",
           "prepare_domains", "remove_dead_temps", "split_score", "staging_dir"]

# A domain's documents, in source order, are cut into units ("shards") by the data alone:
# a unit ends at the first document boundary past SHARD_CHARS characters or SHARD_DOCS
# documents. Each unit is packed on its own (its last row of each split padded) into its
# own array_record file per split, so the prepared files do not depend on how many worker
# processes or hosts prepared them.
SHARD_CHARS = 64_000_000
SHARD_DOCS = 1_000_000
# Below this many characters a preparation tokenizes in its own process (a worker pool
# costs about a second to start); the files are the same either way.
POOL_MIN_CHARS = 4_000_000


def default_workers(workers: int | None = None) -> int:
    """``workers`` if positive, else the machine's cores (as this process may use)."""
    if workers:
        return max(1, int(workers))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def dataset_key(domain: Any, tokenizer: Tokenizer, seq_len: int, val_fraction: float,
                seed: int, val_only: bool = False) -> str:
    """sha256 of everything a prepared domain depends on (see the module docstring): the
    domain's spec without where it lives (``sources.identity``), its content fingerprint,
    the tokenizer's hash, the packing and split settings and the unit size."""
    d = sources.normalize_domain(domain)
    record = {"format": FORMAT_VERSION, "domain": sources.identity(d),
              "source": sources.source_fingerprint(d), "tokenizer": tokenizer.sha256,
              "seq_len": int(seq_len), "val_fraction": float(val_fraction),
              "seed": int(seed), "writer": WRITER_OPTIONS,
              "shard": [SHARD_CHARS, SHARD_DOCS]}
    if val_only:  # only then, so the keys of fully prepared domains stay as they were
        record["val_only"] = True
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()
                          ).hexdigest()


def domain_folder(domain: Any, tokenizer: Tokenizer, data_dir: str, seq_len: int,
                  val_fraction: float = 0.01, seed: int = 0, val_only: bool = False
                  ) -> tuple[str, str]:
    """(key, folder) of a domain's prepared data."""
    d = sources.normalize_domain(domain)
    key = dataset_key(d, tokenizer, seq_len, val_fraction, seed, val_only)
    return key, os.path.join(os.path.expanduser(data_dir), f"{d['name']}-{key[:12]}")


def prepare_domain(domain: Any, tokenizer: Tokenizer, data_dir: str, seq_len: int,
                   val_fraction: float = 0.01, seed: int = 0, progress: bool = True,
                   verify_sha256: bool = False, val_only: bool = False,
                   workers: int | None = 1, shard: tuple[int, int] | None = None,
                   finalize: bool = True) -> dict[str, PackedRows] | None:
    """Prepares one domain (or reuses it) and returns {"train": PackedRows, "val": ...}.

    ``val_only``: a domain that is only evaluated (held out): its training documents are
    split off as usual but neither tokenized nor written, so its train split has 0 rows
    (its own folder: the key records it).

    ``workers``: tokenizer processes (None or 0: the machine's cores); the files are the
    same for any number. ``shard=(i, n)``: prepare only the units ``u`` with ``u % n ==
    i`` into the shared staging folder ``<data_dir>/.parts-<folder>`` (every process reads
    the whole source, and tokenizes and writes its share); with ``finalize=False`` that
    is all (returns None), with ``finalize=True`` the units are assembled into the final
    folder once all are there (``finalize_domain``; an error names the missing ones).
    Without ``shard`` one process does everything in a private temporary folder.

    A reused folder is checked against its meta.json (files present, sizes; with
    ``verify_sha256`` also their hashes, a full read); a damaged one raises
    ``CorruptDataError`` naming the folder to delete. It is not rebuilt automatically:
    damage after a completed preparation means a disk, copy or concurrent-writer problem
    worth seeing, and other processes may be reading that folder.
    """
    d = sources.normalize_domain(domain)
    if int(seq_len) < 1:
        raise PrepareError(f"seq_len must be >= 1, got {seq_len}.")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise PrepareError(f"Domain {d['name']!r}: val_fraction must be in [0, 1), got "
                           f"{val_fraction}.")
    key, final = domain_folder(d, tokenizer, data_dir, seq_len, val_fraction, seed,
                               val_only)
    if not is_complete(final, key):
        if os.path.exists(final):
            raise PrepareError(f"Domain {d['name']!r}: {final} exists but is not a complete "
                               f"prepared dataset for these inputs (no or another "
                               f"meta.json); delete that folder and run again.")
        remove_dead_temps(os.path.dirname(final))
        job = _job(d, tokenizer, seq_len, val_fraction, seed, val_only, workers, progress)
        if shard is None:
            staging = temp_dir(final)
            try:
                job.run(staging, (0, 1))
                check_stopped()
                assemble(job, staging, final, key)
            except BaseException as e:
                shutil.rmtree(staging, ignore_errors=True)
                full = out_of_space(e)
                if full:
                    raise PrepareError(
                        f"Domain {d['name']!r}: writing its rows under {data_dir} failed: "
                        f"{full}. Its partial output was removed; the domains prepared "
                        "before it are complete and will be reused. Free space, or set "
                        "data.cache_dir to another disk, and run again") from None
                raise
        else:
            job.run(staging_dir(final), _check_shard(shard))
            check_stopped()
            if not finalize:
                return None
            finalize_domain(d, tokenizer, data_dir, seq_len, val_fraction, seed, val_only,
                            workers=workers, progress=progress)
        verify_sha256 = False  # its files were hashed a moment ago
    return {split: PackedRows(os.path.join(final, f"{split}.array_record"), verify_sha256)
            for split in SPLITS}


def finalize_domain(domain: Any, tokenizer: Tokenizer, data_dir: str, seq_len: int,
                    val_fraction: float = 0.01, seed: int = 0, val_only: bool = False,
                    workers: int | None = 1, progress: bool = True) -> str:
    """Assembles the units that ``prepare_domain(..., shard=(i, n))`` calls wrote into
    the domain's folder (the same files one process writes); returns the folder. A
    PrepareError names the units still missing and the ``--shard`` runs that make them."""
    d = sources.normalize_domain(domain)
    key, final = domain_folder(d, tokenizer, data_dir, seq_len, val_fraction, seed,
                               val_only)
    if is_complete(final, key):
        return final
    staging = staging_dir(final)
    markers = sorted(glob.glob(os.path.join(staging, "shard-*.json")))
    if not markers:
        raise PrepareError(f"Domain {d['name']!r}: no shard of it is prepared in {staging}; "
                           f"run scripts/prepare_data.py --shard i/n for every i first.")
    with open(markers[0]) as f:
        n_units = json.load(f)["units"]
    missing = [u for u in range(n_units)
               if not os.path.isfile(os.path.join(staging, unit_name(u), "unit.json"))]
    if missing:
        raise PrepareError(
            f"Domain {d['name']!r}: units {_ranges(missing)} of {n_units} are not prepared "
            f"in {staging} (shards written: {[os.path.basename(m) for m in markers]}); run "
            f"the missing scripts/prepare_data.py --shard i/n (a unit u belongs to shard "
            f"u % n), then --finalize again.")
    job = _job(d, tokenizer, seq_len, val_fraction, seed, val_only, workers, progress)
    tmp = temp_dir(final)
    try:
        os.rename(staging, tmp)  # claims the units: one assembler at a time
    except OSError:
        os.rmdir(tmp)
        if is_complete(final, key):
            return final
        raise
    try:
        assemble(job, tmp, final, key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prepare_domains(domains: Sequence[Any], tokenizer: Tokenizer, data_dir: str,
                    seq_len: int, val_fraction: float = 0.01, seed: int = 0,
                    progress: bool = True, verify_sha256: bool = False,
                    val_only: Sequence[str] = (), workers: int | None = 1,
                    shard: tuple[int, int] | None = None, finalize: bool = True
                    ) -> dict[str, dict[str, PackedRows]] | None:
    """Prepares every domain; returns {name: {"train": PackedRows, "val": PackedRows}}.

    ``verify_sha256``: re-hash reused folders' files (see ``prepare_domain``);
    ``val_only``: names of domains that only need their validation rows (held out);
    ``workers``, ``shard``, ``finalize``: see ``prepare_domain`` (with ``finalize=False``
    returns None). SIGTERM and Ctrl-C stop it with ``PreparationStopped`` (one line),
    leaving no temporary folder.
    """
    specs = [sources.normalize_domain(d) for d in domains]
    names = [d["name"] for d in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PrepareError(f"Domain names must be unique, {dupes} appear twice; give each "
                           f"domain its own \"name\".")
    sources.use_hash_cache(data_dir)
    with stop_on_signals():
        out = {d["name"]: prepare_domain(d, tokenizer, data_dir, seq_len, val_fraction, seed,
                                         progress, verify_sha256, d["name"] in val_only,
                                         workers, shard, finalize)
               for d in specs}
    return None if not finalize else out


def finalize_domains(domains: Sequence[Any], tokenizer: Tokenizer, data_dir: str,
                     seq_len: int, val_fraction: float = 0.01, seed: int = 0,
                     progress: bool = True, val_only: Sequence[str] = (),
                     workers: int | None = 1) -> dict[str, str]:
    """``finalize_domain`` for every domain; returns {name: folder}."""
    specs = [sources.normalize_domain(d) for d in domains]
    sources.use_hash_cache(data_dir)
    with stop_on_signals():
        return {d["name"]: finalize_domain(d, tokenizer, data_dir, seq_len, val_fraction,
                                           seed, d["name"] in val_only, workers, progress)
                for d in specs}


def staging_dir(final: str) -> str:
    """The folder where shards of a multi-process preparation of ``final`` meet."""
    return os.path.join(os.path.dirname(final), f".parts-{os.path.basename(final)}")


def _check_shard(shard) -> tuple[int, int]:
    i, n = (int(x) for x in shard)
    if not (n >= 1 and 0 <= i < n):
        raise PrepareError(f"shard must be i/n with 0 <= i < n, got {i}/{n}.")
    return i, n


def _ranges(values: list[int]) -> str:
    out, start = [], values[0]
    for a, b in zip(values, values[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


def _job(d: dict, tokenizer: Tokenizer, seq_len: int, val_fraction: float, seed: int,
         val_only: bool, workers: int | None, progress: bool) -> Job:
    """The preparation of domain ``d``, with this module's unit size and pool threshold
    as they are now (tests and tools set ``SHARD_CHARS`` and ``POOL_MIN_CHARS`` here)."""
    return Job(d, tokenizer, int(seq_len), float(val_fraction), int(seed), val_only,
               default_workers(workers), progress, shard_chars=SHARD_CHARS,
               shard_docs=SHARD_DOCS, pool_min_chars=POOL_MIN_CHARS)
