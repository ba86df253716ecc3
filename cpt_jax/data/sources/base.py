"""What every source kind is: a ``SourceKind`` lists, reads, fingerprints and describes
one kind of domain; the registry (``cpt_jax.data.sources.registry``) holds one per kind.

A kind declares its required and optional keys; the registry checks them, the keys every
kind takes (``name``, ``kind``, ``max_docs``, ``max_chars``) and the caps, so a kind only
fills its own defaults (``normalize``) and reads its own format (``documents``).
Adding a kind is one subclass and one registry entry.

The helpers here are shared by the kinds that read files: ``glob_files`` (sorted, ``~``
and ``**`` expanded, each real file once), ``stat`` and ``content`` (a file's part of a
fingerprint: its size and sha256, remembered by (path, size, mtime) so that a re-check
reads nothing; see ``use_hash_cache``), ``open_binary`` (gzip or zstd
decompressed by the file's suffix) and ``refuse_binary``, the
check that keeps a binary file (Parquet, Arrow, zstd, NUL bytes) out of a text kind: such
bytes would otherwise be decoded with replacement characters and trained on.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import threading
from collections.abc import Iterator

from cpt_jax import atomic


class DomainError(ValueError):
    """A domain spec or its source is unusable; the message names the domain and the fix."""


class SourceKind:
    """One kind of domain source. Subclasses set ``name``, ``required``, ``optional`` and
    implement ``documents``; file kinds implement ``files`` too."""

    name: str = ""
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    # Keys that only say where the data lives (not what it is): left out of the prepared
    # data's key, so a copied corpus with the same bytes is recognised (its content is in
    # the fingerprint).
    location: tuple[str, ...] = ("pattern",)

    def default_name(self, d: dict) -> str | None:
        """The domain name when the spec gives none (None: the spec must name it)."""
        return None

    def normalize(self, d: dict) -> None:
        """Fills this kind's defaults into ``d`` in place; raises DomainError if invalid."""

    def files(self, d: dict) -> list[str]:
        """The files the source reads, sorted ([] for kinds that do not read files)."""
        return []

    def documents(self, d: dict) -> Iterator[str]:
        """Every document of the source, in a deterministic order."""
        raise NotImplementedError

    def fingerprint(self, d: dict) -> dict:
        """A JSON-able description that changes whenever the content does: the size and
        sha256 of every file in order (no path or mtime, so a touched or copied corpus
        with the same bytes has the same fingerprint)."""
        return {"files": [content(p) for p in self.files(d)]}

    def describe(self, d: dict) -> str:
        """A short description of where the documents come from, for error messages."""
        return f"pattern {d.get('pattern')}"


def as_patterns(d: dict, key: str = "pattern") -> None:
    """``d[key]`` as a list of strings (one pattern may be given as a string)."""
    if isinstance(d[key], str):
        d[key] = [d[key]]
    d[key] = [str(p) for p in d[key]]


def glob_files(d: dict, key: str = "pattern") -> list[str]:
    """Files matching the domain's patterns, sorted, each real file once; DomainError
    naming the fix if none.

    A file reached by several paths (a symlink loop such as ``self -> .`` under a ``**``
    pattern, or a symlinked folder inside the walked tree) is read once, under the path
    with the fewest symlinked folders (then the shortest): globs never read a folder they
    already walk twice.
    """
    files = set()
    for pattern in d[key]:
        files.update(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                     if os.path.isfile(p))
    if not files:
        raise DomainError(f"Domain {d['name']!r}: no files match {d[key]}; check the path "
                          f"(it is read relative to {os.getcwd()!r}).")
    links: dict[str, int] = {}

    def n_links(path: str) -> int:  # symlinks on the way to path (memoized per folder)
        parent = os.path.dirname(path)
        if parent == path or not parent:
            return 0
        if parent not in links:
            links[parent] = n_links(parent) + os.path.islink(parent)
        return links[parent]

    first: dict[str, str] = {}
    for p in sorted(files, key=lambda p: (n_links(p), p.count(os.sep), p)):
        first.setdefault(os.path.realpath(p), p)
    return sorted(first.values())


def stat(path: str) -> tuple:
    """(absolute path, size, mtime_ns) of a file."""
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------------------------------
# Content hashes, remembered by (real path, size, mtime_ns)

