"""Text sources: what a *domain* is and how its documents are read.

A domain is a named text source given by a plain dict (usually a sub-dict of an
ml_collections config; a ``ConfigDict`` is accepted too). Four kinds exist::

    {"name": "en", "kind": "text_glob", "pattern": "/data/en/*.txt"}      # one document per file
    {"name": "fr", "kind": "jsonl", "pattern": "/data/fr/*.jsonl.gz", "field": "text"}
    {"name": "fr", "kind": "tfds", "tfds_name": "wiki40b/fr", "split": "train",
     "feature": "text", "data_dir": None}
    {"kind": "demo", "demo": "python_docs", "max_chars": 1_000_000}

``pattern`` may be a string or a list of strings (``~`` and ``**`` are expanded, ``.gz``
files are decompressed, files are read in sorted path order, so a source is
deterministic). Text files are decoded as UTF-8;
``"encoding_errors": "replace"`` accepts files with invalid bytes. Every kind takes an
optional ``max_docs`` and ``max_chars`` cap (reading stops once the cap is reached, the
cap is part of the domain's identity, so a capped dataset is prepared separately).

TFDS datasets are read with ``tfds.data_source`` (array_record files, random access, no
TensorFlow). A dataset that was prepared as tfrecord cannot be read that way: install the
optional extra (``pip install cpt_jax[tensorflow]``) and re-prepare it with
``file_format="array_record"``.

Demo sources: three offline domains built from text that ships with every CPython, so the
whole pipeline (and a continual pre-training demo) runs with no download. Each is
deterministic for a given Python installation and capped by ``max_chars`` (default 1M chars):

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
import glob
import gzip
import hashlib
import json
import os
import sys
import sysconfig
import unicodedata
from collections.abc import Iterator, Mapping
from typing import Any

KINDS = ("text_glob", "jsonl", "tfds", "demo")
DEMOS = ("python_docs", "python_code", "unicode_table")
DEFAULT_DEMO_MAX_CHARS = 1_000_000
# Bumped whenever a demo generator changes its output (part of the prepared-data key).
DEMO_VERSION = 1

_REQUIRED = {
    "text_glob": ("pattern",),
    "jsonl": ("pattern",),
    "tfds": ("tfds_name",),
    "demo": ("demo",),
}
_OPTIONAL_COMMON = ("name", "kind", "max_docs", "max_chars")
_OPTIONAL = {
    "text_glob": ("encoding_errors",),
    "jsonl": ("field", "encoding_errors"),
    "tfds": ("split", "feature", "data_dir", "download"),
    "demo": (),
}


class DomainError(ValueError):
    """A domain spec or its source is unusable; the message names the domain and the fix."""


# ---------------------------------------------------------------------------------------
# Spec handling


def normalize_domain(domain: Any) -> dict:
    """Returns the domain as a plain dict with defaults filled in, or raises DomainError.

    Accepts a dict or an ml_collections ConfigDict. Unknown keys are an error (they are
    usually typos such as "patern" that would otherwise be silently ignored).
    """
    if hasattr(domain, "to_dict"):
        domain = domain.to_dict()
    if not isinstance(domain, Mapping):
        raise DomainError(f"A domain must be a dict such as {{'name': 'en', 'kind': "
                          f"'text_glob', 'pattern': '/data/*.txt'}}, got {domain!r}.")
    d = dict(domain)
    kind = d.get("kind")
    label = d.get("name") or d.get("demo") or d.get("tfds_name") or "?"
    if kind not in KINDS:
        raise DomainError(f"Domain {label!r}: unknown kind {kind!r}; use one of {KINDS}.")
    for key in _REQUIRED[kind]:
        if d.get(key) in (None, "", []):
            raise DomainError(f"Domain {label!r} (kind {kind!r}) needs the key {key!r}.")
    allowed = set(_REQUIRED[kind]) | set(_OPTIONAL_COMMON) | set(_OPTIONAL[kind])
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise DomainError(f"Domain {label!r} (kind {kind!r}): unknown keys {unknown}; "
                          f"allowed keys are {sorted(allowed)}.")
    if kind == "demo":
        if d["demo"] not in DEMOS:
            raise DomainError(f"Domain {label!r}: unknown demo {d['demo']!r}; use one of "
                              f"{DEMOS}.")
        d["name"] = d.get("name") or d["demo"]
        d.setdefault("max_chars", DEFAULT_DEMO_MAX_CHARS)
    elif kind == "tfds":
        d["name"] = d.get("name") or d["tfds_name"].replace("/", "-").replace(":", "-")
        d.setdefault("split", "train")
        d.setdefault("feature", "text")
        d.setdefault("data_dir", None)
        d.setdefault("download", False)
    else:
        if isinstance(d["pattern"], str):
            d["pattern"] = [d["pattern"]]
        d["pattern"] = [str(p) for p in d["pattern"]]
        d.setdefault("encoding_errors", "strict")
        if kind == "jsonl":
            d.setdefault("field", "text")
    if not d.get("name"):
        raise DomainError(f"A {kind!r} domain needs a 'name' (it names the prepared "
                          f"data folder and the metrics), got {domain!r}.")
    name = str(d["name"])
    if "/" in name or "\\" in name or name.startswith(".") or name.strip() != name:
        raise DomainError(f"Domain name {name!r} must be usable as a folder name: no "
                          f"slashes, no leading dot or surrounding spaces.")
    d["name"] = name
    for key in ("max_docs", "max_chars"):
        if d.get(key) is not None and (not isinstance(d[key], int) or d[key] <= 0):
            raise DomainError(f"Domain {name!r}: {key} must be a positive int or None, "
                              f"got {d[key]!r}.")
    d.setdefault("max_docs", None)
    d.setdefault("max_chars", None)
    return d


def list_files(domain: Any) -> list[str]:
    """The files of a text_glob/jsonl domain, sorted; raises DomainError if none match."""
    d = normalize_domain(domain)
    if d["kind"] not in ("text_glob", "jsonl"):
        return []
    files = set()
    for pattern in d["pattern"]:
        files.update(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                     if os.path.isfile(p))
    if not files:
        raise DomainError(f"Domain {d['name']!r}: no files match {d['pattern']}; check "
                          f"the path (it is read relative to {os.getcwd()!r}).")
    return sorted(files)


# ---------------------------------------------------------------------------------------
# Reading


def iter_documents(domain: Any) -> Iterator[str]:
    """Yields the documents (str) of a domain in a deterministic order.

    Documents are yielded as they are (empty ones included); ``max_docs``/``max_chars``
    stop the iteration early. Errors name the domain, the file and line where relevant.
    """
    d = normalize_domain(domain)
    reader = {"text_glob": _iter_text_glob, "jsonl": _iter_jsonl, "tfds": _iter_tfds,
              "demo": _iter_demo}[d["kind"]]
    n_docs = n_chars = 0
    for doc in reader(d):
        if d["max_docs"] is not None and n_docs >= d["max_docs"]:
            return
        if d["max_chars"] is not None and n_chars >= d["max_chars"]:
            return
        n_docs += 1
        n_chars += len(doc)
        yield doc


def validate_domain(domain: Any) -> dict:
    """Checks a domain cheaply (spec, files, first document) and returns the normalized spec.

    Raises DomainError for an unknown kind, a missing key, no matching files, a source with
    no non-empty document, or a jsonl record without the text field.
    """
    d = normalize_domain(domain)
    list_files(d)
    for doc in iter_documents(d):
        if doc.strip():
            return d
    raise DomainError(f"Domain {d['name']!r}: the source has no non-empty document "
                      f"({_describe(d)}); point it at files with text.")


def source_fingerprint(domain: Any) -> dict:
    """A JSON-able description of the source content, cheap to compute.

    Files: (path, size, mtime_ns) of each file. TFDS: dataset name/version and the
    (path, size, mtime_ns) of its data files. Demo: the Python version, the Unicode data
    version and the (path, size) of the stdlib files read. Any change to a source changes
    the fingerprint, and with it the prepared-data folder.
    """
    d = normalize_domain(domain)
    if d["kind"] in ("text_glob", "jsonl"):
        return {"files": [_stat(p) for p in list_files(d)]}
    if d["kind"] == "tfds":
        builder = _tfds_builder(d)
        data_dir = str(builder.data_path)
        files = sorted(glob.glob(os.path.join(data_dir, "*")))
        return {"tfds": builder.info.full_name, "files": [_stat(p) for p in files]}
    fp = {"demo": d["demo"], "demo_version": DEMO_VERSION, "python": sys.version,
          "unidata": unicodedata.unidata_version}
    if d["demo"] in ("python_docs", "python_code"):
        root = _stdlib_dir()
        fp["stdlib"] = [(os.path.relpath(p, root), os.path.getsize(p))
                        for p in _stdlib_files()]
    return fp


def _stat(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _describe(d: dict) -> str:
    if d["kind"] in ("text_glob", "jsonl"):
        return f"pattern {d['pattern']}"
    if d["kind"] == "tfds":
        return f"tfds {d['tfds_name']!r} split {d['split']!r}"
    return f"demo {d['demo']!r}"


def _read_text(path: str, d: dict) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8", errors=d["encoding_errors"])
    except UnicodeDecodeError as e:
        raise DomainError(f"Domain {d['name']!r}: {path} is not valid UTF-8 ({e}); fix the "
                          f"file or set \"encoding_errors\": \"replace\".") from None


def _iter_text_glob(d: dict) -> Iterator[str]:
    for path in list_files(d):
        yield _read_text(path, d)


def _iter_jsonl(d: dict) -> Iterator[str]:
    field = d["field"]
    for path in list_files(d):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors=d["encoding_errors"]) as f:
            try:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DomainError(f"Domain {d['name']!r}: {path}:{lineno} is not "
                                          f"valid JSON ({e}).") from None
                    if not isinstance(record, dict) or field not in record:
                        keys = sorted(record) if isinstance(record, dict) else type(record)
                        raise DomainError(
                            f"Domain {d['name']!r}: {path}:{lineno} has no field "
                            f"{field!r} (keys: {keys}); set the domain's \"field\" to the "
                            f"key holding the text.")
                    text = record[field]
                    if not isinstance(text, str):
                        raise DomainError(f"Domain {d['name']!r}: {path}:{lineno} field "
                                          f"{field!r} is a {type(text).__name__}, not text.")
                    yield text
            except UnicodeDecodeError as e:
                raise DomainError(f"Domain {d['name']!r}: {path} is not valid UTF-8 ({e}); "
                                  f"fix the file or set \"encoding_errors\": "
                                  f"\"replace\".") from None


# ---------------------------------------------------------------------------------------
# TFDS


def _tfds_builder(d: dict):
    """The prepared, array_record-backed builder of a tfds domain, or a clear error."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    where = f"data_dir={d['data_dir']!r}" if d["data_dir"] else "the default TFDS data_dir"
    try:
        builder = tfds.builder(d["tfds_name"], data_dir=d["data_dir"])
    except tfds.core.registered.DatasetNotFoundError:
        raise DomainError(f"Domain {d['name']!r}: TFDS dataset {d['tfds_name']!r} not "
                          f"found (no registered builder and no prepared data in "
                          f"{where}); check the name and data_dir.") from None
    if not builder.is_prepared():
        if not d["download"]:
            raise DomainError(
                f"Domain {d['name']!r}: TFDS dataset {d['tfds_name']!r} is not prepared in "
                f"{where}. Prepare it in array_record format (e.g. `tfds build "
                f"{d['tfds_name']} --file_format=array_record`) or set \"download\": True.")
        builder.download_and_prepare(file_format="array_record")
    fmt = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if fmt not in ("array_record", "parquet"):
        raise DomainError(
            f"Domain {d['name']!r}: TFDS dataset {d['tfds_name']!r} in {where} is stored as "
            f"{fmt}, which needs TensorFlow to read. Install the optional extra "
            f"(`pip install cpt_jax[tensorflow]`) and re-prepare it with "
            f"file_format=\"array_record\", or point data_dir at an array_record copy.")
    return builder


