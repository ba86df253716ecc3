"""The source kinds by name, and the functions every caller uses on a domain: normalize its
spec, list its files, read its documents (with the ``max_docs``/``max_chars`` caps),
validate it cheaply and fingerprint its content.

A domain is a plain dict (or an ml_collections ``ConfigDict``) with a ``kind`` from
``KINDS``; the keys every kind takes are ``name``, ``kind``, ``max_docs``, ``max_chars``
(reading stops at the cap) and ``max_tokens`` (preparation stops once the domain's rows
hold that many tokens: a replay source needs only the rows replay can reach). A cap is
part of the domain's identity, so a capped dataset is prepared separately. Unknown keys
are an error (usually typos).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from cpt_jax.data.sources.base import DomainError, SourceKind, save_hash_cache
from cpt_jax.data.sources.demo import Demo
from cpt_jax.data.sources.hf_dataset import HfDataset
from cpt_jax.data.sources.jsonl import Jsonl
from cpt_jax.data.sources.parquet import Parquet
from cpt_jax.data.sources.text_glob import TextGlob
from cpt_jax.data.sources.tfds import Tfds

REGISTRY: dict[str, SourceKind] = {k.name: k for k in (
    TextGlob(), Jsonl(), Parquet(), HfDataset(), Tfds(), Demo())}
KINDS = tuple(REGISTRY)
COMMON_KEYS = ("name", "kind", "max_docs", "max_chars", "max_tokens")


def normalize_domain(domain: Any) -> dict:
    """Returns the domain as a plain dict with defaults filled in, or raises DomainError
    naming the domain and the fix (unknown kind, missing or unknown key, bad name or cap)."""
    if hasattr(domain, "to_dict"):
        domain = domain.to_dict()
    if not isinstance(domain, Mapping):
        raise DomainError(f"A domain must be a dict such as {{'name': 'en', 'kind': "
                          f"'text_glob', 'pattern': '/data/*.txt'}}, got {domain!r}.")
    d = dict(domain)
    kind = REGISTRY.get(d.get("kind")) if isinstance(d.get("kind"), str) else None
    label = d.get("name") or d.get("demo") or d.get("tfds_name") or "?"
    if kind is None:
        raise DomainError(f"Domain {label!r}: unknown kind {d.get('kind')!r}; use one of "
                          f"{KINDS}.")
    for key in kind.required:
        if d.get(key) in (None, "", []):
            raise DomainError(f"Domain {label!r} (kind {kind.name!r}) needs the key {key!r}.")
    allowed = set(kind.required) | set(COMMON_KEYS) | set(kind.optional)
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise DomainError(f"Domain {label!r} (kind {kind.name!r}): unknown keys {unknown}; "
                          f"allowed keys are {sorted(allowed)}.")
    d["name"] = d.get("name") or kind.default_name(d)
    kind.normalize(d)
    if not d.get("name"):
        raise DomainError(f"A {kind.name!r} domain needs a 'name' (it names the prepared "
                          f"data folder and the metrics), got {domain!r}.")
    name = str(d["name"])
    if "/" in name or "\\" in name or name.startswith(".") or name.strip() != name:
        raise DomainError(f"Domain name {name!r} must be usable as a folder name: no "
                          f"slashes, no leading dot or surrounding spaces.")
    d["name"] = name
    for key in ("max_docs", "max_chars", "max_tokens"):
        if d.get(key) is not None and (not isinstance(d[key], int) or d[key] <= 0):
            raise DomainError(f"Domain {name!r}: {key} must be a positive int or None, "
                              f"got {d[key]!r}.")
    d.setdefault("max_docs", None)
    d.setdefault("max_chars", None)
    if d.get("max_tokens") is None:  # absent from the spec, so uncapped keys stay as before
        d.pop("max_tokens", None)
    return d


def kind_of(d: dict) -> SourceKind:
    """The SourceKind of a normalized domain."""
    return REGISTRY[d["kind"]]


def list_files(domain: Any) -> list[str]:
    """The files a domain reads, sorted ([] for tfds and demo); DomainError if none match."""
    d = normalize_domain(domain)
    return kind_of(d).files(d)


def iter_documents(domain: Any) -> Iterator[str]:
    """Yields the documents (str) of a domain in a deterministic order.

    Documents are yielded as they are (empty ones included); ``max_docs``/``max_chars``
    stop the iteration early. Errors name the domain, and the file and line where relevant.
    """
    d = normalize_domain(domain)
    n_docs = n_chars = 0
    for doc in kind_of(d).documents(d):
        if d["max_docs"] is not None and n_docs >= d["max_docs"]:
            return
        if d["max_chars"] is not None and n_chars >= d["max_chars"]:
            return
        n_docs += 1
        n_chars += len(doc)
        yield doc


def iter_long_documents(domain: Any) -> Iterator[Iterator[str]]:
    """Like ``iter_documents``, but each document is an iterator of its text in parts
    (their concatenation is the document), so a document of any size is read in bounded
    memory: a ``text_glob`` file comes in parts of about ``text_glob.PART_CHARS``
    characters cut at paragraph or line boundaries; other kinds' documents are one part.
    Consume each document before asking for the next. Same caps as ``iter_documents``."""
    d = normalize_domain(domain)
    kind = kind_of(d)
    docs = (kind.document_parts(d) if hasattr(kind, "document_parts")
            else (iter((doc,)) for doc in kind.documents(d)))
    n_docs = 0
    counted = [0]
    for parts in docs:
        if d["max_docs"] is not None and n_docs >= d["max_docs"]:
            return
        if d["max_chars"] is not None and counted[0] >= d["max_chars"]:
            return
        n_docs += 1
        yield _counting(parts, counted)


def _counting(parts: Iterator[str], counted: list) -> Iterator[str]:
    for part in parts:
        counted[0] += len(part)
        yield part


def validate_domain(domain: Any) -> dict:
    """Checks a domain cheaply (spec, files, first document) and returns the normalized spec.

    Raises DomainError for an unknown kind, a missing key, no matching files, binary input
    to a text kind, a source with no non-empty document, or a record without the text field.
    """
    d = normalize_domain(domain)
    list_files(d)
    for doc in iter_documents(d):
        if doc.strip():
            return d
    raise DomainError(f"Domain {d['name']!r}: the source has no non-empty document "
                      f"({kind_of(d).describe(d)}); point it at files with text.")


def source_fingerprint(domain: Any) -> dict:
    """A JSON-able description of the source content: (size, sha256) of each file a
    domain reads, in reading order; for tfds the dataset name/version and its files; for
    demos the Python and Unicode data versions and the stdlib files read. Any change to
    a source's bytes changes the fingerprint (and with it the prepared-data folder and a
    run's resume check); a touched or copied corpus with the same bytes keeps it. Each file
    is hashed once: its hash is remembered by (real path, size, mtime) in memory and in
    the data cache's ``file_hashes.json`` (``base.use_hash_cache``)."""
    d = normalize_domain(domain)
    try:
        return kind_of(d).fingerprint(d)
    finally:
        save_hash_cache()


def identity(domain: Any) -> dict:
    """The normalized spec without the keys that only say where the data lives
    (``SourceKind.location``: a file pattern, a dataset path): with the content
    fingerprint, what the prepared data's key is made of."""
    d = normalize_domain(domain)
    return {k: v for k, v in d.items() if k not in kind_of(d).location}
