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
"""

from __future__ import annotations

import collections
import contextlib
import errno
import glob
import hashlib
import json
import multiprocessing
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cpt_jax.data import sources
from cpt_jax.data import tokenizer as tokenizer_lib
from cpt_jax.data.tokenizer import HFJsonTokenizer, SentencePieceTokenizer, Tokenizer

FORMAT_VERSION = 2  # 2: sharded files, content fingerprints
WRITER_OPTIONS = "group_size:1"  # one row per chunk: cheap random access to single rows
SPLITS = ("train", "val")


class PrepareError(ValueError):
    """Preparation cannot proceed; the message names the domain and the fix."""


class CorruptDataError(PrepareError):
    """A prepared folder's files do not match its meta.json; the message names the fix."""


def _corrupt(path: str, problem: str) -> CorruptDataError:
    folder = os.path.dirname(os.path.abspath(path))
    return CorruptDataError(
        f"Prepared data is damaged: {path} {problem}. Delete the folder {folder} "
        f"(rm -r {shlex.quote(folder)}) and prepare again: prepare_domains (or "
        f"scripts/prepare_data.py, or the training run) with the same inputs rebuilds it "
        f"from the source.")


def _file_integrity(path: str) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        return {"bytes": os.fstat(f.fileno()).st_size, "sha256": digest}


# ---------------------------------------------------------------------------------------
# Packing (pure)


class RowPacker:
    """Streams documents' token ids into rows of ``row_len`` tokens with segment ids.

    ``add(ids)`` appends one already-wrapped document; ``pop_rows()`` returns the complete
    rows so far as (tokens [N, row_len] int32, segment_ids [N, row_len] int32);
    ``finish()`` pads and returns the last partial row (if any).
    """

    def __init__(self, row_len: int, pad_id: int):
        self.row_len = int(row_len)
        self.pad_id = int(pad_id)
        self._tokens: list[np.ndarray] = []
        self._docs: list[np.ndarray] = []
        self._size = 0
        self._doc_counter = 0

    def add(self, ids: Sequence[int], continues: bool = False) -> None:
        """Appends a document's ids; ``continues``: more ids of the last document."""
        ids = np.asarray(ids, dtype=np.int32)
        if not continues:
            self._doc_counter += 1
        self._tokens.append(ids)
        self._docs.append(np.full(ids.shape, self._doc_counter, dtype=np.int64))
        self._size += ids.size

    def pending(self) -> int:
        """Number of complete rows waiting in the buffer."""
        return self._size // self.row_len

    def pop_rows(self) -> tuple[np.ndarray, np.ndarray]:
        n = self._size // self.row_len
        tokens = np.concatenate(self._tokens) if self._tokens else np.zeros(0, np.int32)
        docs = np.concatenate(self._docs) if self._docs else np.zeros(0, np.int64)
        cut = n * self.row_len
        self._tokens, self._docs = [tokens[cut:]], [docs[cut:]]
        self._size -= cut
        return tokens[:cut].reshape(n, self.row_len), _segments(
            docs[:cut].reshape(n, self.row_len))

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Complete rows plus the padded last row; the packer is empty afterwards."""
        full_t, full_s = self.pop_rows()
        rest = self._size
        if rest == 0:
            return full_t, full_s
        tokens = np.full((1, self.row_len), self.pad_id, np.int32)
        docs = np.zeros((1, self.row_len), np.int64)
        tokens[0, :rest] = self._tokens[0]
        docs[0, :rest] = self._docs[0]
        segs = _segments(docs)
        segs[0, rest:] = 0
        self._tokens, self._docs, self._size = [], [], 0
        return np.concatenate([full_t, tokens]), np.concatenate([full_s, segs])


def _segments(docs_NL: np.ndarray) -> np.ndarray:
    """Segment ids 1, 2, ... numbering the distinct documents of each row, left to right."""
    change = np.zeros(docs_NL.shape, np.int32)
    change[:, 1:] = docs_NL[:, 1:] != docs_NL[:, :-1]
    return (1 + np.cumsum(change, axis=1)).astype(np.int32)


def pack_documents(docs_ids: Iterable[Sequence[int]], seq_len: int, bos_id: int,
                   eos_id: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Packs token-id lists as [BOS] doc [EOS] into rows; returns (tokens, segment_ids).

    Both arrays are int32 [N, seq_len + 1]. In-memory version of what prepare writes.
    """
    packer = RowPacker(seq_len + 1, pad_id)
    for ids in docs_ids:
        packer.add([bos_id, *ids, eos_id])
    return packer.finish()


def split_score(text: str, seed: int) -> float:
    """A uniform number in [0, 1) from a seeded hash of the document text."""
    digest = hashlib.sha256(f"{int(seed)}\0".encode() + text.encode("utf-8", "replace"))
    return int.from_bytes(digest.digest()[:8], "little") / 2.0 ** 64


# ---------------------------------------------------------------------------------------
# Reading


