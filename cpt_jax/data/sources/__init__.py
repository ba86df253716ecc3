"""Text sources: what a *domain* is and how its documents are read.

A domain is a named text source given by a plain dict (usually a sub-dict of an
ml_collections config; a ``ConfigDict`` is accepted too). One kind per module here, one
registry (``registry.py``)::

    {"name": "en", "kind": "text_glob", "pattern": "/data/en/*.txt"}      # one document per file
    {"name": "fr", "kind": "jsonl", "pattern": "/data/fr/*.jsonl.zst", "field": "text"}
    {"name": "de", "kind": "parquet", "pattern": "/data/de/*.parquet", "field": "text"}
    {"name": "wiki", "kind": "hf_dataset", "path": "/data/wiki", "split": "train"}
    {"name": "fr", "kind": "tfds", "tfds_name": "wiki40b/fr", "split": "train",
     "feature": "text", "data_dir": None}
    {"kind": "demo", "demo": "python_docs", "max_chars": 1_000_000}

Every kind takes an optional ``max_docs``, ``max_chars`` and ``max_tokens`` cap. Adding a
kind is one ``SourceKind`` subclass in its own module and one entry in
``registry.REGISTRY``.
"""

from cpt_jax.data.sources.base import DomainError, SourceKind, use_hash_cache
from cpt_jax.data.sources.demo import DEFAULT_DEMO_MAX_CHARS, DEMO_VERSION, DEMOS
from cpt_jax.data.sources.registry import (KINDS, REGISTRY, identity, iter_documents,
                                           iter_long_documents, kind_of, list_files,
                                           normalize_domain, source_fingerprint,
                                           validate_domain)

__all__ = ["DEFAULT_DEMO_MAX_CHARS", "DEMO_VERSION", "DEMOS", "DomainError", "KINDS",
           "REGISTRY", "SourceKind", "identity", "iter_documents", "iter_long_documents",
           "kind_of", "list_files", "normalize_domain", "source_fingerprint",
           "use_hash_cache", "validate_domain"]
