"""What a run needs to stop and start again safely: a writable workdir, a config and data
that match the checkpoint it resumes from (``check_resume``, before any data is
prepared), damaged checkpoints set aside, and a clean stop on preemption (SIGTERM,
Ctrl-C)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sys
import tempfile
import threading

import jax

from cpt_jax import pretrained, results_file
from cpt_jax.data import sources
from cpt_jax.data import tokenizer as tokenizer_lib
from cpt_jax.errors import (CheckpointError, ConfigMismatch, Preempted, TrainingDiverged,
                            WorkdirError)
from cpt_jax.train import checkpoint as checkpoint_lib

__all__ = ["ConfigMismatch", "Preempted", "TrainingDiverged", "WorkdirError"]

CHECKPOINT_DIR = "checkpoints"  # WORKDIR/checkpoints: the run's own checkpoints

# Keys that may change between the run that wrote a checkpoint and the one resuming it:
# where and how the run is placed and logged, not what it computes. (A new mesh or
# microbatch split changes float reduction order, so results then match to rounding, not
# bit for bit.)
RESUME_FREE_KEYS = ("mesh", "sharding_rules", "distributed", "microbatches", "log_every",
                    "checkpoint", "logging", "data.cache_dir", "data.workers",
                    "save_final_params", "init", "model.remat")


def check_workdir(workdir: str) -> str:
    """Create `workdir` if needed and prove it is writable; returns its absolute path."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise WorkdirError(f"workdir {workdir} is not a writable directory ({e.strerror}: "
                           f"{e.filename}); nothing was written: free space or pass --workdir "
                           "a directory you can write to") from e
    return workdir


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(stored: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts, minus RESUME_FREE_KEYS."""
    a, b = _flatten(stored), _flatten(current)

    def free(key):
        return any(key == f or key.startswith(f + ".") for f in RESUME_FREE_KEYS)

    def same(k):  # a key added since (absent from one side) with an empty value is no change
        if k not in a or k not in b:
            return (a.get(k, b.get(k)) in ([], {}, None, ""))
        return a[k] == b[k]

    return sorted(k for k in set(a) | set(b) if not free(k) and not same(k))


def check_resume_config(stored: dict, current: dict, where: str, allow: bool) -> list[str]:
    """Refuse (ConfigMismatch) to resume a checkpoint made by another config, unless
    `allow`; returns the differing keys."""
    diff = config_diff(stored, current)
    if diff and not allow:
        shown = ", ".join(f"{k}: {_flatten(stored).get(k)!r} -> {_flatten(current).get(k)!r}"
                          for k in diff[:6])
        raise ConfigMismatch(
            f"{where} was written by a different config ({shown}"
            f"{', ...' if len(diff) > 6 else ''}). Use a new --workdir for a new run, or pass "
            "--allow_config_change to go on with the new config anyway (resuming, or "
            "overwriting its results).")
    return diff


class PreemptionWatch:
    """Tells the loop when to save and stop because the job is being preempted.

    One process: a SIGTERM handler (TPU VMs and Slurm send SIGTERM before a kill) sets a
    flag that the loop reads at the next step boundary. Several processes: JAX's
    preemption sync manager (started by ``jax.distributed.initialize``) picks the step at
    which every host stops, so all of them save the same one.
    """

    def __init__(self):
        self.multihost = jax.process_count() > 1
        self.requested = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            if not self.multihost:
                self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self.requested = True

    def _on_sigint(self, signum, frame):
        """Ctrl-C saves like SIGTERM; a second Ctrl-C aborts at once."""
        del frame
        if self.requested or self.multihost:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        print("interrupted: saving a checkpoint at the next step, then stopping (Ctrl-C "
              "again aborts without saving)", file=sys.stderr, flush=True)

    def reached(self, step: int) -> bool:
        if self.multihost:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def data_fingerprints(config, workdir: str | None = None) -> dict:
    """What a run's data is, computed before anything is prepared: per domain the sha256
    of its source fingerprint (its files' sizes and content hashes, a TFDS build, or the
    demo's Python version; so a touched or copied corpus with the same bytes is the same
    data), and the content hash of the tokenizer when the run is given one
    (``tokenizer.path`` or the pretrained checkpoint's; a tokenizer the run trains itself
    follows from the domains and the config). File hashes are remembered in the data
    cache (``data.cache_dir``, else ``WORKDIR/data``) by (path, size, mtime): a re-check
    reads nothing."""
    data_dir = config.data.cache_dir or (os.path.join(workdir, "data") if workdir else None)
    if data_dir and os.path.isdir(os.path.expanduser(data_dir)):
        sources.use_hash_cache(data_dir)
    out = {}
    for d in config.data.domains:
        fp = sources.source_fingerprint(d)
        out[f"domain {d['name']}"] = hashlib.sha256(
            json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()
        _LEGACY[f"domain {d['name']}"] = _legacy_fingerprint(d)
    path = pretrained.tokenizer_path(config)
    if path is not None:
        out["tokenizer"] = tokenizer_lib.load_tokenizer(path).sha256
    return out


# What checkpoints written before content fingerprints recorded for the same domains
# (paths, sizes and mtimes): accepted while those files are unchanged.
_LEGACY: dict = {}


def _legacy_fingerprint(domain) -> str | None:
    d = sources.normalize_domain(domain)
    if d["kind"] in ("demo", "tfds"):
        return None
    try:
        fp = {"files": [sources.base.stat(p) for p in sources.list_files(d)]}
    except (OSError, ValueError):
        return None
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()


def check_same_data(stored: dict | None, current: dict, where: str, allow: bool) -> None:
    """Refuse (ConfigMismatch) to resume onto other data than the checkpoint was trained
    on, naming what changed, unless ``allow``. Checkpoints from before fingerprints were
    recorded (``stored`` None) are not checked."""
    if stored is None or allow:
        return
    changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k)
                     and (stored.get(k) is None or stored.get(k) != _LEGACY.get(k)))
    if changed:
        raise ConfigMismatch(
            f"{where} was trained on other data: {', '.join(changed)} changed since (files "
            "added, removed or their bytes modified, or another tokenizer). Use a new --workdir for the "
            "new data, or pass --allow_config_change to go on with it anyway.")


def _damage(damaged) -> str:
    return "; ".join(f"step {s}: {' '.join(str(e).split())[:200]}" for s, e in damaged)


def unreadable(peek, damaged) -> CheckpointError:
    return CheckpointError(f"no checkpoint in {peek.directory} can be read "
                           f"({_damage(damaged)}); delete {peek.directory} to start the run "
                           "over")


def set_aside(peek, damaged) -> None:
    """Move damaged checkpoints out of the way (process 0), saying so."""
    if jax.process_index() == 0:
        for step, e in damaged:
            moved = peek.move_aside(step)
            print(f"warning: checkpoint {peek.directory / str(step)} is damaged "
                  f"({' '.join(str(e).split())[:200]}); moved it to {moved} and resumed from "
                  "the previous one", file=sys.stderr)
    checkpoint_lib.sync_processes("cpt_jax_damaged_set_aside")


def readable_checkpoints(peek) -> tuple[list[int], dict, dict, list]:
    """The workdir's checkpoint steps up to the newest whose JSON items can be read, that
    one's config and progress, and the damaged newer ones (set aside once a checkpoint
    is restored)."""
    step, items, damaged = checkpoint_lib.newest_readable(
        peek.step_dirs(), lambda s: (peek.read_json(s, "config"), peek.read_json(s, "progress")))
    if step is None and damaged:
        raise unreadable(peek, damaged)
    if step is None:
        return [], {}, {}, []
    return [s for s in peek.step_dirs() if s <= step], items[0], items[1], damaged


def check_position(progress, steps: list, where: str) -> None:
    """A resumed run's position must exist in the (possibly changed) task list."""
    if progress.task > len(steps) or (progress.task < len(steps)
                                       and progress.step > steps[progress.task]):
        raise ConfigMismatch(
            f"{where} is at step {progress.step} of task {progress.task}, beyond the new task "
            f"list ({len(steps)} tasks of {steps} steps); use a new --workdir for this task "
            "list (init.checkpoint can start from that checkpoint)")


