"""Tokenize and pack a domain into fixed-length rows stored as array_record files.

Each document becomes ``[BOS] doc [EOS]``; the token streams of a split's documents are
concatenated and cut into rows of ``seq_len + 1`` tokens (the model reads ``row[:-1]`` and
predicts ``row[1:]``). Alongside the tokens each row has segment ids: 1, 2, 3, ... for the
documents within that row (a document that overflows a row continues in the next row under
that row's first segment id), and 0 for the padding at the end of the last row of a split,
the only padding there is. Padding tokens are the tokenizer's pad id (0 if it has none).

The train/validation split is by document: a document goes to validation when a seeded
hash of its text falls below ``val_fraction`` (so identical documents never straddle the
split, and adding documents does not move the others). If that leaves validation empty
but the domain has at least two documents, the train document with the smallest hash is
moved to validation. A domain of one document (a book, a manual) is split inside it: the
last ``val_fraction`` of its tokens (at least one) are its validation rows. So every
domain has validation rows and training rows.

Layout, one folder per (domain, source content, tokenizer, seq_len, split settings)::

    <data_dir>/<domain name>-<key[:12]>/train.array_record   one record per row:
    <data_dir>/<domain name>-<key[:12]>/val.array_record       int32 [2, seq_len + 1] bytes
    <data_dir>/<domain name>-<key[:12]>/meta.json              (tokens, segment_ids)

``key`` hashes the normalized domain spec, the source fingerprint (file sizes/mtimes, TFDS
files, or Python version for demos), the tokenizer's sha256 and the packing settings, so
preparation is skipped when the same folder exists, and redone when anything changes. A
folder is written under a temporary name and renamed when complete, so a failure (or a
concurrent writer) never leaves a half-written dataset. In a multi-host run call it on
every host with a shared data_dir (the rename makes that safe) or on one host first.

Integrity. ``meta.json`` records each array_record file's size and sha256 (``"files"``).
Opening a prepared folder (``PackedRows``, so also a cache hit of ``prepare_domain``)
checks that every file exists with its recorded size: a deleted or truncated file is
reported at once. A same-length overwrite is caught by array_record's own per-chunk
checksums when a damaged row is read (and by the record count when the file is first
opened), or at open time with ``verify_sha256=True``, which re-hashes the files (about
1.2 GB/s on one core with SHA-NI: milliseconds for test data, minutes for a 100B-token
domain, hence off by default). Every such failure raises ``CorruptDataError`` naming the
file and the folder to delete. A damaged folder is never repaired in place: delete it and
prepare again (preparation is deterministic, so the same rows come back).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cpt_jax.data import sources
from cpt_jax.data.tokenizer import Tokenizer

FORMAT_VERSION = 1
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
    """{"bytes": size, "sha256": hex digest} of a file (sha256: ~1.2 GB/s with SHA-NI)."""
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

    def add(self, ids: Sequence[int]) -> None:
        ids = np.asarray(ids, dtype=np.int32)
        self._tokens.append(ids)
        self._docs.append(np.full(ids.shape, self._doc_counter, dtype=np.int64))
        self._doc_counter += 1
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
        self.path = os.fspath(path)
        folder = os.path.dirname(self.path)
        meta_path = os.path.join(folder, "meta.json")
        name = os.path.basename(self.path)
        if not os.path.isfile(self.path):
            if os.path.isfile(meta_path):
                raise _corrupt(self.path, f"is missing, though {meta_path} marks the folder "
                                          f"as completely prepared")
            raise PrepareError(f"Packed rows {self.path!r} do not exist; run "
                               f"prepare_domains(...) or scripts/prepare_data.py first.")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
            split = name.split(".")[0]
            self.seq_len = int(self.meta["seq_len"])
            self.num_rows = int(self.meta["splits"][split]["rows"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise _corrupt(self.path, f"has no readable description in {meta_path} "
                                      f"({type(e).__name__}: {e})") from e
        self.row_len = self.seq_len + 1
        recorded = self.meta.get("files", {}).get(name)  # absent in folders from before
        if recorded is not None:
            size = os.path.getsize(self.path)
            if size != recorded["bytes"]:
                raise _corrupt(self.path, f"has {size} bytes but was written with "
                                          f"{recorded['bytes']} (truncated or overwritten "
                                          f"after preparation)")
            if verify_sha256:
                actual = _file_integrity(self.path)["sha256"]
                if actual != recorded["sha256"]:
                    raise _corrupt(self.path, f"has sha256 {actual[:16]}... but was written "
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
            try:
                source = ArrayRecordDataSource([self.path])
            except (RuntimeError, OSError, ValueError) as e:
                raise _corrupt(self.path, f"cannot be opened by array_record ({e})") from e
            if len(source) != self.num_rows:
                raise _corrupt(self.path, f"holds {len(source)} records but meta.json says "
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
            raise _corrupt(self.path, f"could not be read back ({e})") from e
        record_bytes = 2 * self.row_len * 4
        bad = [len(r) for r in records if len(r) != record_bytes]
        if bad:  # e.g. truncated while open: array_record then returns empty records
            raise _corrupt(self.path, f"returned {len(bad)} of {len(records)} records with "
                                      f"{sorted(set(bad))} bytes instead of {record_bytes} "
                                      f"(did it change while open?)")
        rows = np.frombuffer(b"".join(records), dtype=np.int32).reshape(
            idx.size, 2, self.row_len)
        return rows[:, 0].copy(), rows[:, 1].copy()

    def __repr__(self):
        return f"PackedRows({self.path!r}, rows={self.num_rows}, seq_len={self.seq_len})"


# ---------------------------------------------------------------------------------------
# Preparing


def dataset_key(domain: Any, tokenizer: Tokenizer, seq_len: int, val_fraction: float,
                seed: int, val_only: bool = False) -> str:
    """sha256 of everything a prepared domain depends on (see the module docstring)."""
    d = sources.normalize_domain(domain)
    record = {"format": FORMAT_VERSION, "domain": d,
              "source": sources.source_fingerprint(d), "tokenizer": tokenizer.sha256,
              "seq_len": int(seq_len), "val_fraction": float(val_fraction),
              "seed": int(seed), "writer": WRITER_OPTIONS}
    if val_only:  # only then, so the keys of fully prepared domains stay as they were
        record["val_only"] = True
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()
                          ).hexdigest()


def prepare_domain(domain: Any, tokenizer: Tokenizer, data_dir: str, seq_len: int,
                   val_fraction: float = 0.01, seed: int = 0, progress: bool = True,
                   verify_sha256: bool = False, val_only: bool = False
                   ) -> dict[str, PackedRows]:
    """Prepares one domain (or reuses it) and returns {"train": PackedRows, "val": ...}.

    ``val_only``: a domain that is only evaluated (held out): its training documents are
    split off as usual but neither tokenized nor written, so its train split has 0 rows
    (its own folder: the key records it).

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
    key = dataset_key(d, tokenizer, seq_len, val_fraction, seed, val_only)
    final = os.path.join(os.path.expanduser(data_dir), f"{d['name']}-{key[:12]}")
    if not _is_complete(final, key):
        if os.path.exists(final):
            raise PrepareError(f"Domain {d['name']!r}: {final} exists but is not a complete "
                               f"prepared dataset for these inputs (no or another "
                               f"meta.json); delete that folder and run again.")
        _build(d, tokenizer, final, key, int(seq_len), float(val_fraction), int(seed),
               progress, val_only)
        verify_sha256 = False  # its files were hashed a moment ago, in _build
    return {split: PackedRows(os.path.join(final, f"{split}.array_record"), verify_sha256)
            for split in SPLITS}


