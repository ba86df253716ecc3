"""Orbax checkpoints: params-only checkpoints, and full run checkpoints for exact resume.

A **run checkpoint** (``RunCheckpointer``) is a step directory of an orbax CheckpointManager,
``WORKDIR/checkpoints/STEP/`` with four items:

    state/     the whole TrainState: step, params, optimizer state (Adam moments, the
               methods' slow weights, anchors and Fisher, skip counters) and any teacher
    progress/  JSON: position in the task sequence and every result measured so far
    sums/      JSON: two checksums per parameter array, verified when it is restored (a
               mismatch makes the checkpoint damaged: the run falls back to an older one)
    config/    JSON: the run config it was made with
    methods/   each selected method's memory, by method name (``MethodMemory.to_arrays``;
               only for methods that keep one)
    pool/      the newest replay pool and its task (only for policies that store one)

There is no RNG state to store: the sampler and every other random choice are functions of
(config.seed, task, step), so the config plus the step say what comes next.

A **params checkpoint** is a directory::

    DIR/model_config.json   LlamaConfig.to_dict()
    DIR/params_meta.json    sha256 of every array (verified on load), the tokenizer's hash
    DIR/params/             orbax PyTree checkpoint of the parameter tree

It is the format a run starts from (``scripts/convert_hf.py hf-to-orbax`` makes one from a HF
model) and the one it exports. ``load_params`` can restore straight into a sharding pytree,
so a large model never has to fit on one host device.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cpt_jax.errors import CheckpointError, ShapeMismatch
from cpt_jax.model import LlamaConfig, init_params

CONFIG_FILE = "model_config.json"
META_FILE = "params_meta.json"
PARAMS_DIR = "params"


def _flat(tree) -> dict[str, object]:
    """{'a/b/c': leaf} for a nested dict (or any pytree keyed by dict keys)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)] = leaf
    return out


