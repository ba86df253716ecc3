"""Orbax checkpoints of model parameters (the params-only part of checkpointing).

A params checkpoint is a directory::

    DIR/model_config.json   LlamaConfig.to_dict()
    DIR/params/             orbax PyTree checkpoint of the parameter tree

It is the format a run starts from (``scripts/convert_hf.py hf-to-orbax`` makes one from a HF
model) and the one it exports. ``load_params`` can restore straight into a sharding pytree,
so a large model never has to fit on one host device.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from cpt_jax.model import LlamaConfig, init_params

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def _flat(tree) -> dict[str, object]:
    """{'a/b/c': leaf} for a nested dict (or any pytree keyed by dict keys)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)] = leaf
    return out


def _sync(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def save_params(path, config: LlamaConfig, params, *, overwrite: bool = False) -> Path:
    """Write ``params`` (jax or numpy arrays) and ``config`` as a params checkpoint at ``path``.

    Atomic: everything is written to ``PATH.tmp`` beside the target and renamed at the end,
    so an interrupted save leaves no half-written ``path``. An existing non-empty ``path`` is
    an error unless ``overwrite=True``. In a multi-process run every process must call this
    with the same arguments (orbax writes each process's shards); process 0 does the renames.
    """
    target = Path(path).absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True to replace it")
    shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    _check_shapes(_flat(shapes), {k: v.shape for k, v in _flat(params).items()},
                  "params", "config")

    tmp = target.parent / f"{target.name}.tmp"
    primary = jax.process_index() == 0
    if primary:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted save
        tmp.mkdir()
    _sync("cpt_jax_save_params_start")
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
        if primary:
            (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            if target.exists():
                old = target.parent / f"{target.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old)
            else:
                os.rename(tmp, target)
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync("cpt_jax_save_params_end")
    return target


def _check_shapes(expected: dict, found: dict, found_name: str, expected_name: str):
    """ValueError naming the first tensor whose presence or shape differs."""
    def stacked(names):
        return any(n.startswith("layers/") for n in names)

    if expected and found and stacked(expected) != stacked(found):
        raise ValueError(
            f"{found_name} has {'stacked' if stacked(found) else 'per-layer'} layers but "
            f"{expected_name} implies {'stacked' if stacked(expected) else 'per-layer'} ones: "
            "set scan_layers the same on both sides (stacked 'layers/...' vs 'layers_i/...')")
    for name in expected:
        if name not in found:
            raise ValueError(f"tensor {name} is missing from the {found_name} "
                             f"({expected_name} implies shape {tuple(expected[name].shape)})")
        if tuple(found[name]) != tuple(expected[name].shape):
            raise ValueError(
                f"tensor {name}: {found_name} has shape {tuple(found[name])} but "
                f"{expected_name} implies {tuple(expected[name].shape)}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ValueError(f"{found_name} has tensor(s) {extra[:5]} that {expected_name} does not "
                         "(e.g. scan_layers differs: stacked 'layers' vs per-layer 'layers_i')")


def load_config(path) -> LlamaConfig:
    """The LlamaConfig stored beside a params checkpoint."""
    f = Path(path) / CONFIG_FILE
    if not f.exists():
        raise FileNotFoundError(f"{f} not found; is {path} a params checkpoint from save_params?")
    return LlamaConfig.from_dict(json.loads(f.read_text()))


def load_params(path, shardings=None, *, expected_config: LlamaConfig | None = None):
    """Restore a params checkpoint -> ``(stored LlamaConfig, params)``.

    Args:
      path: directory written by ``save_params``.
      shardings: optional pytree of ``jax.sharding.Sharding`` with the params' structure;
        each array is then read directly into that sharding (no host copy of the full
        model). Without it, arrays come back as host numpy arrays.
      expected_config: if given, the checkpoint's tensor shapes must be the ones this config
        implies; otherwise a ValueError names the first mismatching tensor. Use it to catch
        restoring the wrong model before any memory is spent.
    """
    path = Path(path).absolute()
    config = load_config(path)
    params_dir = path / PARAMS_DIR
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(params_dir)
        meta = getattr(meta, "item_metadata", meta)
        meta = getattr(meta, "tree", meta)
        stored = _flat(meta)  # {name: ArrayMetadata}
        if expected_config is not None:
            shapes = jax.eval_shape(functools.partial(init_params, expected_config),
                                    jax.random.key(0))
            _check_shapes(_flat(shapes), {k: v.shape for k, v in stored.items()},
                          f"checkpoint {path}", "expected_config")
        if shardings is None:
            restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        else:
            flat_sh = _flat(shardings)
            if set(flat_sh) != set(stored):
                missing = sorted(set(stored) - set(flat_sh))
                extra = sorted(set(flat_sh) - set(stored))
                raise ValueError(f"shardings do not match the checkpoint's tree: no sharding "
                                 f"for {missing[:5]}; unknown tensors {extra[:5]}")
            restore_args = jax.tree.map(
                lambda m, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=tuple(m.shape),
                                                  dtype=m.dtype),
                meta, shardings)
        params = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
            item=meta, restore_args=restore_args))
    return config, params
