"""Fetch missing raw files into a dataset folder: atomically, checksum-verified, or fail clearly.

A download goes to a temporary file in the destination folder, is verified, fsynced and only then
renamed into place, so a crash or a concurrent worker never leaves a half file under the real name.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import http.client
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable, Iterable

from kanfarm.atomic import remove_leftovers
from kanfarm.data.errors import DatasetUnavailable
from kanfarm.data.sources import RemoteFile

TIMEOUT_S = 30  # per connect / socket read, not for the whole transfer
CHUNK = 1 << 20

#: replaceable in tests; called as ``opener(url, timeout=...)`` and used as a context manager.
opener: Callable = urllib.request.urlopen
#: told (file name, bytes so far, bytes announced or None) as a download goes, chunk by chunk:
#: the CLI draws a progress bar with it (HIGGS is 2.6 GB); None, nothing is told
on_progress: Callable[[str, int, int | None], None] | None = None


def missing_files(folder: Path, files: Iterable[RemoteFile]) -> list[RemoteFile]:
    return [f for f in files if not (folder / f.filename).is_file()]


def ensure_files(dataset: str, folder: Path, files: tuple[RemoteFile, ...], allow_download: bool) -> None:
    """Make sure every file is in ``folder``; download what is missing or raise DatasetUnavailable."""
    missing = missing_files(folder, files)
    if not missing:
        return
    if not allow_download:
        raise DatasetUnavailable(_message(dataset, folder, missing,
                                          "downloads are disabled (KANFARM_OFFLINE=1 or download=False)"))
    for remote in missing:
        try:
            fetch(remote, folder)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            # URLError and socket timeouts are OSErrors; a cut chunked response is an IncompleteRead
            raise DatasetUnavailable(_message(dataset, folder, missing_files(folder, files),
                                              f"downloading {remote.url} failed: {exc}")) from exc


def fetch(remote: RemoteFile, folder: Path) -> Path:
    """Download one file to ``folder/remote.filename``; raises ValueError on a checksum mismatch or
    when fewer bytes arrive than the response's Content-Length announced (a read that returns
    nothing is all a closed connection shows)."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / remote.filename
    remove_leftovers(folder, f".{glob.escape(remote.filename)}.*.part")  # of downloads a kill cut short
    fd, tmp = tempfile.mkstemp(prefix=f".{remote.filename}.", suffix=".part", dir=folder)
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, opener(remote.url, timeout=TIMEOUT_S) as response:
            announced = response.headers.get("Content-Length")
            total = int(announced) if announced is not None and announced.isdigit() else None
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                if on_progress is not None:
                    on_progress(remote.filename, size, total)
            out.flush()
            os.fsync(out.fileno())
        if total is not None and size < total:
            raise ValueError(f"{remote.url} sent {size} of its {announced} bytes (connection closed early)")
        if size == 0:
            raise ValueError(f"{remote.url} returned an empty file")
        if remote.sha256 is not None and digest.hexdigest() != remote.sha256:
            raise ValueError(f"checksum mismatch for {remote.filename}: expected sha256 {remote.sha256},"
                             f" got {digest.hexdigest()}")
        os.replace(tmp, dest)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL and exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(dest)) from exc  # a write names no file: say which
        raise
    return dest


#: a write's errors that are the disk's (full, over quota, read-only), not the download's
_DISK_FULL = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EROFS))


def _message(dataset: str, folder: Path, missing: list[RemoteFile], reason: str) -> str:
    lines = [f"dataset {dataset!r} is unavailable: {reason}.",
             f"Missing in {folder}:"]
    lines += [f"  {f.filename}  (from {f.url})" for f in missing]
    lines.append(f"Download them yourself and put them in {folder} (set KANFARM_DATA_DIR to use another root).")
    return "\n".join(lines)
