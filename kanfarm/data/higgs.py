"""HIGGS (UCI): ``HIGGS.csv.gz``, each row a 0/1 label then 28 features, 11M rows.

Only the first ``n_train + n_test`` rows are read (streamed; the rest of the 2.6 GB file is never
decompressed). Split as in the paper: the first ``n_train`` rows (default 50,000) train, the next
``n_test`` (default 50,000) test; together at most the file's 11,000,000 rows. Scaling: standardise
each feature with the *training* mean and standard deviation, clip at +-3 standard deviations,
divide by 3, so features lie in [-1, 1].
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kanfarm.data.errors import DatasetFormatError, OptionError

if TYPE_CHECKING:
    import torch

N_CLASSES = 2
FORMAT_VERSION = 1
DEFAULTS: dict[str, Any] = {"n_train": 50_000, "n_test": 50_000}
FILE = "HIGGS.csv.gz"
N_FEATURES = 28
CLIP = 3.0
#: the longest row read: HIGGS's are about 700 bytes (29 numbers written with 18 decimals)
MAX_ROW_BYTES = 2048
#: rows parsed at a time (about 75 MB of text at most)
PARSE_ROWS = 1 << 15
#: rows of the canonical HIGGS.csv.gz: n_train + n_test cannot exceed it.
N_ROWS = 11_000_000


def n_features(options: dict[str, Any]) -> int:
    return N_FEATURES


def check_options(options: dict[str, Any]) -> None:
    """Refuse a split the file cannot hold before any row is read (a typo fails at submission)."""
    total = int(options["n_train"]) + int(options["n_test"])
    if total > N_ROWS:
        raise OptionError("n_train", f"dataset 'higgs': n_train + n_test = {total:,} exceeds the {N_ROWS:,} rows "
                                     f"of {FILE}")


def _parsed(lines: list[str]) -> np.ndarray:
    # comments=None: a "#" line is an error, not a row skipped
    return np.loadtxt(lines, delimiter=",", dtype=np.float64, ndmin=2, comments=None)


def _unparsable(lines: list[str], before: int, exc: ValueError) -> str:
    """Which row of the file (counted from 1) numpy could not parse: its own message counts from
    0 within the chunk of ``PARSE_ROWS`` rows it was given."""
    for i, line in enumerate(lines):
        try:
            _parsed([line])
        except ValueError as own:
            return f"row {before + i + 1} is unparsable ({own})".replace(" at row 0,", ",")
    return f"unparsable rows ({exc})"


def read_rows(path: Path, n_rows: int) -> np.ndarray:
    """The first ``n_rows`` rows as float64 (n_rows, 29), all finite. Only that prefix is
    decompressed, so damage beyond it (and the gzip CRC at the end) is never checked. Rows are
    parsed ``PARSE_ROWS`` at a time into the result, each checked for length and column count
    first: memory stays that of the result, whatever a crafted file holds."""
    rows = np.empty((n_rows, 1 + N_FEATURES), dtype=np.float64)
    done = 0
    try:
        with gzip.open(path, "rb") as f:
            while done < n_rows:
                lines = []
                while len(lines) < min(PARSE_ROWS, n_rows - done):
                    line = f.readline(MAX_ROW_BYTES + 1)  # bounded: a crafted file may hold no newline
                    if not line:
                        break
                    where = f"{path}: row {done + len(lines) + 1}"
                    if len(line) > MAX_ROW_BYTES:
                        raise DatasetFormatError(f"{where} is longer than {MAX_ROW_BYTES} bytes")
                    if not line.strip():  # loadtxt would skip it, and the test split come out short
                        raise DatasetFormatError(f"{where} is empty")
                    if line.count(b",") != N_FEATURES:
                        raise DatasetFormatError(f"{where} has {line.count(b',') + 1} columns, expected "
                                                 f"{1 + N_FEATURES}")
                    lines.append(line.decode("utf-8"))
                if not lines:
                    break
                try:
                    rows[done:done + len(lines)] = _parsed(lines)
                except ValueError as exc:
                    raise DatasetFormatError(f"{path}: {_unparsable(lines, done, exc)}") from exc
                done += len(lines)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"{path}: not a readable gzip file of text ({exc})") from exc
    if done < n_rows:
        raise DatasetFormatError(f"{path}: needs {n_rows} rows (n_train + n_test), file has {done}")
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if bad.size:  # loadtxt accepts nan/inf, which would poison the training mean and std
        raise DatasetFormatError(f"{path}: row {bad[0] + 1} has a non-finite value (nan or inf)")
    return rows


def squash(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return np.clip((x - mean) / std, -CLIP, CLIP) / CLIP


def build(folder: Path, options: dict[str, Any]) -> dict[str, torch.Tensor]:
    import torch  # here, not above: asking a dataset's shape imports no torch

    n_train, n_test = int(options["n_train"]), int(options["n_test"])
    path = folder / FILE
    rows = read_rows(path, n_train + n_test)
    labels = rows[:, 0]
    if not np.isin(labels, (0.0, 1.0)).all():
        raise DatasetFormatError(f"{path}: labels must be 0 or 1")
    x = rows[:, 1:]
    mean = x[:n_train].mean(axis=0)
    with np.errstate(over="ignore"):  # an overflow is reported below, naming the feature
        std = x[:n_train].std(axis=0)
    if not np.isfinite(std).all():  # values so large that their squares overflow float64
        raise DatasetFormatError(f"{path}: feature {int(np.argmin(np.isfinite(std))) + 1} has values too large "
                                 "to standardise")
    std[std == 0] = 1.0  # a constant feature stays at 0 instead of dividing by zero
    features = squash(x, mean, std).astype(np.float32)
    y = labels.astype(np.int64)
    return {"x_train": torch.from_numpy(features[:n_train].copy()), "y_train": torch.from_numpy(y[:n_train].copy()),
            "x_test": torch.from_numpy(features[n_train:].copy()), "y_test": torch.from_numpy(y[n_train:].copy())}
