"""``demo``: three offline domains built from text that ships with every CPython, so the
whole pipeline (and a continual pre-training demo) runs with no download:
``{"kind": "demo", "demo": "python_docs", "max_chars": 1_000_000}``. Each is deterministic
for a given Python installation and capped by ``max_chars`` (default 1M chars):

- ``python_docs``: English prose. The ``pydoc_data.topics`` help pages, then the
  docstrings of the standard library (module, class and function docstrings of each module
  as one document), parsed with ``ast`` from the source files, never imported.
- ``python_code``: Python source code. One stdlib ``.py`` file = one document, with its
  docstrings cut out (comments and layout kept) so that no text is shared with
  ``python_docs``.
- ``unicode_table``: structured, tabular data. ``UnicodeData.txt``-style records
  (``code;NAME;category;combining;bidi;decomposition;decimal;digit;numeric;mirrored;
  upper;lower``) regenerated from the ``unicodedata`` module, one document per 256-code-point
  page. It is always present (``unicodedata`` is a core module, unlike the stdlib ``test/``
  folder with its HTML/XML/CSV files, which slim and distro builds drop) and its
  distribution (hex codes, upper-case names, semicolon-separated fields) is far from both
  prose and code, which is what a forgetting experiment needs. Code points with
  algorithmically derived names (CJK/Tangut/Khitan/Nushu ideographs, Hangul syllables)
  are skipped, as in ``UnicodeData.txt``.

Stdlib files are enumerated from ``sysconfig.get_paths()["stdlib"]`` without
``site-packages`` and test folders, sorted by path and then put in a fixed pseudo-random
order (sha1 of the relative path), so that a ``max_chars`` cap yields a varied sample
rather than the alphabetically first modules.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
import unicodedata
from collections.abc import Iterator

from cpt_jax.data.sources.base import DomainError, SourceKind

DEMOS = ("python_docs", "python_code", "unicode_table")
DEFAULT_DEMO_MAX_CHARS = 1_000_000
# Bumped whenever a demo generator changes its output (part of the prepared-data key).
DEMO_VERSION = 1


class Demo(SourceKind):
    name = "demo"
    required = ("demo",)
    location = ()

    def default_name(self, d):
        return d["demo"]

    def normalize(self, d):
        if d["demo"] not in DEMOS:
            label = d.get("name") or d["demo"]
            raise DomainError(f"Domain {label!r}: unknown demo {d['demo']!r}; use one of "
                              f"{DEMOS}.")
        d.setdefault("max_chars", DEFAULT_DEMO_MAX_CHARS)

    def documents(self, d) -> Iterator[str]:
        return {"python_docs": _demo_python_docs, "python_code": _demo_python_code,
                "unicode_table": _demo_unicode_table}[d["demo"]]()

    def fingerprint(self, d):
        fp = {"demo": d["demo"], "demo_version": DEMO_VERSION, "python": sys.version,
              "unidata": unicodedata.unidata_version}
        if d["demo"] in ("python_docs", "python_code"):
            root = _stdlib_dir()
            fp["stdlib"] = [(os.path.relpath(p, root), os.path.getsize(p))
                            for p in _stdlib_files()]
        return fp

    def describe(self, d):
        return f"demo {d['demo']!r}"


def _stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test",
              "__pycache__", "turtledemo"}


def _stdlib_files() -> list[str]:
    """Stdlib .py files (no tests, no site-packages), in a fixed pseudo-random order."""
    root = _stdlib_dir()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(n for n in dirnames
                             if n not in _SKIP_DIRS and not n.startswith("config-"))
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    rel = sorted(os.path.relpath(p, root) for p in files)
    rel.sort(key=lambda r: hashlib.sha1(r.encode()).hexdigest())
    return [os.path.join(root, r) for r in rel]


def _parse(path: str) -> tuple[str, ast.Module] | None:
    try:
        with open(path, encoding="utf-8") as f:
            src = f.read()
        return src, ast.parse(src)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None  # a few stdlib files (lib2to3 fixtures, ...) are not parseable


def _docstring_nodes(tree: ast.Module) -> Iterator[ast.AST]:
    """Module/class/function nodes in source order."""
    yield tree
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node


def _demo_python_docs() -> Iterator[str]:
    from pydoc_data import topics  # pylint: disable=import-outside-toplevel

    for key in sorted(topics.topics):
        yield topics.topics[key].strip() + "\n"
    for path in _stdlib_files():
        parsed = _parse(path)
        if parsed is None:
            continue
        nodes = sorted(_docstring_nodes(parsed[1]), key=lambda n: getattr(n, "lineno", 0))
        docs = [ast.get_docstring(n) for n in nodes]
        docs = [s.strip() for s in docs if s and s.strip()]
        if docs:
            yield "\n\n".join(docs) + "\n"


def _demo_python_code() -> Iterator[str]:
    for path in _stdlib_files():
        parsed = _parse(path)
        if parsed is None:
            continue
        src, tree = parsed
        # Not splitlines(): it also splits on form feeds, which ast does not count.
        lines = [line + "\n" for line in src.split("\n")]
        drop = set()
        for node in _docstring_nodes(tree):
            body = getattr(node, "body", None)
            if not (body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                continue
            first, last = body[0].lineno, body[0].end_lineno
            # ast column offsets count UTF-8 bytes.
            alone = (lines[first - 1].encode()[:body[0].col_offset].strip() == b""
                     and (len(body) == 1 or body[1].lineno > last)
                     and lines[last - 1].encode()[body[0].end_col_offset:].strip()
                     in (b"", b";"))
            if alone:
                # Keep the body syntactically non-empty when the docstring is all there is.
                if len(body) == 1 and node is not tree:
                    indent = lines[first - 1][:len(lines[first - 1]) -
                                              len(lines[first - 1].lstrip())]
                    lines[first - 1] = indent + "pass\n"
                    first += 1
                drop.update(range(first, last + 1))
        text = "".join(l for i, l in enumerate(lines, 1) if i not in drop).strip()
        if text:
            yield text + "\n"


_ALGORITHMIC_NAMES = ("CJK UNIFIED IDEOGRAPH-", "CJK COMPATIBILITY IDEOGRAPH-",
                      "TANGUT IDEOGRAPH-", "KHITAN SMALL SCRIPT CHARACTER-",
                      "NUSHU CHARACTER-", "HANGUL SYLLABLE ")


def _unicode_record(cp: int) -> str | None:
    ch = chr(cp)
    name = unicodedata.name(ch, None)
    if name is None or name.startswith(_ALGORITHMIC_NAMES):
        return None
    def num(fn):
        value = fn(ch, None)
        return "" if value is None else str(value)
    upper, lower = ch.upper(), ch.lower()
    fields = [
        f"{cp:04X}", name, unicodedata.category(ch), str(unicodedata.combining(ch)),
        unicodedata.bidirectional(ch), unicodedata.decomposition(ch),
        num(unicodedata.decimal), num(unicodedata.digit),
        "" if unicodedata.numeric(ch, None) is None else
        str(unicodedata.numeric(ch)).removesuffix(".0"),
        "Y" if unicodedata.mirrored(ch) else "N",
        f"{ord(upper):04X}" if len(upper) == 1 and upper != ch else "",
        f"{ord(lower):04X}" if len(lower) == 1 and lower != ch else "",
    ]
    return ";".join(fields)


def _demo_unicode_table() -> Iterator[str]:
    for page in range((sys.maxunicode + 1) // 256):
        records = [r for r in map(_unicode_record, range(page * 256, page * 256 + 256)) if r]
        if records:
            yield "\n".join(records) + "\n"