class PackedRows:
    """Random access to the rows of one prepared split (``train`` or ``val``).

    ``read(indices)`` returns (tokens [N, L+1] int32, segment_ids [N, L+1] int32) for any
    int array of row indices (repeats allowed, any order). Picklable: the file is
    (re)opened lazily in each process.

    Opening checks the file against meta.json (exists, recorded size; its sha256 too
    with ``verify_sha256=True``); the first read checks the record count, and every read
    goes through array_record's chunk checksums. Any mismatch raises ``CorruptDataError``.
    """

    def __init__(self, path: str, verify_sha256: bool = False):
        self.path = os.fspath(path)  # <folder>/<split>.array_record (one file per shard)
        folder = os.path.dirname(self.path)
        meta_path = os.path.join(folder, "meta.json")
        name = os.path.basename(self.path)
        split = re.sub(r"-\d+$", "", name.split(".")[0])  # a shard's name names its split
        if not os.path.isfile(meta_path) and not os.path.isfile(self.path):
            raise PrepareError(f"Packed rows {self.path!r} do not exist; run "
                               f"prepare_domains(...) or scripts/prepare_data.py first.")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
            self.seq_len = int(self.meta["seq_len"])
            self.num_rows = int(self.meta["splits"][split]["rows"])
            shards = self.meta["splits"][split].get("shards")
            names = [name] if shards is None else [s["file"] for s in shards]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise _corrupt(self.path, f"has no readable description in {meta_path} "
                                      f"({type(e).__name__}: {e})") from e
        self.row_len = self.seq_len + 1
        self.files = [os.path.join(folder, n) for n in names]
        for file in self.files:
            if not os.path.isfile(file):
                raise _corrupt(file, f"is missing, though {meta_path} marks the folder "
                                     f"as completely prepared")
            recorded = self.meta.get("files", {}).get(os.path.basename(file))
            if recorded is None:  # absent in folders from before
                continue
            size = os.path.getsize(file)
            if size != recorded["bytes"]:
                raise _corrupt(file, f"has {size} bytes but was written with "
                                     f"{recorded['bytes']} (truncated or overwritten "
                                     f"after preparation)")
            if verify_sha256:
                actual = _file_integrity(file)["sha256"]
                if actual != recorded["sha256"]:
                    raise _corrupt(file, f"has sha256 {actual[:16]}... but was written "
                                         f"with {recorded['sha256'][:16]}... (its bytes "
                                         f"changed after preparation)")
        self._source = None

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def _data_source(self):
        if self._source is None:
            from array_record.python.array_record_data_source import (  # pylint: disable=import-outside-toplevel
                ArrayRecordDataSource)
            where = self.files[0] if len(self.files) == 1 else self.path
            try:
                source = ArrayRecordDataSource(self.files)
            except (RuntimeError, OSError, ValueError) as e:
                raise _corrupt(where, f"cannot be opened by array_record ({e})") from e
            if len(source) != self.num_rows:
                raise _corrupt(where, f"holds {len(source)} records but meta.json says "
                                      f"{self.num_rows} rows")
            self._source = source
        return self._source

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(f"Row indices must be in [0, {self.num_rows}) for {self.path}, "
                             f"got min {idx.min()} max {idx.max()}.")
        if idx.size == 0:
            empty = np.zeros((0, self.row_len), np.int32)
            return empty, empty.copy()
        source = self._data_source()
        try:
            records = source.__getitems__(idx.tolist())
        except (RuntimeError, OSError) as e:  # riegeli: chunk hash mismatch, short read
            where = self.files[0] if len(self.files) == 1 else self.path
            raise _corrupt(where, f"could not be read back ({e})") from e
        record_bytes = 2 * self.row_len * 4
        bad = [len(r) for r in records if len(r) != record_bytes]
        if bad:  # e.g. truncated while open: array_record then returns empty records
            raise _corrupt(self.files[0] if len(self.files) == 1 else self.path,
                           f"returned {len(bad)} of {len(records)} records with "
                                      f"{sorted(set(bad))} bytes instead of {record_bytes} "
                                      f"(did it change while open?)")
        rows = np.frombuffer(b"".join(records), dtype=np.int32).reshape(
            idx.size, 2, self.row_len)
        return rows[:, 0].copy(), rows[:, 1].copy()

    def __repr__(self):
        return f"PackedRows({self.path!r}, rows={self.num_rows}, seq_len={self.seq_len})"


# ---------------------------------------------------------------------------------------
# Preparing

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
_BATCH_DOCS, _BATCH_CHARS = 256, 1_000_000  # one tokenization job
_SPILL_BLOCK = 1 << 22  # bytes of a long document's spilled ids read back at a time


# Write failures that are the disk's state, not a bug: errno -> what to tell the user.
_NO_SPACE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
             errno.EFBIG: "a file reached the size limit (ulimit -f)",
             errno.EROFS: "the file system is read-only"}


def _out_of_space(e: BaseException) -> str | None:
    """What a failed write says about the disk (``_NO_SPACE``), or None: an OSError's
    errno, or the strerror text inside the RuntimeError array_record's writer raises."""
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
        return f"{_NO_SPACE[e.errno]} ({os.strerror(e.errno)})"
    if isinstance(e, (OSError, RuntimeError)):
        for code, what in _NO_SPACE.items():
            if os.strerror(code) in str(e):
                return f"{what} ({os.strerror(code)})"
    return None


