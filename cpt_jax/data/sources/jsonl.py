"""``jsonl``: one JSON object per line, the text under ``field`` (default ``text``):
``{"kind": "jsonl", "pattern": "/data/fr/*.jsonl.zst", "field": "text"}``.

Files ending in ``.gz`` are gzip and ``.zst``/``.zstd`` zstandard (Dolma, RedPajama),
decompressed as a stream, never whole in memory. Blank lines are skipped. A file that is
binary after decompression (Parquet, Arrow, a zst file without its suffix) is refused,
naming the kind to use.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator

from cpt_jax.data.sources.base import (DomainError, SourceKind, as_patterns, glob_files,
                                       open_binary, refuse_binary)

_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_lone_surrogates(text: str, d: dict, path: str, lineno: int) -> str:
    """JSON may escape half of a UTF-16 pair ("\\ud800"), which is no character: no
    tokenizer can encode it. Replaced by U+FFFD with ``encoding_errors="replace"``, else
    refused naming the line."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        if d["encoding_errors"] != "strict":
            return _SURROGATE.sub("\ufffd", text)
        raise DomainError(f"Domain {d['name']!r}: {path}:{lineno} holds a lone surrogate "
                          "escape (half of a UTF-16 pair, e.g. \\ud800), which is not text; "
                          "fix the line or set \"encoding_errors\": \"replace\".") from None


class Jsonl(SourceKind):
    name = "jsonl"
    required = ("pattern",)
    optional = ("field", "encoding_errors")

    def normalize(self, d):
        as_patterns(d)
        d.setdefault("encoding_errors", "strict")
        d.setdefault("field", "text")

    def files(self, d):
        return glob_files(d)

    def documents(self, d) -> Iterator[str]:
        for path in self.files(d):
            yield from self._file(d, path)

    def _file(self, d: dict, path: str) -> Iterator[str]:
        field, name = d["field"], d["name"]
        with open_binary(path) as raw:
            buffered = io.BufferedReader(raw) if not hasattr(raw, "peek") else raw
            refuse_binary(d, path, buffered.peek(8192)[:8192])
            f = io.TextIOWrapper(buffered, encoding="utf-8", errors=d["encoding_errors"])
            try:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DomainError(f"Domain {name!r}: {path}:{lineno} is not valid "
                                          f"JSON ({e}).") from None
                    if not isinstance(record, dict) or field not in record:
                        keys = sorted(record) if isinstance(record, dict) else type(record)
                        raise DomainError(
                            f"Domain {name!r}: {path}:{lineno} has no field {field!r} "
                            f"(keys: {keys}); set the domain's \"field\" to the key holding "
                            f"the text.")
                    text = record[field]
                    if not isinstance(text, str):
                        raise DomainError(f"Domain {name!r}: {path}:{lineno} field "
                                          f"{field!r} is a {type(text).__name__}, not text.")
                    yield _no_lone_surrogates(text, d, path, lineno)
            except UnicodeDecodeError as e:
                raise DomainError(f"Domain {name!r}: {path} is not valid UTF-8 ({e}); fix "
                                  f"the file or set \"encoding_errors\": \"replace\".") from None
            except (EOFError, OSError, ValueError) as e:
                if isinstance(e, DomainError):
                    raise
                raise DomainError(f"Domain {name!r}: {path} cannot be read to its end "
                                  f"({' '.join(str(e).split()) or type(e).__name__}); the file "
                                  "is truncated or damaged: copy it again or leave it out of "
                                  "the pattern.") from None
