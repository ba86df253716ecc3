"""A prepared folder's row files: their format, how a split is written and read back.

A split's rows are array_record files of one record per row, int32 [2, seq_len + 1]
(tokens, segment ids), written with ``WRITER_OPTIONS`` by ``SplitWriter``; ``meta.json``
describes the folder and records each file's size and sha256 (``file_integrity``).
``PackedRows`` reads a split and checks its files against meta.json, raising
``CorruptDataError`` on any mismatch (``cpt_jax.data.prepare`` describes the layout and
the checks).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from cpt_jax.data.packing import RowPacker
from cpt_jax.data.prepare_errors import PrepareError, corrupt

FORMAT_VERSION = 2  # 2: sharded files, content fingerprints
WRITER_OPTIONS = "group_size:1"  # one row per chunk: cheap random access to single rows
SPLITS = ("train", "val")


def file_integrity(path: str) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        return {"bytes": os.fstat(f.fileno()).st_size, "sha256": digest}



def is_complete(folder: str, key: str) -> bool:
    """Whether ``folder`` is a complete preparation for ``key`` (its meta.json names it)."""
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.isfile(meta_path):
        return False
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):  # unreadable: not complete (reported by the caller)
        return False
    return isinstance(meta, dict) and meta.get("key") == key



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
            raise corrupt(self.path, f"has no readable description in {meta_path} "
                                      f"({type(e).__name__}: {e})") from e
        self.row_len = self.seq_len + 1
        self.files = [os.path.join(folder, n) for n in names]
        for file in self.files:
            if not os.path.isfile(file):
                raise corrupt(file, f"is missing, though {meta_path} marks the folder "
                                     f"as completely prepared")
            recorded = self.meta.get("files", {}).get(os.path.basename(file))
            if recorded is None:  # absent in folders from before
                continue
            size = os.path.getsize(file)
            if size != recorded["bytes"]:
                raise corrupt(file, f"has {size} bytes but was written with "
                                     f"{recorded['bytes']} (truncated or overwritten "
                                     f"after preparation)")
            if verify_sha256:
                actual = file_integrity(file)["sha256"]
                if actual != recorded["sha256"]:
                    raise corrupt(file, f"has sha256 {actual[:16]}... but was written "
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
                raise corrupt(where, f"cannot be opened by array_record ({e})") from e
            if len(source) != self.num_rows:
                raise corrupt(where, f"holds {len(source)} records but meta.json says "
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
            raise corrupt(where, f"could not be read back ({e})") from e
        record_bytes = 2 * self.row_len * 4
        bad = [len(r) for r in records if len(r) != record_bytes]
        if bad:  # e.g. truncated while open: array_record then returns empty records
            raise corrupt(self.files[0] if len(self.files) == 1 else self.path,
                           f"returned {len(bad)} of {len(records)} records with "
                                      f"{sorted(set(bad))} bytes instead of {record_bytes} "
                                      f"(did it change while open?)")
        rows = np.frombuffer(b"".join(records), dtype=np.int32).reshape(
            idx.size, 2, self.row_len)
        return rows[:, 0].copy(), rows[:, 1].copy()

    def __repr__(self):
        return f"PackedRows({self.path!r}, rows={self.num_rows}, seq_len={self.seq_len})"



class SplitWriter:
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

