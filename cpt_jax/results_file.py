"""The one owner of a run's ``results.json``: its name, its schema version, how it is
written and how it is read. Every field is described in ``docs/results.md``.

- ``path(run_dir)``: ``RUN_DIR/results.json``.
- ``write(run_dir, results)``: the file, written atomically (``cpt_jax.atomic``), with
  ``schema_version`` set to ``SCHEMA_VERSION`` unless the dict already carries one.
- ``read(run_dir_or_file)``: the parsed dict, or one ``ResultsError`` line that names the
  file and the fix: no such run directory or file (``ResultsMissing``, also a
  ``FileNotFoundError``), not valid JSON (a damaged or truncated file), not a JSON object,
  a ``schema_version`` that is not a positive integer or is newer than this code reads,
  or (with ``require``) a missing top-level key.
- ``read_config(run_dir_or_file)``: only the run's ``config``.

Versions: ``schema_version`` is an integer raised whenever a field changes meaning or is
removed (a new field alone does not raise it, readers ignore keys they do not know). The
key arrived with version 1 and nothing else changed then, so a file without it (written
before the key existed) is a version-1 file: ``read`` returns it with ``schema_version``
set to 1. A file from a newer version is refused rather than misread.

Only the standard library and ``cpt_jax.atomic`` are imported, so every layer of the
package (training, evaluation, data, scripts) can use this module.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from cpt_jax import atomic

FILE = "results.json"
SCHEMA_VERSION = 1
VERSION_KEY = "schema_version"


class ResultsError(ValueError):
    """A results.json that cannot be read; the message names the file and the fix."""


class ResultsMissing(ResultsError, FileNotFoundError):
    """No results.json (or no run directory) where one was looked for."""


def path(run_dir: str) -> str:
    """``RUN_DIR/results.json``."""
    return os.path.join(run_dir, FILE)


def _file_of(run_dir_or_file: str) -> str:
    """The results file meant by a run directory or a path to a ``.json`` file."""
    p = os.fspath(run_dir_or_file)
    if os.path.isdir(p) or not p.endswith(".json"):
        return path(p)
    return p


def write(run_dir: str, results: dict) -> str:
    """Writes ``RUN_DIR/results.json`` atomically (a reader sees the old file or the new
    one, never half of one); returns its path. ``results`` is not modified: the file gets
    ``schema_version`` first when the dict has none."""
    if not isinstance(results, dict):
        raise TypeError(f"results must be a dict, got {type(results).__name__}")
    out = results if VERSION_KEY in results else {VERSION_KEY: SCHEMA_VERSION, **results}
    file = path(run_dir)
    atomic.write_json(file, out)
    return file


def _fix(file: str) -> str:
    run_dir = os.path.dirname(file) or "."
    return (f"move it away and run `scripts/train.py --workdir {run_dir}` again with the "
            "run's config to write it anew, or restore the file from a copy")


def read(run_dir_or_file: str, require: Sequence[str] = ()) -> dict:
    """The results dict of a run directory (or of a results file named directly).

    ``require``: top-level keys the caller needs (e.g. ``("loss_matrix", "tasks")``); a
    file lacking one is refused. Raises ``ResultsMissing`` (a ``ResultsError`` and a
    ``FileNotFoundError``) when there is no file, ``ResultsError`` (a ``ValueError``)
    when the file cannot be used; both messages are one line naming the file and the fix.
    """
    given = os.fspath(run_dir_or_file)
    file = _file_of(given)
    run_dir = os.path.dirname(file) or "."
    if file != given and not os.path.isdir(given):
        what = "is not a directory" if os.path.exists(given) else "does not exist"
        raise ResultsMissing(f"run directory {given} {what}; pass the --workdir of a "
                             "finished scripts/train.py run")
    if not os.path.isfile(file):
        raise ResultsMissing(
            f"{file} not found: it is written when `scripts/train.py --workdir {run_dir}` "
            f"finishes (a run still in progress or one that crashed has no {FILE}); pass "
            "the --workdir of a finished run")
    try:
        with open(file, encoding="utf-8") as f:
            results = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{file} is not a valid {FILE}: not valid JSON ({e}), the file "
                           f"is damaged or truncated; {_fix(file)}") from None
    except OSError as e:
        raise ResultsError(f"{file} cannot be read ({e.strerror or e}); check its "
                           "permissions, or pass another run directory") from None
    if not isinstance(results, dict):
        raise ResultsError(f"{file} is not a valid {FILE}: it holds a JSON "
                           f"{type(results).__name__}, not an object; {_fix(file)}")
    version = results.setdefault(VERSION_KEY, 1)  # no key: written before version 1 named
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ResultsError(f"{file} is not a valid {FILE}: {VERSION_KEY} is {version!r}, "
                           f"not a positive integer; {_fix(file)}")
    if version > SCHEMA_VERSION:
        raise ResultsError(
            f"{file} has {VERSION_KEY} {version}, newer than the {SCHEMA_VERSION} this "
            "cpt_jax reads; update cpt_jax (the checkout that wrote the run) to read it")
    missing = [k for k in require if k not in results]
    if missing:
        raise ResultsError(f"{file} lacks {missing}; it is not a complete cpt_jax {FILE} "
                           f"(see docs/results.md); {_fix(file)}")
    return results


def read_config(run_dir_or_file: str) -> dict:
    """The ``config`` a run recorded in its results.json ({} when it recorded none);
    errors as ``read``."""
    config = read(run_dir_or_file).get("config")
    if config is None:
        return {}
    if not isinstance(config, dict):
        file = _file_of(run_dir_or_file)
        raise ResultsError(f"{file} is not a valid {FILE}: its config is a JSON "
                           f"{type(config).__name__}, not an object; {_fix(file)}")
    return config
