"""Temporary folders of a preparation, named after their writer, removed once it is gone.

A folder being written carries ``@host@pid@xxxxxxxx`` (``writer_tag``) in its name and is
renamed when complete, so a failure or a concurrent writer never leaves a half-written
dataset; ``remove_dead_temps`` clears those of processes on this host that are gone.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import uuid

_HOST = socket.gethostname().replace("@", "_")
_TEMP_RE = re.compile(r"@(?P<host>[^@/]+)@(?P<pid>\d+)@[0-9a-f]{8}$")


def writer_tag() -> str:
    """``@host@pid@xxxxxxxx``: ends the name of a folder this process writes
    (``_TEMP_RE`` reads it back)."""
    return f"@{_HOST}@{os.getpid()}@{uuid.uuid4().hex[:8]}"


def temp_dir(final: str) -> str:
    """A new empty folder beside ``final``, ``.tmp-<name of final><writer_tag>``."""
    parent, base = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f".tmp-{base}{writer_tag()}")
    os.makedirs(path)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temps(data_dir: str) -> list[str]:
    """Removes temporary folders (``.tmp-*``, and units being written in ``.parts-*``) of
    preparations on this host whose process is gone; returns them. Folders of other hosts
    and of live processes are left alone."""
    removed = []
    try:
        names = os.listdir(data_dir)
    except OSError:
        return removed
    candidates = [os.path.join(data_dir, n) for n in names if n.startswith(".tmp-")]
    for n in names:
        if n.startswith(".parts-"):
            try:
                candidates += [os.path.join(data_dir, n, u)
                               for u in os.listdir(os.path.join(data_dir, n)) if ".tmp" in u]
            except OSError:
                pass
    for path in candidates:
        m = _TEMP_RE.search(path)
        if m and m["host"] == _HOST and not _alive(int(m["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed

