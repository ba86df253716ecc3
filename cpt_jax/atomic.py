"""Writing a file so that no reader ever sees half of it: the bytes go to a temp file beside
the target, which is flushed to disk and then renamed over it. An interrupted write leaves
the old file (if any) as it was and no temp file behind."""

from __future__ import annotations

import json
import os
import tempfile


def write_bytes(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".tmp")
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


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str, obj, **dumps_kwargs) -> None:
    write_text(path, json.dumps(obj, **{"indent": 1, **dumps_kwargs}))