class PreparationStopped(PrepareError):
    """SIGTERM or Ctrl-C during preparation; nothing half-written was kept."""


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
    if not _is_complete(final, key):
        if os.path.exists(final):
            raise PrepareError(f"Domain {d['name']!r}: {final} exists but is not a complete "
                               f"prepared dataset for these inputs (no or another "
                               f"meta.json); delete that folder and run again.")
        remove_dead_temps(os.path.dirname(final))
        job = _Job(d, tokenizer, int(seq_len), float(val_fraction), int(seed), val_only,
                   default_workers(workers), progress)
        if shard is None:
            staging = _temp_dir(final)
            try:
                job.run(staging, (0, 1))
                _check_stopped()
                _assemble(job, staging, final, key)
            except BaseException as e:
                shutil.rmtree(staging, ignore_errors=True)
                full = _out_of_space(e)
                if full:
                    raise PrepareError(
                        f"Domain {d['name']!r}: writing its rows under {data_dir} failed: "
                        f"{full}. Its partial output was removed; the domains prepared "
                        "before it are complete and will be reused. Free space, or set "
                        "data.cache_dir to another disk, and run again") from None
                raise
        else:
            job.run(staging_dir(final), _check_shard(shard))
            _check_stopped()
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
    if _is_complete(final, key):
        return final
    staging = staging_dir(final)
    markers = sorted(glob.glob(os.path.join(staging, "shard-*.json")))
    if not markers:
        raise PrepareError(f"Domain {d['name']!r}: no shard of it is prepared in {staging}; "
                           f"run scripts/prepare_data.py --shard i/n for every i first.")
    with open(markers[0]) as f:
        n_units = json.load(f)["units"]
    missing = [u for u in range(n_units)
               if not os.path.isfile(os.path.join(staging, _unit_name(u), "unit.json"))]
    if missing:
        raise PrepareError(
            f"Domain {d['name']!r}: units {_ranges(missing)} of {n_units} are not prepared "
            f"in {staging} (shards written: {[os.path.basename(m) for m in markers]}); run "
            f"the missing scripts/prepare_data.py --shard i/n (a unit u belongs to shard "
            f"u % n), then --finalize again.")
    job = _Job(d, tokenizer, int(seq_len), float(val_fraction), int(seed), val_only,
               default_workers(workers), progress)
    tmp = _temp_dir(final)
    try:
        os.rename(staging, tmp)  # claims the units: one assembler at a time
    except OSError:
        os.rmdir(tmp)
        if _is_complete(final, key):
            return final
        raise
    try:
        _assemble(job, tmp, final, key)
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
    with _stop_on_signals():
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
    with _stop_on_signals():
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


def _is_complete(folder: str, key: str) -> bool:
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.isfile(meta_path):
        return False
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):  # unreadable: not complete (reported by the caller)
        return False
    return isinstance(meta, dict) and meta.get("key") == key


# ---------------------------------------------------------------------------------------
# Temporary folders: named after their writer (host and pid), removed once it is gone

_HOST = socket.gethostname().replace("@", "_")
_TEMP_RE = re.compile(r"@(?P<host>[^@/]+)@(?P<pid>\d+)@[0-9a-f]{8}$")