def sync_processes(name: str) -> None:
    """Barrier across the processes of a multi-process run (a no-op with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def save_params(path, config: LlamaConfig, params, *, overwrite: bool = False,
                tokenizer_sha256: str | None = None) -> Path:
    """Write ``params`` (jax or numpy arrays) and ``config`` as a params checkpoint at ``path``.

    Atomic: everything is written to ``PATH.tmp`` beside the target and renamed at the end,
    so an interrupted save leaves no half-written ``path``. An existing non-empty ``path`` is
    an error unless ``overwrite=True``, and ``overwrite`` only ever replaces a params
    checkpoint (never a file, nor a folder without ``model_config.json``). In a
    multi-process run every process must call this with the same arguments (orbax writes
    each process's shards); process 0 does the renames.

    ``META_FILE`` records the sha256 of every array's bytes (verified by ``load_params``;
    written when the arrays are addressable from this process) and ``tokenizer_sha256``,
    the content hash of the tokenizer the model was trained with.
    """
    target = Path(path).absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True to "
                                  "replace it")
        if not (target / CONFIG_FILE).is_file():
            raise FileExistsError(f"{target} exists and is not a params checkpoint (no "
                                  f"{CONFIG_FILE}); overwrite replaces only a checkpoint: "
                                  "give another output path")
    shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    _check_shapes(_flat(shapes), {k: v.shape for k, v in _flat(params).items()},
                  "params", "config")

    tmp = target.parent / f"{target.name}.tmp"
    primary = jax.process_index() == 0
    if primary:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted save
        tmp.mkdir()
    sync_processes("cpt_jax_save_params_start")
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
        if primary:
            (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            meta = {"digests": array_digests(params), "tokenizer_sha256": tokenizer_sha256}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
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
    sync_processes("cpt_jax_save_params_end")
    return target


def array_digests(params) -> dict | None:
    """{tensor name: sha256 of its bytes}, or None when an array is not wholly addressable
    from this process (a multi-host sharded tree)."""
    out = {}
    for name, x in _flat(params).items():
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return None
        out[name] = hashlib.sha256(np.ascontiguousarray(jax.device_get(x)).tobytes()).hexdigest()
    return out


def params_meta(path) -> dict:
    """``META_FILE`` of a params checkpoint ({} for one written before it existed)."""
    f = Path(path) / META_FILE
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint is damaged: "
                              "restore it or save it again") from None


def check_tokenizer(path, tokenizer) -> None:
    """ValueError when ``tokenizer`` is not the one the params checkpoint at ``path``
    records (scores or an export with another tokenizer would be meaningless)."""
    want = params_meta(path).get("tokenizer_sha256")
    if want and tokenizer.sha256 != want:
        raise ValueError(
            f"the tokenizer {tokenizer.path} (sha256 {tokenizer.sha256[:12]}) is not the one "
            f"params checkpoint {path} was trained with (sha256 {want[:12]}); leave "
            "--tokenizer out to use the run's own, or pass that one")


def _verify(path: Path, params) -> None:
    """CheckpointError naming the first array whose bytes differ from the recorded digest."""
    want = params_meta(path).get("digests")
    if not want:
        return
    got = array_digests(params)
    if got is None:
        return
    for name, digest in want.items():
        if got.get(name) != digest:
            raise CheckpointError(
                f"params checkpoint {path}: tensor {name} does not match the digest recorded "
                "when it was saved (bit rot or a damaged copy); copy the checkpoint again "
                "or use another one")


def _check_shapes(expected: dict, found: dict, found_name: str, expected_name: str):
    """ValueError naming the first tensor whose presence or shape differs."""
    def stacked(names):
        return any(n.startswith("layers/") for n in names)

    if expected and found and stacked(expected) != stacked(found):
        raise ShapeMismatch(
            f"{found_name} has {'stacked' if stacked(found) else 'per-layer'} layers but "
            f"{expected_name} implies {'stacked' if stacked(expected) else 'per-layer'} ones: "
            "set scan_layers the same on both sides (stacked 'layers/...' vs 'layers_i/...')")
    for name in expected:
        if name not in found:
            raise ShapeMismatch(f"tensor {name} is missing from the {found_name} "
                             f"({expected_name} implies shape {tuple(expected[name].shape)})")
        if tuple(found[name]) != tuple(expected[name].shape):
            raise ShapeMismatch(
                f"tensor {name}: {found_name} has shape {tuple(found[name])} but "
                f"{expected_name} implies {tuple(expected[name].shape)}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ShapeMismatch(f"{found_name} has tensor(s) {extra[:5]} that {expected_name} does not "
                         "(e.g. scan_layers differs: stacked 'layers' vs per-layer 'layers_i')")


def load_config(path) -> LlamaConfig:
    """The LlamaConfig stored beside a params checkpoint."""
    f = Path(path) / CONFIG_FILE
    if not f.exists():
        raise FileNotFoundError(f"{f} not found; is {path} a params checkpoint from save_params?")
    try:
        return LlamaConfig.from_dict(json.loads(f.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{f} is not a valid model config ({' '.join(str(e).split())}); "
                              "the checkpoint is damaged: copy it again or use another one"
                              ) from None


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
        try:
            meta = ckptr.metadata(params_dir)
        except (ValueError, OSError, RuntimeError) as e:
            raise CheckpointError(
                f"params checkpoint {path} cannot be read ({' '.join(str(e).split())[:200]}); "
                "it is damaged or truncated: copy it again or use another one") from None
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
        try:
            params = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
                item=meta, restore_args=restore_args))
        except (ValueError, OSError, RuntimeError) as e:
            raise CheckpointError(
                f"params checkpoint {path} cannot be read ({' '.join(str(e).split())[:200]}); "
                "it is damaged or truncated: copy it again or use another one") from None
    _verify(path, params)
    return config, params


@jax.jit
def _checksums(tree):
    """Two uint32 checksums per array, computed where the array lives (no host copy):
    the wrapping sum of its words and their sum weighted by position. Any single flipped
    bit changes the first; swapped words change the second."""
    def one(x):
        bits = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
        u = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32).reshape(-1)
        w = (jnp.arange(u.size, dtype=jnp.uint32) % jnp.uint32(65521)) + jnp.uint32(1)
        return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * w, dtype=jnp.uint32)])

    return jax.tree.map(one, tree)


def params_checksums(params) -> dict:
    """{tensor name: [checksum, checksum]} of a parameter tree (``_checksums``)."""
    return {k: [int(a) for a in np.asarray(v)] for k, v in _flat(_checksums(params)).items()}


def newest_readable(steps, read):
    """``read(step)`` for the newest of ``steps`` that can be read -> (step, value,
    [(damaged newer step, error)]); (None, None, damaged) when none can. A checkpoint that
    fails to read (a truncated array file, emptied metadata) is passed over, not deleted."""
    damaged = []
    for step in sorted(steps, reverse=True):
        try:
            return step, read(step), damaged
        except ShapeMismatch:
            raise
        except Exception as e:  # noqa: BLE001 - any other failure to read means damaged
            damaged.append((step, e))
    return None, None, damaged


def _plain(tree):
    """Nested mappings as nested dicts (orbax may return its own mapping types)."""
    if hasattr(tree, "items"):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def _tree_shapes(tree) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in _flat(tree).items()}


class RunCheckpointer:
    """Saves and restores whole-run checkpoints under ``directory`` (see module docstring).

    Saving is asynchronous by default: ``save`` returns once the arrays are copied off the
    device and the write goes on in the background, so training continues meanwhile. A
    step directory only appears once complete (orbax writes a temp directory and renames
    it), so a kill or a full disk mid-save leaves the previous checkpoints as they were.
    Kept: the last ``keep`` checkpoints plus every step listed in ``keep_steps`` (the task
    boundaries). Every process of a multi-host run must make the same calls.
    """

    def __init__(self, directory, *, keep: int = 3, keep_steps=(), async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(
                [policies.LatestN(max(int(keep), 1)), policies.CustomSteps(list(keep_steps))]),
            enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
            save_interval_steps=0 if read_only else 1,
            cleanup_tmp_directories=not read_only)
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"no run checkpoints at {self.directory}")
        handlers = dict(state=ocp.StandardCheckpointHandler(),
                        progress=ocp.JsonCheckpointHandler(),
                        config=ocp.JsonCheckpointHandler(), sums=ocp.JsonCheckpointHandler(),
                        methods=ocp.StandardCheckpointHandler(),
                        pool=ocp.StandardCheckpointHandler())
        self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers,
                                              options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (None when there is none)."""
        return self._manager.latest_step()

    def step_dirs(self) -> list[int]:
        """Steps of every step directory on disk, readable or not (orbax leaves out one
        whose metadata it cannot parse, which must still be set aside, not overwritten)."""
        return sorted(int(d) for d in os.listdir(self.directory)
                      if d.isdigit() and (self.directory / d).is_dir())

    def move_aside(self, step: int) -> Path:
        """Move the damaged checkpoint ``step`` to ``<directory>_damaged/STEP`` (nothing is
        deleted): the run goes on from an older one and can save that step again."""
        target = self.directory.parent / f"{self.directory.name}_damaged" / str(step)
        target.parent.mkdir(exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.rename(self.directory / str(step), target)
        self._manager.reload()
        return target

    def _failed(self, what: str, e: BaseException) -> CheckpointError:
        steps = self._manager.all_steps(read=True)
        prev = f"step {max(steps)}" if steps else "none yet"
        return CheckpointError(
            f"{what} in {self.directory} failed: {e}\nThe last complete checkpoint ({prev}) "
            "is intact and a rerun resumes from it; if the disk is full, free space or point "
            "--workdir elsewhere (checkpoint.keep bounds how many are kept).")

    def save(self, step: int, state, progress: dict, config: dict, *,
             memory: dict | None = None, pool: dict | None = None,
             wait: bool = False) -> None:
        """Checkpoint `state` (a TrainState) and the JSON `progress`/`config` at `step`,
        with the methods' ``memory`` ({method name: {array name: array}}) and the replay
        ``pool``'s arrays where given.

        An error of an earlier asynchronous save is raised here (as CheckpointError)."""
        items = dict(state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress),
                     config=ocp.args.JsonSave(config))
        if hasattr(state, "params"):  # a TrainState (any other tree is saved unchecked)
            items["sums"] = ocp.args.JsonSave(params_checksums(state.params))
        for name, arrays in (("methods", memory), ("pool", pool)):
            if arrays:
                items[name] = ocp.args.StandardSave(arrays)
        try:
            self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
            if wait:
                self._manager.wait_until_finished()
        except Exception as e:
            raise self._failed(f"saving the checkpoint of step {step}", e) from e

    def wait(self) -> None:
        """Block until every pending save is on disk (raises CheckpointError if one failed)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._failed("a background checkpoint save", e) from e

    def close(self) -> None:
        try:
            self._manager.close()
        except Exception as e:
            raise self._failed("a background checkpoint save", e) from e

    def read_json(self, step: int, item: str) -> dict:
        """The JSON item ('progress' or 'config') of checkpoint `step`."""
        return self._manager.restore(
            step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

    def read_arrays(self, step: int, item: str = "state") -> dict:
        """Item 'state', 'methods' or 'pool' of checkpoint `step` as nested dicts of host numpy arrays,
        without a target structure: to inspect a checkpoint outside a run."""
        meta = getattr(self._manager.item_metadata(step)[item], "tree", None)
        out = self._manager.restore(step, args=ocp.args.Composite(**{
            item: ocp.args.StandardRestore(jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta))}))[item]
        return jax.tree.map(np.asarray, out)

    def restore(self, step: int, abstract_state):
        """-> (TrainState, progress, config, {"methods", "pool": arrays, where stored}) of
        checkpoint `step`.

        Each array is read straight into the sharding ``abstract_state`` gives it (from
        ``state.abstract_train_state``), which may differ from the one it was saved with:
        a run can resume on another mesh or device count. A tensor whose shape differs from
        the target's is reported by name before anything is read.
        """
        meta = self._manager.item_metadata(step)
        stored = getattr(meta["state"], "tree", meta["state"])
        _check_shapes(_flat(abstract_state), _tree_shapes(stored),
                      f"checkpoint {self.directory / str(step)}", "the run's config")
        items = dict(state=ocp.args.StandardRestore(abstract_state),
                     progress=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())
        extra = [name for name in ("methods", "pool") if meta.get(name) is not None]
        for name in extra:
            items[name] = ocp.args.StandardRestore()
        if "sums" in meta.keys():  # checkpoints written before checksums have none
            items["sums"] = ocp.args.JsonRestore()
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        if out.get("sums") is not None and hasattr(out["state"], "params"):
            got = params_checksums(out["state"].params)
            bad = [k for k, v in out["sums"].items() if got.get(k) != list(v)]
            if bad:
                raise CheckpointError(f"checkpoint {self.directory / str(step)}: params {bad[0]} "
                                      "differ from the checksums recorded at save (bit rot or "
                                      "a damaged copy)")
        arrays = {name: jax.tree.map(np.asarray, _plain(out[name])) for name in extra}
        return out["state"], out["progress"], out["config"], arrays
