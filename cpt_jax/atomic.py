"""Writing a file so that no reader ever sees half of it: the bytes go to a temp file beside
the target, which is flushed to disk and then renamed over it. An interrupted write leaves
the old file (if any) as it was and no temp file behind.

The temp file is created with mode 0666 (``os.open(..., O_CREAT | O_EXCL)``), so the
kernel applies the process umask (and any default ACL) exactly as for an ordinary
``open(path, "w")``; ``tempfile.mkstemp`` would make every output private (0600)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile


def _create_temp(folder: str, base: str) -> tuple[int, str]:
    """(fd, path) of a new, exclusively created temp file in ``folder``."""
    while True:
        tmp = os.path.join(folder, f".{base}.tmp{secrets.token_hex(6)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # another writer drew the same name; draw again
            continue


def write_bytes(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _create_temp(folder, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_files(folder: str, files: dict) -> list[str]:
    """Writes ``{file name: bytes}`` into ``folder``, each atomically; returns the paths."""
    paths = []
    for name, data in files.items():
        path = os.path.join(folder, name)
        write_bytes(path, data)
        paths.append(path)
    return paths


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str, obj, **dumps_kwargs) -> None:
    write_text(path, json.dumps(obj, **{"indent": 1, **dumps_kwargs}))


def temp_dir(parent: str, base: str) -> str:
    """A new empty folder ``parent/.BASE.tmp-XXXX`` to fill before ``replace_dir``."""
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)


def replace_dir(src: str, dst: str) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing an existing ``dst`` only at
    the end: a reader sees the old folder or the new one, never a mix."""
    if not os.path.exists(dst):
        os.rename(src, dst)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-",
                           dir=os.path.dirname(os.path.abspath(dst)))
    os.rmdir(old)
    os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(old, dst)  # put the previous version back
        raise
    shutil.rmtree(old, ignore_errors=True)
