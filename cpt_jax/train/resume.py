"""What a run needs to stop and start again safely: a writable workdir, a config that
matches the checkpoint it resumes from, and a clean stop on preemption (SIGTERM)."""

from __future__ import annotations

import os
import signal
import tempfile
import threading

import jax

# Keys that may change between the run that wrote a checkpoint and the one resuming it:
# where and how the run is placed and logged, not what it computes. (A new mesh or
# microbatch split changes float reduction order, so results then match to rounding, not
# bit for bit.)
RESUME_FREE_KEYS = ("mesh", "sharding_rules", "distributed", "microbatches", "log_every",
                    "checkpoint", "data.cache_dir", "save_final_params", "init", "model.remat")


class ConfigMismatch(ValueError):
    """The workdir holds a checkpoint written with a different config."""


class Preempted(Exception):
    """The run got SIGTERM (or a multi-host preemption notice), saved and stopped."""

    def __init__(self, step: int, workdir: str):
        self.step = step
        super().__init__(f"preempted: saved the checkpoint of step {step} in {workdir}/"
                         "checkpoints and stopped; rerun the same command to resume")


def check_workdir(workdir: str) -> str:
    """Create `workdir` if needed and prove it is writable; returns its absolute path."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OSError(e.errno, f"workdir {workdir} is not a writable directory "
                      f"({e.strerror}: {e.filename}); pass --workdir a directory you can "
                      "write to") from e
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

    return sorted(k for k in set(a) | set(b) if not free(k) and a.get(k) != b.get(k))


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
        self._previous = None
        if not self.multihost and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self.requested = True

    def reached(self, step: int) -> bool:
        if self.multihost:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
