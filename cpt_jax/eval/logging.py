"""Training scalars to ``metrics.jsonl`` and to TensorBoard event files, without TensorFlow.

``MetricsLogger(workdir)`` appends one JSON object per ``log(step, scalars)`` call to
``workdir/metrics.jsonl`` (flushed every call, so a preempted run keeps what it logged) and
writes the numeric scalars as TensorBoard summaries with ``tensorboardX`` (a pure-Python
event-file writer that needs only numpy and protobuf). ``tensorboard --logdir runs/`` then
shows every run under its directory name.

Resuming: ``resume_step=s`` keeps the jsonl lines with step < s, appends after them, and
asks TensorBoard to discard events at steps >= s from the previous attempt (tensorboardX's
``purge_step``), so a run restarted from a checkpoint at step s does not show its steps
twice. Only the process that should write (process 0) logs; pass ``active=False`` elsewhere.
"""

from __future__ import annotations

import json
import numbers
import os
from typing import Any, Mapping

import numpy as np

from cpt_jax import atomic

JSONL_FILE = "metrics.jsonl"


def scalars(values: Mapping[str, Any]) -> dict:
    """Python values for JSON: numbers -> float/int, arrays -> key/i entries, rest as is."""
    out = {}
    for key, v in values.items():
        if hasattr(v, "shape") and hasattr(v, "dtype"):  # numpy / jax arrays and scalars
            a = np.asarray(v)
            if a.ndim:
                out.update({f"{key}/{i}": x.item() for i, x in enumerate(a.reshape(-1))})
            else:
                out[key] = a.item()
        else:
            out[key] = v
    return out


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real)


class MetricsLogger:
    """Appends scalars to ``workdir/metrics.jsonl`` and TensorBoard event files in ``workdir``.

    Args:
      workdir: the run directory (created if missing).
      tensorboard: also write TensorBoard events (needs ``tensorboardX``).
      resume_step: None for a fresh run (an existing metrics.jsonl is replaced); else the
        step the run resumes from: earlier lines are kept, later ones dropped.
      active: False makes every call a no-op (non-zero processes of a multi-host run).
      flush_secs: how often TensorBoard events are flushed to disk.
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True,
                 resume_step: int | None = None, active: bool = True, flush_secs: int = 10):
        self.active = active
        self.path = os.path.join(workdir, JSONL_FILE)
        self._file = None
        self._tb = None
        if not active:
            return
        os.makedirs(workdir, exist_ok=True)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ImportError(
                    "MetricsLogger(tensorboard=True) needs tensorboardX: pip install "
                    "tensorboardX (or pass tensorboard=False to write metrics.jsonl only)"
                ) from None
            self._tb = SummaryWriter(workdir, purge_step=resume_step, flush_secs=flush_secs)
        if resume_step is None:
            self._file = open(self.path, "w")
        else:
            self._truncate_after(resume_step)
            self._file = open(self.path, "a")

    def _truncate_after(self, step: int) -> None:
        """Keep the complete lines logged before ``step`` (written atomically)."""
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] < step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    pass  # a line cut short by the interruption
        atomic.write_text(self.path, "".join(kept))

    def log(self, step: int, named: Mapping[str, Any]) -> None:
        """Record the ``named`` scalars at ``step``: all of them in the jsonl line, numbers
        (not bools or strings) in TensorBoard under their key as tag. A ``"step"`` key in
        ``named`` is ignored (the ``step`` argument is the one recorded)."""
        if not self.active:
            return
        if self._file is None:
            raise ValueError(f"MetricsLogger for {self.path} is closed")
        values = scalars({k: v for k, v in named.items() if k != "step"})
        self._file.write(json.dumps({"step": int(step), **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for tag, v in values.items():
                if _is_number(v) and not isinstance(v, bool):
                    self._tb.add_scalar(tag, float(v), int(step))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close both outputs; later ``log`` calls are an error."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_jsonl(path: str) -> list[dict]:
    """The records of a metrics.jsonl (NaN/inf survive: Python's json reads them)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


