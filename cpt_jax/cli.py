"""What the entry scripts share: a run config from a file plus ``--config.KEY=VALUE``
overrides, and user errors reported as one line with exit status 2.

A config is ``configs/X.py`` (its ``get_config()``) or ``configs/X.py:ARG`` (its
``get_config("ARG")``). An override names an existing key with dots; its value is read as
the key's type: numbers, booleans (true/false), strings as given, ``none`` for an optional
key, and lists or dicts as JSON, e.g. ``--config.tasks='[{"domain": "en", "steps": 10}]'``.
A key that does not exist is an error that suggests the nearest existing one.

Errors that come from the user's input (a config value, a data file, a checkpoint, a
tokenizer) print ``error: <what and how to fix it>`` on one line and exit with status 2;
a run that diverged exits with status 1. ``--debug`` (or ``CPT_JAX_DEBUG=1``) shows the
traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import json
import os
import sys

import ml_collections
from ml_collections.config_dict import FieldReference

from cpt_jax import hostmem, pretrained
from cpt_jax.errors import USER_ERRORS, TrainingDiverged, UserError

__all__ = ["USER_ERRORS", "UserError"]  # the scripts raise and catch these through cli

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 1
EXIT_INTERRUPTED = 130  # the shell's status for a process stopped by Ctrl-C


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``path.py`` or ``path.py:ARG`` -> the file's ``get_config()`` / ``get_config(ARG)``."""
    path, _, arg = spec.partition(":") if not os.path.isfile(spec) else (spec, "", "")
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise UserError(f"--config {spec}: no such file {path!r}; give a config file such as "
                        "configs/demo.py (optionally configs/demo.py:ARG)")
    module_spec = importlib.util.spec_from_file_location(
        f"cpt_jax_config_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise UserError(f"--config {path}: Python syntax error on line {e.lineno}: {e.msg}; "
                        "fix the config file") from None
    if not hasattr(module, "get_config"):
        raise UserError(f"--config {path}: the file defines no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"--config {spec}: get_config() returned {type(config).__name__}, "
                        "not an ml_collections.ConfigDict")
    return config


def _keys(config, prefix: str = "") -> list[str]:
    out = []
    for k, v in config.items():
        out.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            out.extend(_keys(v, f"{prefix}{k}."))
    return out


def _parse_value(key: str, text: str, current, field_type):
    """``text`` read as the type of the key's current value (or its declared type)."""
    typ = field_type or (type(current) if current is not None else None)
    if text.lower() in ("none", "null") and (current is None or field_type is not None):
        return None
    if typ is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise UserError(f"--config.{key}={text}: expected true or false")
    if typ in (int, float):
        try:
            value = float(text) if typ is float else int(text)
        except ValueError:
            kind = "a number" if typ is float else "an integer"
            raise UserError(f"--config.{key}={text}: expected {kind}") from None
        return value
    if typ is str or typ is None:
        return text
    try:  # lists, tuples, dicts: JSON, or a Python literal
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise UserError(f"--config.{key}: {text!r} is not valid JSON; write a "
                            f"{typ.__name__} as JSON, e.g. --config.{key}='[...]' with double-"
                            "quoted strings") from None
    if typ in (list, tuple) and isinstance(value, (list, tuple)):
        return typ(value)
    if typ is ml_collections.ConfigDict and isinstance(value, dict):
        return ml_collections.ConfigDict(value)
    if issubclass(typ, dict) and isinstance(value, dict):
        return value
    raise UserError(f"--config.{key}={text}: expected a {typ.__name__}, got "
                    f"{type(value).__name__}")


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Set the existing dotted ``key`` of ``config`` from its command-line text."""
    parts = key.split(".")
    node = config
    for i, name in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            near = difflib.get_close_matches(key, _keys(config), n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise UserError(f"unknown config key {key}{hint}")
        if i < len(parts) - 1:
            node = node[name]
    name = parts[-1]
    ref = node._fields.get(name)  # pylint: disable=protected-access
    field_type = ref.get_type() if isinstance(ref, FieldReference) else None
    current = node[name]
    if isinstance(current, ml_collections.ConfigDict):
        field_type = ml_collections.ConfigDict
    value = _parse_value(key, text, current, field_type)
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    try:
        node[name] = value
    except TypeError as e:
        raise UserError(f"--config.{key}={text}: {e}") from None


def split_overrides(argv: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Pull ``--config.KEY=VALUE`` (or ``--config.KEY VALUE``) out of ``argv`` ->
    ([(KEY, VALUE)], the other arguments)."""
    overrides, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"{arg} has no value; write {arg}=VALUE")
                value, i = argv[i + 1], i + 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def load_config(spec: str, overrides: list[tuple[str, str]]) -> ml_collections.ConfigDict:
    """The config file ``spec`` with ``overrides`` applied and its model resolved (unset
    keys from the pretrained checkpoint or the defaults), locked (no new keys)."""
    config = load_config_file(spec)
    for key, text in overrides:
        apply_override(config, key, text)
    if "model" in config and "init" in config:
        pretrained.resolve_model(config)
    config.lock()
    return config


def config_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """An argument parser for a script that takes a run config: ``--config`` and
    ``--debug``, with the script's docstring as its help (``--config.KEY=VALUE`` overrides
    are taken out of argv by ``split_overrides`` before parsing)."""
    ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0],
                                 epilog=doc.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True,
                    help="run config file, configs/X.py or configs/X.py:ARG")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    return ap


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("CPT_JAX_DEBUG", "") not in ("", "0")


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def run_main(main, argv: list[str] | None = None) -> int:
    """Call ``main(argv)`` and turn user errors into one line on stderr and an exit status
    (the traceback only with ``--debug`` or ``CPT_JAX_DEBUG=1``). The process first keeps
    the host memory XLA frees (``cpt_jax.hostmem``)."""
    hostmem.keep_freed_memory()
    argv = sys.argv[1:] if argv is None else argv
    debug = debug_requested(argv)
    try:
        return int(main([a for a in argv if a != "--debug"]) or 0)
    except (TrainingDiverged, *USER_ERRORS) as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_DIVERGED if isinstance(e, TrainingDiverged) else EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted: stopped without saving", file=sys.stderr)
        return EXIT_INTERRUPTED