def _iter_tfds(d: dict, batch: int = 256) -> Iterator[str]:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    builder = _tfds_builder(d)
    if d["split"] not in builder.info.splits:
        raise DomainError(f"Domain {d['name']!r}: TFDS dataset {d['tfds_name']!r} has no "
                          f"split {d['split']!r}; use one of {sorted(builder.info.splits)}.")
    source = tfds.data_source(d["tfds_name"], split=d["split"], data_dir=d["data_dir"],
                              download=False)
    path = d["feature"].split("/")
    for start in range(0, len(source), batch):
        for i, example in enumerate(source.__getitems__(
                range(start, min(start + batch, len(source))))):
            value = example
            for key in path:
                if not isinstance(value, Mapping) or key not in value:
                    keys = sorted(value) if isinstance(value, Mapping) else type(value)
                    raise DomainError(f"Domain {d['name']!r}: example {start + i} of "
                                      f"{d['tfds_name']!r} has no feature {d['feature']!r} "
                                      f"(features: {keys}); set \"feature\".")
                value = value[key]
            if isinstance(value, bytes):
                value = value.decode("utf-8", errors="replace")
            elif hasattr(value, "item"):  # numpy scalar
                value = value.item()
                value = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            if not isinstance(value, str):
                raise DomainError(f"Domain {d['name']!r}: feature {d['feature']!r} of "
                                  f"{d['tfds_name']!r} is not text ({type(value).__name__}).")
            yield value


# ---------------------------------------------------------------------------------------
# Demo sources (offline, from the CPython installation)


def _iter_demo(d: dict) -> Iterator[str]:
    return {"python_docs": _demo_python_docs, "python_code": _demo_python_code,
            "unicode_table": _demo_unicode_table}[d["demo"]]()


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
