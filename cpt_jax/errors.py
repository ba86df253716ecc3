"""The exception types the entry scripts tell apart (``cpt_jax.cli``), on the ground floor
so that any module can raise them without importing the layer that catches them.

Every input error of the package is a ValueError (a config value, a data file, a
tokenizer: ``UserError``, ``ConfigMismatch``, ``WorkdirError``, ``ShapeMismatch`` and the
folders' own, e.g. ``TokenizerError``, ``DomainError``, ``PrepareError``) and is printed
as one line with exit status 2, as is a ``CheckpointError``; a ``TrainingDiverged`` run
exits 1; ``Preempted`` is a clean stop that saved."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user; the message names the input and the fix."""


class CheckpointError(RuntimeError):
    """A run or params checkpoint could not be written or read."""


class ShapeMismatch(ValueError):
    """A checkpoint's tensors do not have the shapes the config implies (not damage)."""


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


# What the entry scripts print as one line (exit 2), besides TrainingDiverged (exit 1).
USER_ERRORS = (ValueError, CheckpointError, FileNotFoundError, FileExistsError,
               NotADirectoryError, IsADirectoryError, PermissionError)
