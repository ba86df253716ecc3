"""``text_glob``: one document per text file, ``{"kind": "text_glob", "pattern":
"/data/en/*.txt"}``.

``pattern`` is a string or a list of them (``~`` and ``**`` expanded, files in sorted
path order); ``.gz`` and ``.zst`` files are decompressed. Files are decoded as UTF-8; ``"encoding_errors":
"replace"`` accepts a few invalid bytes, but a binary file (Parquet, Arrow, zstd, NUL
bytes) is always refused, naming the kind that reads it, since replacing its bytes would
train on garbage.

Preparation reads a file in parts (``document_parts``) of about ``PART_CHARS``
characters, cut where a paragraph ends (else a line, else a space) before a
non-whitespace character, so memory does not depend on the file's size; the tokens are
those of the whole file wherever a part ends at such a boundary (the tokenizers split
tokens there).
"""

from __future__ import annotations

import codecs
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


PART_CHARS = 1_000_000  # characters per part of a file read in parts
_READ_BYTES = 1 << 20


def cut_point(text: str, lo: int) -> int:
    """The last index in ``text[lo:]`` where a new part may start, preferring a
    paragraph break ("\\n\\n"), then a line break (the part starts after them), then a
    space (the part starts with it), always before a letter or digit and never inside a
    whitespace run, where tokenizers split tokens anyway; ``len(text)`` when there is
    none."""
    for sep, at in (("\n\n", 2), ("\n", 1), (" ", 0)):
        end = len(text) - 1  # the character after the separator must exist
        while True:
            pos = text.rfind(sep, lo, end)
            if pos <= 0:
                break
            after = pos + len(sep)
            if (after < len(text) and text[after].isalnum()
                    and not (sep == " " and text[pos - 1].isspace())):
                return pos + at
            end = pos + len(sep) - 1
    return len(text)


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

    def document_parts(self, d) -> Iterator[Iterator[str]]:
        for path in self.files(d):
            yield self._parts(d, path)

    def _parts(self, d: dict, path: str) -> Iterator[str]:
        """The file's text in parts of about PART_CHARS characters (see ``cut_point``)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors=d["encoding_errors"])
        buf, first, at = "", True, 0
        with open_binary(path) as f:
            while True:
                raw = f.read(_READ_BYTES)
                if first:
                    refuse_binary(d, path, raw[:8192])
                    first = False
                try:
                    buf += decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    raise DomainError(
                        f"Domain {d['name']!r}: {path} is not valid UTF-8 ({e}, in bytes "
                        f"{at}-{at + len(raw)}); fix the file or set \"encoding_errors\": "
                        f"\"replace\".") from None
                at += len(raw)
                while len(buf) >= 2 * PART_CHARS or (buf and not raw and
                                                     len(buf) > PART_CHARS):
                    cut = cut_point(buf[:2 * PART_CHARS], PART_CHARS // 2)
                    if cut >= len(buf) or cut == len(buf[:2 * PART_CHARS]):
                        cut = 2 * PART_CHARS if len(buf) > 2 * PART_CHARS else len(buf)
                    if cut >= len(buf):
                        break
                    yield buf[:cut]
                    buf = buf[cut:]
                if not raw:
                    break
        yield buf
