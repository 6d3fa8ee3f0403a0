"""Writing a file so that a reader sees the old content or the new, never half of either."""
from __future__ import annotations

import errno
import os
from pathlib import Path


def atomic_write(path: str | os.PathLike, payload: bytes, durable: bool = False) -> None:
    """Write beside ``path``, then rename over it; on failure the temporary file is removed.

    ``durable``: fsync the file and its folder, so the rename survives a power cut (checkpoints)."""
    path = Path(path)
    if not path.name or path.is_dir():  # "", ".", "..", a folder: an OSError the callers report
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
