"""Writing a file so that a reader sees the old content or the new, never half of either."""
from __future__ import annotations

import errno
import glob
import os
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


def atomic_write(path: str | os.PathLike, payload: bytes, durable: bool = False, follow: bool = True) -> None:
    """Write ``payload`` to ``path`` through ``atomic_writer``."""
    with atomic_writer(path, durable, follow) as f:
        f.write(payload)


@contextmanager
def atomic_writer(path: str | os.PathLike, durable: bool = False, follow: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write in pieces, written beside ``path`` and renamed over it when the
    block ends; on failure the temporary file is removed and ``path`` is left as it was.
    A ``path`` that is a device or a FIFO is written to directly; a symlink's target is replaced:
    what a user's ``--out /dev/stdout`` or link means. ``follow=False`` (files kanfarm names
    itself in a shared folder: checkpoints) replaces whatever is at ``path``, the link itself or
    a FIFO: a link planted there must not make a worker overwrite the file it points to.

    ``durable``: fsync the file and its folder, so the rename survives a power cut (checkpoints)."""
    path = Path(path)
    is_dir = path.is_dir() and (follow or not path.is_symlink())
    if not path.name or is_dir:  # "", ".", "..", a folder: an OSError the callers report
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    try:
        mode = os.stat(path).st_mode if follow else None  # through symlinks
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        # a device, a FIFO, a terminal (/dev/null, /dev/stdout): written through, as a shell's
        # ``>`` would; a rename would put a regular file in its place
        with open(path, "wb") as f:
            yield f
        return
    if follow and path.is_symlink():  # the file it points to is replaced; the link stays
        path = Path(os.path.realpath(path))
    remove_leftovers(path.parent, f".{glob.escape(path.name)}.*.tmp")  # of earlier writes of it a kill cut short
    # a fresh name (O_EXCL): a guessable one could be a planted symlink to another file
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _mode_for(path))
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            # a write or fsync names no file: say which (a full disk is then the right folder's)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


#: a temporary file this old (seconds since its last write) was left by a killed writer: a live
#: one is written to every few seconds at most (a checkpoint, a cache, a download's chunks)
LEFTOVER_AGE_S = 3600.0


def remove_leftovers(folder: Path, pattern: str, matches: Callable[[str], object] | None = None,
                     age_s: float = LEFTOVER_AGE_S) -> None:
    """Remove the files of ``folder`` named by the glob ``pattern`` (and ``matches``, when given)
    that nobody has written to for ``age_s``: temporary files of writes a kill cut short."""
    now = time.time()
    for leftover in folder.glob(pattern):
        try:
            if (matches is None or matches(leftover.name)) and now - leftover.stat().st_mtime > age_s:
                leftover.unlink()
        except FileNotFoundError:  # another process's, finished or removed meanwhile
            pass


def _mode_for(path: Path) -> int:
    """The permissions the file ends with: those of the regular file it replaces (without setuid,
    setgid or sticky bits), else what a plain ``open`` would give it (0666 less the umask;
    ``mkstemp`` alone would make it 0600)."""
    try:
        st = path.lstat()
        if stat.S_ISREG(st.st_mode):
            return st.st_mode & 0o777
    except FileNotFoundError:
        pass
    try:
        with open("/proc/self/status") as status:  # the umask, read without changing it
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = 0o022
    return 0o666 & ~umask
