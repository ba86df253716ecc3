"""``text_glob``: one document per text file, ``{"kind": "text_glob", "pattern":
"/data/en/*.txt"}``.

``pattern`` is a string or a list of them (``~`` and ``**`` expanded, files in sorted
path order); ``.gz`` and ``.zst`` files are decompressed. Files are decoded as UTF-8; ``"encoding_errors":
"replace"`` accepts a few invalid bytes, but a binary file (Parquet, Arrow, zstd, NUL
bytes) is always refused, naming the kind that reads it, since replacing its bytes would
train on garbage.
"""

from __future__ import annotations

from collections.abc import Iterator

from cpt_jax.data.sources.base import (DomainError, SourceKind, as_patterns, glob_files,
                                       open_binary, refuse_binary)


def decode_text(d: dict, path: str, raw: bytes) -> str:
    """``raw`` as UTF-8 text under the domain's ``encoding_errors``, or DomainError."""
    refuse_binary(d, path, raw[:8192])
    try:
        return raw.decode("utf-8", errors=d["encoding_errors"])
    except UnicodeDecodeError as e:
        raise DomainError(f"Domain {d['name']!r}: {path} is not valid UTF-8 ({e}); fix the "
                          f"file or set \"encoding_errors\": \"replace\".") from None


class TextGlob(SourceKind):
    name = "text_glob"
    required = ("pattern",)
    optional = ("encoding_errors",)

    def normalize(self, d):
        as_patterns(d)
        d.setdefault("encoding_errors", "strict")

    def files(self, d):
        return glob_files(d)

    def documents(self, d) -> Iterator[str]:
        for path in self.files(d):
            with open_binary(path) as f:
                raw = f.read()
            yield decode_text(d, path, raw)