@dataclasses.dataclass
class ResumePoint:
    """What a workdir holds to resume from: its readable checkpoint steps (empty for a
    fresh run), a read-only checkpointer over them, the newer damaged ones and the run's
    data fingerprints."""

    steps: list
    peek: object  # checkpoint_lib.RunCheckpointer (read-only) or None
    damaged: list
    fingerprints: dict


def check_resume(config, workdir: str, config_json: dict, allow: bool) -> ResumePoint:
    """Before any data is prepared: a checkpoint in ``workdir`` must have been written by
    this config on this data, and a results.json without checkpoints by this config
    (ConfigMismatch naming what differs, unless ``allow``)."""
    fingerprints = data_fingerprints(config, workdir)
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    steps, peek, damaged = [], None, []
    if os.path.isdir(ckpt_dir):
        peek = checkpoint_lib.RunCheckpointer(ckpt_dir, read_only=True)
        steps, stored_config, stored_progress, damaged = readable_checkpoints(peek)
        if steps:
            where = f"workdir {workdir} (checkpoint of step {steps[-1]})"
            check_resume_config(stored_config, config_json, where, allow)
            check_same_data(stored_progress.get("data_fingerprints"), fingerprints, where,
                            allow)
    if not steps and os.path.exists(results_file.path(workdir)):  # results, no checkpoint
        try:
            written_by = results_file.read(workdir).get("config", {})
        except results_file.ResultsError as e:  # names the file and the fix
            raise ConfigMismatch(str(e)) from None
        check_resume_config(written_by, config_json, f"workdir {workdir} (its results.json)",
                            allow)
    return ResumePoint(steps, peek, damaged, fingerprints)
