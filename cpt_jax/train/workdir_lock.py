"""One training process per workdir: an exclusive lock on ``WORKDIR/.lock``.

Two ``train.py`` on one workdir would both train and both write the same checkpoints and
results. The lock is a POSIX ``flock`` on ``WORKDIR/.lock`` (released by the kernel when
the holder exits, however it exits), and the file records the holder's pid and host so a
refused run can say who holds it. The holder removes the file before it unlocks, and a
process that locked a file that is no longer at that path tries again. A lock file left by a process that is gone is taken
over with a note; on a shared filesystem a holder on another host is trusted while the
lock is held (flock over NFS is best effort, so the note names the host).

In a multi-process (multi-host) run only process 0 takes it: the processes of one run
share the workdir by design.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys

LOCK_FILE = ".lock"


class WorkdirLocked(ValueError):
    """Another live process holds the workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds the workdir for this process."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.enabled = enabled
        self.fd = None

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _lock(self) -> int:
        """An fd holding the flock of the file now at ``self.path`` (a holder that
        released it may have removed the file we opened: then open the new one)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                h = self._holder()
                raise WorkdirLocked(
                    f"workdir {os.path.dirname(self.path)} is in use by another training "
                    f"process (pid {h.get('pid', '?')} on host {h.get('host', '?')}); wait "
                    "for it to finish or stop it, or use another --workdir") from None
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def acquire(self) -> None:
        if not self.enabled:
            return
        fd = self._lock()
        old = self._holder()
        if old.get("pid") and old.get("host") == socket.gethostname() and not _alive(
                old["pid"]):
            print(f"note: took over the lock of workdir {os.path.dirname(self.path)} left by "
                  f"process {old['pid']}, which is gone", file=sys.stderr)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # removed while still held, so a workdir is left as the run found it
            os.unlink(self.path)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
