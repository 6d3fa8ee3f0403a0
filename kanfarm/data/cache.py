"""The preprocessed cache beside the raw files: one ``cache-<key>.pt`` per dataset and option set.

The key hashes the dataset name, its format version and the options that change the tensors, so
different vocabularies or split sizes never collide. Files are written atomically and read with
``weights_only=True`` (plain tensors and containers only, nothing unpickled beyond them) and
``mmap=True``: the float32 features are memory-mapped copy-on-write, so workers on one machine share
the pages. A load reads the features once to check them (``problem``): 0.05-0.1 s for CIFAR-10's
737 MB already in memory (measured on a 2-core VM), plus reading them from disk the first time.

A cache also stores the size, mtime and ctime of each raw file it was built from; when a raw file
present now differs (replaced by new files, even one copied with the old size and mtime kept), the
cache is stale and rebuilt. That costs one ``stat`` per file, no hashing. ctime also changes with
chmod, chown or a move, which then costs one rebuild; the inode is left out on purpose, as some
network file systems give each client its own. Caches made before ctime was stamped rebuild once. Raw files that were deleted do not invalidate it: the cache alone can serve.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

from kanfarm.atomic import atomic_writer

SOURCES_KEY = "raw_files"  # entry of the saved dict: file name -> [size, mtime_ns, ctime_ns]
REQUIRED = {"x_train": torch.float32, "y_train": torch.int64, "x_test": torch.float32, "y_test": torch.int64}


def problem(tensors: Any, n_features: int, n_classes: int) -> str | None:
    """What is wrong with a dataset's tensors, None when nothing: every split non-empty, features
    ``(rows, n_features)`` finite in [-1, 1], labels ``(rows,)`` in ``0..n_classes - 1``. Asked of a
    build and of a cache, whose bytes a disk may have changed (mmap reads never check its CRCs)."""
    if not isinstance(tensors, dict):
        return "not a table of tensors"
    for key, dtype in REQUIRED.items():
        value = tensors.get(key)
        if not isinstance(value, torch.Tensor) or value.dtype != dtype:
            return f"{key} is missing or not {dtype}"
    for split in ("train", "test"):
        x, y = tensors[f"x_{split}"], tensors[f"y_{split}"]
        if x.dim() != 2 or x.shape[1] != n_features or y.shape != (x.shape[0],):
            return f"the {split} split has features {tuple(x.shape)} and labels {tuple(y.shape)}"
        if x.shape[0] == 0:
            return f"the {split} split has no rows"
        low, high = torch.aminmax(x)  # no copy of x; NaN propagates and fails the test
        if not (bool(low >= -1.0) and bool(high <= 1.0)):
            return f"the {split} features are not all finite and within [-1, 1]"
        if not (0 <= int(y.min()) and int(y.max()) < n_classes):
            return f"the {split} labels are not all in 0..{n_classes - 1}"
    return None


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


def read(path: Path, sources: dict[str, list[int]], n_features: int, n_classes: int) -> dict[str, torch.Tensor] | None:
    """The cached tensors, or None when there is no usable cache (a broken one is ignored and rebuilt,
    so is one built from raw files other than ``sources``, the current ``source_stamps``). The
    tensors are checked (``problem``): one pass over the features, a fraction of a second for
    CIFAR-10, against training on damaged bytes."""
    if not path.is_file():
        return None
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated or foreign file: rebuild rather than fail
        warnings.warn(f"ignoring unreadable dataset cache {path}: {exc}", stacklevel=3)
        return None
    why = problem(tensors, n_features, n_classes)
    if why is not None:
        warnings.warn(f"ignoring dataset cache {path}: {why}", stacklevel=3)
        return None
    built_from = tensors.get(SOURCES_KEY)
    built_from = built_from if isinstance(built_from, dict) else {}
    if any(built_from.get(name) != stamp for name, stamp in sources.items()):
        return None  # a raw file was replaced since (or the cache predates the stamps): rebuild
    return tensors


def write(path: Path, tensors: dict[str, torch.Tensor], sources: dict[str, list[int]]) -> None:
    """Save through ``atomic_writer`` with the ``source_stamps`` taken before the build; a
    read-only folder or a full disk only costs the speed-up, so failures just warn (torch.save
    reports a failed write as a RuntimeError)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path, durable=True, follow=False) as out:  # kanfarm's name in a shared folder
            torch.save({**tensors, SOURCES_KEY: sources}, out)
    except Exception as exc:
        try:  # torch.save words a full disk as "unexpected pos ...": say what room there is
            room = f" ({shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there)"
        except OSError:
            room = ""
        warnings.warn(f"cannot write dataset cache {path}: {exc}{room}", stacklevel=3)
