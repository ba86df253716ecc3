"""How data preparation fails: its errors, and what a failed write says about the disk.

Every error is a ``PrepareError`` (a ``ValueError``) whose message names the domain or
folder and the fix, so the scripts print it as one line: ``CorruptDataError`` for a
prepared folder whose files no longer match its meta.json, ``PreparationStopped`` for
SIGTERM or Ctrl-C (``stop_signals``).
"""

from __future__ import annotations

import errno
import os
import shlex


class PrepareError(ValueError):
    """Preparation cannot proceed; the message names the domain and the fix."""


class CorruptDataError(PrepareError):
    """A prepared folder's files do not match its meta.json; the message names the fix."""


def corrupt(path: str, problem: str) -> CorruptDataError:
    """The CorruptDataError for a damaged ``path``, naming the folder to delete."""
    folder = os.path.dirname(os.path.abspath(path))
    return CorruptDataError(
        f"Prepared data is damaged: {path} {problem}. Delete the folder {folder} "
        f"(rm -r {shlex.quote(folder)}) and prepare again: prepare_domains (or "
        f"scripts/prepare_data.py, or the training run) with the same inputs rebuilds it "
        f"from the source.")


# Write failures that are the disk's state, not a bug: errno -> what to tell the user.
_NO_SPACE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
             errno.EFBIG: "a file reached the size limit (ulimit -f)",
             errno.EROFS: "the file system is read-only"}


def out_of_space(e: BaseException) -> str | None:
    """What a failed write says about the disk (``_NO_SPACE``), or None: an OSError's
    errno, or the strerror text inside the RuntimeError array_record's writer raises."""
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
        return f"{_NO_SPACE[e.errno]} ({os.strerror(e.errno)})"
    if isinstance(e, (OSError, RuntimeError)):
        for code, what in _NO_SPACE.items():
            if os.strerror(code) in str(e):
                return f"{what} ({os.strerror(code)})"
    return None


class PreparationStopped(PrepareError):
    """SIGTERM or Ctrl-C during preparation; nothing half-written was kept."""

