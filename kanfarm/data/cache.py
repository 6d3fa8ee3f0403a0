"""The preprocessed cache beside the raw files: one ``cache-<key>.pt`` per dataset and option set.

The key hashes the dataset name, its format version and the options that change the tensors, so
different vocabularies or split sizes never collide. Files are written atomically and read with
``weights_only=True`` (plain tensors and containers only, nothing unpickled beyond them) and
``mmap=True``: the float32 features are memory-mapped copy-on-write, so a load takes milliseconds
even for CIFAR-10 (737 MB of features) and workers on one machine share the pages.

A cache also stores the size, mtime and ctime of each raw file it was built from; when a raw file
present now differs (replaced by new files, even one copied with the old size and mtime kept), the
cache is stale and rebuilt. That costs one ``stat`` per file, no hashing. ctime also changes with
chmod, chown or a move, which then costs one rebuild; the inode is left out on purpose, as some
network file systems give each client its own. Caches made before ctime was stamped rebuild once. Raw files that were deleted do not invalidate it: the cache alone can serve.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

SOURCES_KEY = "raw_files"  # entry of the saved dict: file name -> [size, mtime_ns, ctime_ns]
REQUIRED = {"x_train": torch.float32, "y_train": torch.int64, "x_test": torch.float32, "y_test": torch.int64}


def cache_key(dataset: str, format_version: int, options: dict[str, Any]) -> str:
    text = json.dumps({"dataset": dataset, "format": format_version, "options": options}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(folder: Path, dataset: str, format_version: int, options: dict[str, Any]) -> Path:
    return folder / f"cache-{cache_key(dataset, format_version, options)}.pt"


def source_stamps(folder: Path, filenames: Iterable[str]) -> dict[str, list[int]]:
    """File name -> [size, mtime_ns, ctime_ns] of each of the raw files in ``folder``: a copy made
    with ``cp -p`` keeps size and mtime, but not ctime, which no user call can set."""
    stamps = {}
    for name in filenames:
        try:
            st = (folder / name).stat()
        except FileNotFoundError:
            continue
        stamps[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    return stamps


def read(path: Path, sources: dict[str, list[int]]) -> dict[str, torch.Tensor] | None:
    """The cached tensors, or None when there is no usable cache (a broken one is ignored and rebuilt,
    so is one built from raw files other than ``sources``, the current ``source_stamps``)."""
    if not path.is_file():
        return None
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated or foreign file: rebuild rather than fail
        warnings.warn(f"ignoring unreadable dataset cache {path}: {exc}", stacklevel=3)
        return None
    if not isinstance(tensors, dict) or any(tensors.get(k) is None or tensors[k].dtype != t
                                             for k, t in REQUIRED.items()):
        warnings.warn(f"ignoring dataset cache {path}: missing or mistyped tensors", stacklevel=3)
        return None
    built_from = tensors.get(SOURCES_KEY)
    built_from = built_from if isinstance(built_from, dict) else {}
    if any(built_from.get(name) != stamp for name, stamp in sources.items()):
        return None  # a raw file was replaced since (or the cache predates the stamps): rebuild
    return tensors


def write(path: Path, tensors: dict[str, torch.Tensor], sources: dict[str, list[int]]) -> None:
    """Save atomically with the ``source_stamps`` taken before the build; a read-only folder only
    costs the speed-up, so failures just warn."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".cache-", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        warnings.warn(f"cannot write dataset cache {path}: {exc}", stacklevel=3)
        return
    try:
        with os.fdopen(fd, "wb") as out:
            torch.save({**tensors, SOURCES_KEY: sources}, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        warnings.warn(f"cannot write dataset cache {path}: {exc}", stacklevel=3)