def _temp_dir(final: str) -> str:
    parent, base = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f".tmp-{base}@{_HOST}@{os.getpid()}@{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temps(data_dir: str) -> list[str]:
    """Removes temporary folders (``.tmp-*``, and units being written in ``.parts-*``) of
    preparations on this host whose process is gone; returns them. Folders of other hosts
    and of live processes are left alone."""
    removed = []
    try:
        names = os.listdir(data_dir)
    except OSError:
        return removed
    candidates = [os.path.join(data_dir, n) for n in names if n.startswith(".tmp-")]
    for n in names:
        if n.startswith(".parts-"):
            try:
                candidates += [os.path.join(data_dir, n, u)
                               for u in os.listdir(os.path.join(data_dir, n)) if ".tmp" in u]
            except OSError:
                pass
    for path in candidates:
        m = _TEMP_RE.search(path)
        if m and m["host"] == _HOST and not _alive(int(m["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _check_stopped() -> None:
    """PreparationStopped if a stop signal came (``_stop_on_signals``): checked between
    chunks of documents, while waiting for the tokenizer workers, before a domain is
    assembled and when the guarded block ends."""
    if _STOPPED:
        name = signal.Signals(_STOPPED[-1]).name
        raise PreparationStopped(
            f"preparation stopped by {name}; nothing half-written was kept (complete "
            f"domains and shards stay in the cache), run it again to go on.")


_STOPPED: list[int] = []  # the stop signals received inside _stop_on_signals


@contextlib.contextmanager
def _stop_on_signals():
    """SIGTERM and SIGINT raise PreparationStopped (the main thread only, and only for a
    signal whose current handler Python knows, so it can be restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        # Recorded, not raised here: the signal may land in a GC callback or under a
        # broad ``except``, which would swallow the exception (or print it). The
        # preparation loop checks between chunks of documents (``_check_stopped``).
        _STOPPED.append(signum)

    # A handler installed outside Python could not be restored afterwards: such a signal
    # is left alone (getsignal is None), and so is SIGTERM in a jax.distributed run, whose
    # preemption sync manager catches it in C++ (Python cannot see that handler).
    jax = sys.modules.get("jax")
    distributed = jax is not None and getattr(getattr(jax, "distributed", None),
                                              "is_initialized", lambda: False)()
    _STOPPED.clear()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)
                if signal.getsignal(s) is not None
                and not (s == signal.SIGTERM and distributed)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    _check_stopped()  # a signal that came after the last check


# ---------------------------------------------------------------------------------------
# Tokenizing: in this process, or in a pool of worker processes


def _tokenizer_state(tok: Tokenizer):
    """What a worker process rebuilds the tokenizer from (None: not possible)."""
    if isinstance(tok, SentencePieceTokenizer):
        return ("sentencepiece", tok.proto, tok.path, tok.sha256)
    if isinstance(tok, HFJsonTokenizer) and tok.path:
        return ("hf_json", tok.path, tok.sha256)
    try:
        return ("object", pickle.dumps(tok), tok.sha256)
    except Exception:  # pylint: disable=broad-except
        return None


class _Encoder:
    """Encodes lists of texts. ``conts[i]`` is "" for a document's first part, else the
    character before part i (a later part of a file read in parts), which must be encoded
    as the continuation of its document: for SentencePiece without the dummy prefix; for
    other kinds as ``encode(ctx + part)`` minus the ids of ``encode(ctx)`` (which absorbs a
    prefix space a tokenizer adds to every text), when those are its first ids."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.sp_cont = None
        self.kwargs = {}
        if getattr(tok, "kind", "") == "sentencepiece":
            import sentencepiece as spm  # pylint: disable=import-outside-toplevel
            from sentencepiece import (  # pylint: disable=import-outside-toplevel
                sentencepiece_model_pb2)
            self.kwargs = {"num_threads": 1}
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(tok.proto)
            proto.normalizer_spec.add_dummy_prefix = False
            self.sp_cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def __call__(self, texts: list[str], conts: list[str]) -> list[np.ndarray]:
        out: list = [None] * len(texts)
        plain = [i for i, c in enumerate(conts) if not c]
        if plain:
            for i, ids in zip(plain, self.tok.encode_batch([texts[i] for i in plain],
                                                           **self.kwargs)):
                out[i] = np.asarray(ids, np.int32)
        rest = [i for i, c in enumerate(conts) if c]
        if rest and self.sp_cont is not None:
            for i, ids in zip(rest, self.sp_cont.encode([texts[i] for i in rest],
                                                        num_threads=1)):
                out[i] = np.asarray(ids, np.int32)
        elif rest:
            joined = self.tok.encode_batch([conts[i] + texts[i] for i in rest])
            heads = self.tok.encode_batch([conts[i] for i in rest])
            for i, ids, head in zip(rest, joined, heads):
                if list(ids[:len(head)]) == list(head):
                    out[i] = np.asarray(ids[len(head):], np.int32)
                else:  # the context merged into the part: encode the part alone
                    out[i] = np.asarray(self.tok.encode(texts[i]), np.int32)
        return out


_worker_encoder: _Encoder | None = None


def _init_worker(state) -> None:
    """A worker's tokenizer. It never raises (a pool whose initializer fails restarts
    workers for ever): a failure is raised by the worker's first job instead."""
    global _worker_encoder  # pylint: disable=global-statement
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pool
    try:
        if state[0] == "sentencepiece":
            tok = tokenizer_lib.SentencePieceTokenizer(state[1], path=state[2])
        elif state[0] == "hf_json":
            tok = tokenizer_lib.load_tokenizer(state[1])
        else:
            tok = pickle.loads(state[1])
        if tok.sha256 != state[-1]:
            raise PrepareError(f"the tokenizer {getattr(tok, 'path', None)} changed on "
                               f"disk during preparation; run again.")
        _worker_encoder = _Encoder(tok)
    except Exception as e:  # pylint: disable=broad-except
        _worker_encoder = e


def _work(texts: list[str], conts: list[str]) -> list[np.ndarray]:
    if isinstance(_worker_encoder, Exception):
        raise _worker_encoder
    return _worker_encoder(texts, conts)


class _Tokenizing:
    """Jobs in, encoded jobs out, in order: in this process, or (past POOL_MIN_CHARS of
    text, with workers > 1) on a pool of ``workers`` processes with a bounded queue."""

    def __init__(self, tok: Tokenizer, workers: int):
        self.encode = _Encoder(tok)
        self.state = _tokenizer_state(tok) if workers > 1 else None
        self.workers = workers
        self.pool = None
        self.chars = 0
        self.pending: collections.deque = collections.deque()

    def submit(self, job: dict) -> None:
        texts, conts = job["texts"], job["conts"]
        self.chars += sum(len(t) for t in texts)
        if self.pool is None and self.state is not None and self.chars >= POOL_MIN_CHARS:
            env = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1",
                   "OMP_NUM_THREADS": "1"}
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)  # inherited by the spawned workers
            # The workers need only this module: keep them from re-running the caller's
            # script (spawn imports __main__ by path unless it has no file or spec).
            main = sys.modules.get("__main__")
            hidden = {k: getattr(main, k) for k in ("__file__", "__spec__")
                      if main is not None and hasattr(main, k)}
            if "__file__" in hidden:
                del main.__file__
            if "__spec__" in hidden:
                main.__spec__ = None
            try:
                self.pool = multiprocessing.get_context("spawn").Pool(
                    self.workers, initializer=_init_worker, initargs=(self.state,))
                self.procs = list(self.pool._pool)  # pylint: disable=protected-access
            finally:
                for k, v in hidden.items():
                    setattr(main, k, v)
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        if self.pool is None:
            job["ids"] = self.encode(texts, conts) if texts else []
        else:
            job["async"] = self.pool.apply_async(_work, (texts, conts)) if texts else None
        self.pending.append(job)

    def full(self) -> bool:
        return len(self.pending) > (2 * self.workers if self.pool is not None else 0)

    def pop(self) -> dict:
        job = self.pending.popleft()
        if "async" in job:
            handle = job.pop("async")
            while handle is not None and not handle.ready():
                handle.wait(0.5)
                _check_stopped()
                dead = [p.exitcode for p in self.procs if p.exitcode is not None]
                if dead:  # a lost job would never finish: say why instead of waiting
                    raise PrepareError(
                        f"a tokenizer worker process died (exit code {dead[0]}; out of "
                        f"memory?); run again with fewer data.workers.")
            job["ids"] = handle.get() if handle is not None else []
        return job

    def close(self, ok: bool) -> None:
        if self.pool is not None:
            if ok:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
            self.pool = None


# ---------------------------------------------------------------------------------------
# Units: reading, splitting, packing and writing one domain's documents


def _unit_name(u: int) -> str:
    return f"unit-{u:05d}"


class _SplitWriter:
    """Packs one split's documents and writes complete rows as they appear."""

    def __init__(self, path: str, row_len: int, pad_id: int):
        from array_record.python.array_record_module import (  # pylint: disable=import-outside-toplevel
            ArrayRecordWriter)
        self.path = path
        self.writer = ArrayRecordWriter(path, WRITER_OPTIONS)
        self.packer = RowPacker(row_len, pad_id)
        self.stats = {"rows": 0, "docs": 0, "tokens": 0, "chars": 0, "pad_tokens": 0}

    def add(self, ids, n_chars: int, continues: bool = False) -> None:
        self.packer.add(ids, continues)
        self.stats["docs"] += 0 if continues else 1
        self.stats["tokens"] += len(ids)
        self.stats["chars"] += n_chars
        if self.packer.pending() >= 64:
            self._write(*self.packer.pop_rows())

    def _write(self, tokens: np.ndarray, segs: np.ndarray) -> None:
        rows = np.stack([tokens, segs], axis=1).astype(np.int32)  # [N, 2, L+1]
        for row in rows:
            self.writer.write(row.tobytes())
        self.stats["rows"] += len(rows)
        self.stats["pad_tokens"] += int((segs == 0).sum())

    def close(self) -> dict:
        self._write(*self.packer.finish())
        self.writer.close()
        if self.stats["rows"] == 0:
            os.remove(self.path)
        return self.stats

    def abort(self) -> None:
        self.writer.close()


class _Unit:
    """One unit being written into ``<staging>/unit-NNNNN.tmp@host@pid@x/``, renamed to
    ``unit-NNNNN`` when complete (with its unit.json)."""

    def __init__(self, job: "_Job", staging: str, u: int, force_score, tail_split):
        self.job, self.u = job, u
        self.final = os.path.join(staging, _unit_name(u))
        self.tmp = (f"{self.final}.tmp@{_HOST}@{os.getpid()}@{uuid.uuid4().hex[:8]}")
        os.makedirs(self.tmp)
        row_len = job.seq_len + 1
        self.writers = {s: _SplitWriter(os.path.join(self.tmp, f"{s}.array_record"),
                                        row_len, job.pad_id) for s in SPLITS}
        self.force_score, self.tail_split = force_score, tail_split
        self.min_score = 2.0
        self.content = hashlib.sha256()
        self.spill = None  # tokens of a document read in parts, until its split is known
        self.spill_chars = 0

    def tokens(self) -> int:
        return sum(w.stats["tokens"] for w in self.writers.values())

    def part(self, ids: np.ndarray, n_chars: int, first: bool, last: bool,
             score: float | None, digest: bytes | None) -> None:
        """One part of a document (a whole document when ``first and last``)."""
        if first and last:
            self._route(score, digest, [ids], len(ids), n_chars)
            return
        if first:
            self.spill = tempfile.TemporaryFile(dir=self.tmp)
            self.spill_chars = 0
        self.spill.write(ids.astype(np.int32).tobytes())
        self.spill_chars += n_chars
        if last:
            n_tokens = self.spill.tell() // 4
            self.spill.seek(0)
            blocks = iter(lambda: self.spill.read(_SPILL_BLOCK), b"")
            self._route(score, digest, (np.frombuffer(b, np.int32) for b in blocks),
                        n_tokens, self.spill_chars)
            self.spill.close()
            self.spill = None

    def _route(self, score: float, digest: bytes, blocks, n_tokens: int,
               n_chars: int) -> None:
        """Writes one document's ids (in blocks) into its split."""
        job = self.job
        self.content.update(digest)
        is_val = score < job.val_fraction or score == self.force_score
        if not is_val:
            self.min_score = min(self.min_score, score)
        if job.val_only and not self.tail_split and not is_val:
            for _ in blocks:  # a held-out domain's train documents are not written
                pass
            return
        if self.tail_split:  # the domain's one document: its last tokens validate
            cut = n_tokens - max(1, int(n_tokens * job.val_fraction))
            train, val = self.writers["train"], self.writers["val"]
            train.add(np.asarray([job.bos_id], np.int32), n_chars)
            at, started = 0, False
            for block in blocks:
                head = max(0, min(len(block), cut - at))
                if head:
                    train.add(block[:head], 0, continues=True)
                if head < len(block):
                    val.add(block[head:], 0, continues=started)
                    started = True
                at += len(block)
            val.add(np.asarray([job.eos_id], np.int32), 0, continues=started)
            return
        w = self.writers["val" if is_val else "train"]
        w.add(np.asarray([job.bos_id], np.int32), n_chars)
        for block in blocks:
            w.add(block, 0, continues=True)
        w.add(np.asarray([job.eos_id], np.int32), 0, continues=True)

    def close(self, reader: dict) -> dict:
        stats = {s: w.close() for s, w in self.writers.items()}
        info = {"unit": self.u, "splits": stats, "n_documents": reader["docs"],
                "n_empty_documents": reader["empty"], "chars": reader["chars"],
                "content_sha256": self.content.hexdigest(),
                "min_train_score": self.min_score, "tail_split": self.tail_split,
                "force_score": self.force_score}
        with open(os.path.join(self.tmp, "unit.json"), "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)
        if os.path.isdir(self.final):  # another process wrote the same unit: identical
            shutil.rmtree(self.final)
        os.rename(self.tmp, self.final)
        return info

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
        if self.spill is not None:
            self.spill.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class _Job:
    """The preparation of one domain: reads its documents, cuts them into units, and
    tokenizes, splits, packs and writes the units it owns."""

    def __init__(self, d, tok, seq_len, val_fraction, seed, val_only, workers, progress):
        self.d, self.tok = d, tok
        self.seq_len, self.val_fraction, self.seed = seq_len, val_fraction, seed
        self.val_only, self.workers, self.progress = val_only, workers, progress
        self.pad_id = tok.pad_id if tok.pad_id >= 0 else 0
        self.bos_id, self.eos_id = tok.bos_id, tok.eos_id
        self.cap = d.get("max_tokens") or 0  # stop once the splits hold this many tokens
        self.capped = False

    def run(self, staging: str, shard: tuple[int, int], only: dict | None = None) -> None:
        """Writes the units this process owns: ``u % n == i`` (a capped domain: all of
        them on shard 0, since the cap counts tokens in source order), or those in
        ``only`` ({unit: (force_score, tail_split)}, the rebuilds of ``_assemble``); then
        a ``shard-i-of-n.json`` marker with the number of units."""
        os.makedirs(staging, exist_ok=True)
        i, n = shard

        def owns(u):
            if only is not None:
                return u in only
            if not ((i == 0) if self.cap else (u % n == i)):
                return False
            # written before (an interrupted run): reused
            return not os.path.isfile(os.path.join(staging, _unit_name(u), "unit.json"))

        if only is None and self._one_document():
            # A single text file is the domain's one document: its tail validates (known
            # now, so it is tokenized once and streamed, never held whole).
            only_tail = {0: (None, True)}
        else:
            only_tail = {}
        tokenizing = _Tokenizing(self.tok, 1 if self.cap else self.workers)
        bar = _Progress(self.d, self.progress)
        units: dict[int, _Unit] = {}
        ok = False
        try:
            n_units = self._stream(staging, owns, only or only_tail, tokenizing, units,
                                   bar)
            ok = True
        finally:
            tokenizing.close(ok)
            if not ok:
                for unit in units.values():
                    unit.abort()
            bar.close()
        if only is None:
            with open(os.path.join(staging, f"shard-{i}-of-{n}.json"), "w") as f:
                json.dump({"units": n_units}, f)

    def _one_document(self) -> bool:
        d = self.d
        if d["kind"] != "text_glob" or self.val_fraction <= 0:
            return False
        try:
            return len(sources.list_files(d)) == 1
        except sources.DomainError:
            return False

    def _jobs(self, owns, only: dict) -> Iterator[dict]:
        """Tokenization jobs in source order: texts to encode, and the events (document
        parts, unit ends) that their ids complete."""
        seed_prefix = f"{int(self.seed)}\0".encode()
        u, reader = 0, {"docs": 0, "empty": 0, "chars": 0}
        mine = owns(u)
        job = {"texts": [], "conts": [], "events": []}
        size = 0
        max_docs = 1 if self.cap else _BATCH_DOCS  # a cap stops reading at its document
        for parts in sources.iter_long_documents(self.d):
            if self.capped:
                break
            score_h, content_h = hashlib.sha256(seed_prefix), hashlib.sha256()
            n_chars = n_bytes = 0
            first = True
            ctx = ""  # "" for the first part, else the character before the part sent
            pending = None  # the previous part: sent once we know it is not the last
            for part in parts:
                raw = part.encode("utf-8", "replace")
                score_h.update(raw)
                content_h.update(raw)
                n_chars += len(part)
                n_bytes += len(raw)
                if pending is not None and mine:
                    job["texts"].append(pending)
                    job["conts"].append(ctx)
                    ctx = pending[-1:]
                    job["events"].append(("part", u, len(pending), first, False, None, None))
                    size += len(pending)
                    first = False
                    if size >= _BATCH_CHARS:
                        yield job
                        job, size = {"texts": [], "conts": [], "events": []}, 0
                pending = part
            reader["docs"] += 1
            reader["chars"] += n_chars
            if n_chars == 0:
                reader["empty"] += 1
            elif mine:
                score = int.from_bytes(score_h.digest()[:8], "little") / 2.0 ** 64
                digest = n_bytes.to_bytes(8, "little") + content_h.digest()
                force, tail = only.get(u, (None, False))
                skip = (self.val_only and first and not tail and score != force
                        and score >= self.val_fraction)  # a held-out domain's train doc
                job["texts"].append("" if skip else pending)
                job["conts"].append("" if skip else ctx)
                job["events"].append(("part", u, len(pending), first, True, score, digest))
                size += len(pending)
            if reader["chars"] >= SHARD_CHARS or reader["docs"] >= SHARD_DOCS:
                job["events"].append(("end", u, dict(reader), mine))
                u, reader = u + 1, {"docs": 0, "empty": 0, "chars": 0}
                mine = owns(u)
            if len(job["texts"]) >= max_docs or size >= _BATCH_CHARS or (
                    job["events"] and job["events"][-1][0] == "end"):
                yield job
                job, size = {"texts": [], "conts": [], "events": []}, 0
        if reader["docs"]:
            job["events"].append(("end", u, dict(reader), mine))
            u += 1
        job["events"].append(("done", u))
        yield job

    def _stream(self, staging, owns, only, tokenizing, units, bar) -> int:
        self.capped = False
        state = {"tokens": 0, "units": 0}
        for job in self._jobs(owns, only):
            _check_stopped()
            tokenizing.submit(job)
            while tokenizing.full():
                self._consume(tokenizing.pop(), staging, only, units, bar, state)
        while tokenizing.pending:
            self._consume(tokenizing.pop(), staging, only, units, bar, state)
        return state["units"]

    def _consume(self, result, staging, only, units, bar, state) -> None:
        ids = iter(result["ids"])
        for event in result["events"]:
            if event[0] == "part":
                _, u, n_chars, first, last, score, digest = event
                part_ids = next(ids)
                if u not in units:
                    force, tail = only.get(u, (None, False))
                    units[u] = _Unit(self, staging, u, force, tail)
                unit = units[u]
                before = unit.tokens()
                unit.part(part_ids, n_chars, first, last, score, digest)
                state["tokens"] += unit.tokens() - before
                bar.update(n_chars, len(part_ids), int(last))
                if self.cap and last and state["tokens"] >= self.cap:
                    self.capped = True  # the reader stops before the next document
            elif event[0] == "end":
                _, u, reader, mine = event
                if mine:
                    if u not in units:  # only empty documents
                        force, tail = only.get(u, (None, False))
                        units[u] = _Unit(self, staging, u, force, tail)
                    units.pop(u).close(reader)
                else:
                    bar.update(reader["chars"], 0, reader["docs"])
            else:
                state["units"] = event[1]


class _Progress:
    """One line per domain: documents, text read of the total, tokens/s and ETA."""

    def __init__(self, d: dict, enabled: bool):
        self.enabled = enabled
        self.tokens = 0
        self.start = time.time()
        if not enabled:
            return
        total = None
        kind = sources.kind_of(d)
        if d["kind"] in ("text_glob", "jsonl") and not d.get("max_chars") and not \
                d.get("max_docs") and not d.get("max_tokens"):
            try:
                files = kind.files(d)
                if not any(f.endswith((".gz", ".zst", ".zstd")) for f in files):
                    total = sum(os.path.getsize(f) for f in files)
            except (OSError, sources.DomainError):
                total = None
        self.bar = tqdm(desc=f"prepare {d['name']}", total=total, unit="B",
                        unit_scale=True, mininterval=1.0, smoothing=0.1)
        self.docs = 0
        self.last = 0.0

    def update(self, n_chars: int, n_tokens: int, n_docs: int) -> None:
        if not self.enabled:
            return
        self.tokens += n_tokens
        self.docs += n_docs
        self.bar.update(n_chars)
        now = time.time()
        if now - self.last >= 1.0:
            self.last = now
            self._postfix(now, refresh=False)

    def _postfix(self, now: float, refresh: bool) -> None:
        rate = self.tokens / max(now - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.docs} docs, {rate / 1e6:.2f}M tok/s",
                                 refresh=refresh)

    def close(self) -> None:
        if self.enabled:
            self._postfix(time.time(), refresh=True)
            self.bar.close()


def _assemble(job: _Job, staging: str, final: str, key: str) -> None:
    """Turns a staging folder of complete units into the final folder: the rare
    validation fallbacks (units rebuilt), meta.json, then one rename."""
    with open(sorted(glob.glob(os.path.join(staging, "shard-*.json")))[0]) as f:
        n_units = json.load(f)["units"]
    infos = _unit_infos(staging, n_units)
    n_docs = sum(i["n_documents"] - i["n_empty_documents"] for i in infos)
    d, val_fraction = job.d, job.val_fraction
    if n_docs == 0:
        raise PrepareError(f"Domain {d['name']!r} has no non-empty document "
                           f"({sum(i['n_empty_documents'] for i in infos)} empty); check "
                           f"its source.")
    val_docs = sum(i["splits"]["val"]["docs"] for i in infos)
    if val_fraction > 0 and (val_docs == 0 or n_docs == 1) and not any(
            i["tail_split"] or i["force_score"] is not None for i in infos):
        # Rare (tiny domains): the lowest-scoring documents (every copy of the same text)
        # go to validation, or a single document's tail is held out.
        if n_docs == 1:
            only = {i["unit"]: (None, True) for i in infos
                    if i["n_documents"] > i["n_empty_documents"]}
        else:
            low = min(i["min_train_score"] for i in infos)
            only = {i["unit"]: (low, False) for i in infos if i["min_train_score"] == low}
        for u in only:
            shutil.rmtree(os.path.join(staging, _unit_name(u)))
        job.run(staging, (0, 1), only=only)
        infos = _unit_infos(staging, n_units)
    stats = {s: {"rows": 0, "docs": 0, "tokens": 0, "chars": 0, "pad_tokens": 0,
                 "shards": []} for s in SPLITS}
    content = hashlib.sha256()
    for info in infos:
        content.update(bytes.fromhex(info["content_sha256"]))
        unit_dir = os.path.join(staging, _unit_name(info["unit"]))
        for s in SPLITS:
            st = info["splits"][s]
            for k in ("rows", "docs", "tokens", "chars", "pad_tokens"):
                stats[s][k] += st[k]
            if st["rows"]:
                name = f"{s}-{info['unit']:05d}.array_record"
                os.rename(os.path.join(unit_dir, f"{s}.array_record"),
                          os.path.join(staging, name))
                stats[s]["shards"].append({"file": name, "rows": st["rows"]})
        shutil.rmtree(unit_dir)
    for marker in glob.glob(os.path.join(staging, "shard-*.json")):
        os.remove(marker)
    if stats["train"]["rows"] == 0 and not job.val_only:
        raise PrepareError(f"Domain {d['name']!r}: no training rows (all {n_docs} documents "
                           f"went to validation); lower val_fraction={val_fraction}.")
    tok = job.tok
    meta = {"format": FORMAT_VERSION, "name": d["name"], "domain": d,
            "seq_len": job.seq_len, "row_len": job.seq_len + 1,
            "record": "int32 [2, seq_len + 1]: tokens, segment_ids (0 = padding)",
            "tokenizer_sha256": tok.sha256, "tokenizer_path": tok.path,
            "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "pad_id": job.pad_id, "val_fraction": val_fraction, "seed": job.seed,
            "content_sha256": content.hexdigest(), "n_documents": n_docs,
            "n_empty_documents": sum(i["n_empty_documents"] for i in infos),
            "n_tokens": sum(s["tokens"] for s in stats.values()),
            "n_rows": sum(s["rows"] for s in stats.values()), "n_units": n_units,
            "splits": stats, "tail_split": any(i["tail_split"] for i in infos),
            "key": key}
    meta["files"] = {sh["file"]: _file_integrity(os.path.join(staging, sh["file"]))
                     for s in SPLITS for sh in stats[s]["shards"]}
    with open(os.path.join(staging, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    try:
        os.rename(staging, final)
    except OSError:
        if not _is_complete(final, key):  # lost a race only if the winner is complete
            raise
        shutil.rmtree(staging)


def _unit_infos(staging: str, n_units: int) -> list[dict]:
    infos = []
    for u in range(n_units):
        with open(os.path.join(staging, _unit_name(u), "unit.json")) as f:
            infos.append(json.load(f))
    return infos