HASH_CACHE_FILE = "file_hashes.json"
_memo: dict[tuple, str] = {}
_cache = {"path": None, "loaded": None, "dirty": False}
_lock = threading.Lock()


def use_hash_cache(data_dir: str | None) -> None:
    """Remember file hashes in ``<data_dir>/file_hashes.json`` (the data cache's meta):
    a file whose (real path, size, mtime) is recorded there is not read again. ``None``
    keeps them in this process's memory only."""
    with _lock:
        path = None if data_dir is None else os.path.join(os.path.expanduser(data_dir),
                                                          HASH_CACHE_FILE)
        if path != _cache["path"]:
            _cache.update(path=path, loaded=None, dirty=False)


def _load_cache() -> dict:
    if _cache["loaded"] is None:
        entries = {}
        if _cache["path"] and os.path.isfile(_cache["path"]):
            try:
                with open(_cache["path"]) as f:
                    entries = json.load(f).get("files", {})
            except (OSError, ValueError, AttributeError):
                entries = {}  # a damaged cache only costs a re-hash
        _cache["loaded"] = entries if isinstance(entries, dict) else {}
    return _cache["loaded"]


def save_hash_cache() -> None:
    """Writes the remembered hashes (if any are new) atomically to the cache file."""
    with _lock:
        if not (_cache["path"] and _cache["dirty"]):
            return
        try:
            atomic.write_json(_cache["path"], {"files": _cache["loaded"]}, sort_keys=True)
            _cache["dirty"] = False
        except OSError:
            pass  # read-only cache: the hashes are recomputed next time


def content(path: str) -> tuple[int, str]:
    """(size, sha256) of a file's bytes; hashed once per (real path, size, mtime_ns)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    with _lock:
        digest = _memo.get(key)
        if digest is None:
            entry = _load_cache().get(real)
            if entry and entry[:2] == [st.st_size, st.st_mtime_ns]:
                digest = entry[2]
    if digest is None:
        with open(real, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        with _lock:
            if _cache["path"]:
                _load_cache()[real] = [st.st_size, st.st_mtime_ns, digest]
                _cache["dirty"] = True
    _memo[key] = digest
    return (st.st_size, digest)


ZSTD_SUFFIXES = (".zst", ".zstd")


def open_binary(path: str):
    """A binary stream of ``path``'s content, gzip or zstd decompressed by its suffix."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(ZSTD_SUFFIXES):
        import zstandard  # pylint: disable=import-outside-toplevel
        raw = open(path, "rb")  # pylint: disable=consider-using-with
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return open(path, "rb")  # pylint: disable=consider-using-with


def is_text_type(arrow_type) -> bool:
    """Whether an Arrow column type holds strings (string, large_string, string_view)."""
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    view = getattr(pa.types, "is_string_view", lambda t: False)
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or view(
        arrow_type)


# Leading bytes of binary formats a corpus often comes in, and the kind that reads each.
_MAGIC = (
    (b"PAR1", "a Parquet file", "kind 'parquet'"),
    (b"ARROW1", "an Arrow file", "kind 'hf_dataset'"),
    (b"\xff\xff\xff\xff", "an Arrow stream (a datasets.save_to_disk shard)",
     "kind 'hf_dataset'"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed without a .zst suffix",
     "kind 'jsonl' or 'text_glob' with the file named *.zst"),
    (b"PK\x03\x04", "a zip archive", "kind 'text_glob' on the unpacked files"),
    (b"\x89HDF", "an HDF5 file", "a text export of it"),
)


def refuse_binary(d: dict, path: str, head: bytes) -> None:
    """Raises DomainError when ``head`` (a file's first bytes, after any gzip layer) is a
    binary format or holds NUL bytes, naming the kind that reads it."""
    for magic, what, fix in _MAGIC:
        if head.startswith(magic):
            raise DomainError(f"Domain {d['name']!r} (kind {d['kind']!r}): {path} is {what}, "
                              f"not text; use {fix}.")
    if b"\x00" in head:
        raise DomainError(f"Domain {d['name']!r} (kind {d['kind']!r}): {path} holds NUL "
                          f"bytes, so it is binary, not text; convert it to text or use the "
                          f"kind that reads its format (parquet, jsonl, hf_dataset, tfds).")