def prepare_domains(domains: Sequence[Any], tokenizer: Tokenizer, data_dir: str,
                    seq_len: int, val_fraction: float = 0.01, seed: int = 0,
                    progress: bool = True, verify_sha256: bool = False,
                    val_only: Sequence[str] = ()) -> dict[str, dict[str, PackedRows]]:
    """Prepares every domain; returns {name: {"train": PackedRows, "val": PackedRows}}.

    ``verify_sha256``: re-hash reused folders' files (see ``prepare_domain``);
    ``val_only``: names of domains that only need their validation rows (held out).
    """
    specs = [sources.normalize_domain(d) for d in domains]
    names = [d["name"] for d in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PrepareError(f"Domain names must be unique, {dupes} appear twice; give each "
                           f"domain its own \"name\".")
    return {d["name"]: prepare_domain(d, tokenizer, data_dir, seq_len, val_fraction, seed,
                                      progress, verify_sha256, d["name"] in val_only)
            for d in specs}


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


def _batched(docs: Iterable[str], max_docs: int = 256, max_chars: int = 4_000_000
             ) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if len(batch) >= max_docs or size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _SplitWriter:
    """Packs one split's documents and writes complete rows as they appear."""

    def __init__(self, path: str, row_len: int, pad_id: int):
        from array_record.python.array_record_module import (  # pylint: disable=import-outside-toplevel
            ArrayRecordWriter)
        self.writer = ArrayRecordWriter(path, WRITER_OPTIONS)
        self.packer = RowPacker(row_len, pad_id)
        self.stats = {"rows": 0, "docs": 0, "tokens": 0, "chars": 0, "pad_tokens": 0}

    def add(self, ids: list[int], n_chars: int) -> None:
        self.packer.add(ids)
        self.stats["docs"] += 1
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
        return self.stats


def _build(d: dict, tok: Tokenizer, final: str, key: str, seq_len: int,
           val_fraction: float, seed: int, progress: bool, val_only: bool = False) -> None:
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(final)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        meta = _write_splits(d, tok, tmp, seq_len, val_fraction, seed, progress, None,
                             val_only=val_only)
        one_doc = meta["n_documents"] == 1
        if val_fraction > 0 and (meta["splits"]["val"]["docs"] == 0 or one_doc):
            # Rare (tiny domains): redo with the lowest-scoring document forced to val, or
            # a single document's tail held out.
            shutil.rmtree(tmp)
            os.makedirs(tmp)
            meta = _write_splits(d, tok, tmp, seq_len, val_fraction, seed, progress,
                                 meta["min_score_doc"], tail_split=one_doc,
                                 val_only=val_only)
        if meta["splits"]["train"]["rows"] == 0 and not val_only:
            raise PrepareError(f"Domain {d['name']!r}: no training rows (all "
                               f"{meta['n_documents']} documents went to validation); lower "
                               f"val_fraction={val_fraction}.")
        meta.pop("min_score_doc")
        meta["key"] = key
        meta["files"] = {f"{s}.array_record": _file_integrity(
            os.path.join(tmp, f"{s}.array_record")) for s in SPLITS}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final, key):  # lost a race only if the winner is complete
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_splits(d: dict, tok: Tokenizer, folder: str, seq_len: int, val_fraction: float,
                  seed: int, progress: bool, force_val: int | None,
                  tail_split: bool = False, val_only: bool = False) -> dict:
    pad_id = tok.pad_id if tok.pad_id >= 0 else 0
    writers = {s: _SplitWriter(os.path.join(folder, f"{s}.array_record"), seq_len + 1, pad_id)
               for s in SPLITS}
    content = hashlib.sha256()
    n_docs = n_empty = 0
    min_score, min_doc = 2.0, None
    bar = tqdm(desc=f"prepare {d['name']}", unit=" doc", disable=not progress,
               mininterval=1.0)
    cap = d.get("max_tokens") or 0  # stop once the splits hold this many tokens
    try:
        for batch in _batched(sources.iter_documents(d)):
            if cap and sum(w.stats["tokens"] for w in writers.values()) >= cap:
                break
            kept = [doc for doc in batch if doc]
            n_empty += len(batch) - len(kept)
            scores = [split_score(doc, seed) for doc in kept]
            is_vals = [score < val_fraction or n_docs + i == force_val
                       for i, score in enumerate(scores)]
            skip = val_only and not tail_split  # a held-out domain's train docs: not encoded
            wanted = [doc for doc, v in zip(kept, is_vals) if v or not skip]
            encoded = iter(tok.encode_batch(wanted) if wanted else ())
            for doc, score, is_val in zip(kept, scores, is_vals):
                if cap and sum(w.stats["tokens"] for w in writers.values()) >= cap:
                    break
                ids = next(encoded) if is_val or not skip else None
                content.update(len(doc.encode("utf-8", "replace")).to_bytes(8, "little"))
                content.update(doc.encode("utf-8", "replace"))
                if not is_val and score < min_score:
                    min_score, min_doc = score, n_docs
                if ids is None:
                    n_docs += 1
                    continue
                if tail_split:  # one document: its last val_fraction of tokens validate
                    cut = len(ids) - max(1, int(len(ids) * val_fraction))
                    writers["train"].add([tok.bos_id, *ids[:cut]], len(doc))
                    writers["val"].add([*ids[cut:], tok.eos_id], 0)
                else:
                    writers["val" if is_val else "train"].add(
                        [tok.bos_id, *ids, tok.eos_id], len(doc))
                n_docs += 1
            bar.update(len(batch))
    except BaseException:
        for w in writers.values():
            w.writer.close()
        raise
    finally:
        bar.close()
    stats = {s: w.close() for s, w in writers.items()}
    if n_docs == 0:
        raise PrepareError(f"Domain {d['name']!r} has no non-empty document "
                           f"({n_empty} empty); check its source.")
    return {"format": FORMAT_VERSION, "name": d["name"], "domain": d,
            "seq_len": seq_len, "row_len": seq_len + 1,
            "record": "int32 [2, seq_len + 1]: tokens, segment_ids (0 = padding)",
            "tokenizer_sha256": tok.sha256, "tokenizer_path": tok.path,
            "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "pad_id": pad_id, "val_fraction": val_fraction, "seed": seed,
            "content_sha256": content.hexdigest(), "n_documents": n_docs,
            "n_empty_documents": n_empty,
            "n_tokens": sum(s["tokens"] for s in stats.values()),
            "n_rows": sum(s["rows"] for s in stats.values()),
            "splits": stats, "min_score_doc": min_doc, "tail_split": tail_split}
