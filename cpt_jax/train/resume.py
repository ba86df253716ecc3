"""What a run needs to stop and start again safely: a writable workdir, a config and data
that match the checkpoint it resumes from, and a clean stop on preemption (SIGTERM)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import tempfile
import threading

import jax

from cpt_jax import pretrained
from cpt_jax.data import tokenizer as tokenizer_lib

# Keys that may change between the run that wrote a checkpoint and the one resuming it:
# where and how the run is placed and logged, not what it computes. (A new mesh or
# microbatch split changes float reduction order, so results then match to rounding, not
# bit for bit.)
RESUME_FREE_KEYS = ("mesh", "sharding_rules", "distributed", "microbatches", "log_every",
                    "checkpoint", "data.cache_dir", "data.workers", "save_final_params", "init",
                    "model.remat")


class WorkdirError(ValueError):
    """The workdir cannot be created or written (read-only, full, not a directory)."""


class ConfigMismatch(ValueError):
    """The workdir holds a checkpoint written with a different config."""


class TrainingDiverged(FloatingPointError):
    """The run stopped because its last steps were all skipped (non-finite gradients, a
    loss spike or an exploding update)."""


class Preempted(Exception):
    """The run got SIGTERM or Ctrl-C (or a multi-host preemption notice), saved and
    stopped."""

    def __init__(self, step: int, workdir: str):
        self.step = step
        saved = (f"the newest checkpoint is step {step} in {workdir}/checkpoints" if step
                 is not None else "no checkpoint was saved yet")
        super().__init__(f"preempted: stopped, and {saved}; rerun the same command to resume")


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
    from cpt_jax.data import sources

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
    from cpt_jax.data import sources

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
