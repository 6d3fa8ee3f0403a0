"""Reader of the IDX format (MNIST family): a 4-byte magic, big-endian uint32 dims, then raw data.

Magic: two zero bytes, a type byte (only 0x08 = unsigned byte is used by these datasets) and the
number of dimensions. The reader checks all of it and the payload length, so a truncated or
mislabelled file fails with its name in the message instead of yielding garbage.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from kanfarm.data.errors import DatasetFormatError

UBYTE = 0x08


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The uint8 array of a gzipped IDX file, which must have ``ndim`` dimensions."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # zlib.error: a damaged deflate stream
        raise DatasetFormatError(f"{path}: not a readable gzip file ({exc})") from exc
    if len(raw) < 4:
        raise DatasetFormatError(f"{path}: too short for an IDX header")
    zero0, zero1, dtype, dims = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or dtype != UBYTE or dims != ndim:
        raise DatasetFormatError(
            f"{path}: bad IDX magic 0x{raw[:4].hex()} (expected 0x0000{UBYTE:02x}{ndim:02x}:"
            f" unsigned bytes, {ndim} dims)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: IDX header truncated")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise DatasetFormatError(f"{path}: IDX dims {shape} need {expected} data bytes,"
                                 f" file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
