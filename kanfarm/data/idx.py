"""Reader of the IDX format (MNIST family): a 4-byte magic, big-endian uint32 dims, then raw data.

Magic: two zero bytes, a type byte (only 0x08 = unsigned byte is used by these datasets) and the
number of dimensions. The reader checks all of it and the payload length, so a truncated or
mislabelled file fails with its name in the message instead of yielding garbage.
"""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from kanfarm.data.errors import DatasetFormatError

UBYTE = 0x08
#: the largest payload read: MNIST's training images are 47,040,000 bytes
MAX_DATA_BYTES = 256 << 20


def read_idx(path: Path, ndim: int, max_bytes: int = MAX_DATA_BYTES) -> np.ndarray:
    """The uint8 array of a gzipped IDX file, which must have ``ndim`` dimensions. The header is
    checked before the data is read, and no more than it declares (at most ``max_bytes``) is
    decompressed: a small crafted file must not exhaust memory."""
    header = 4 + 4 * ndim
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(header)
            if len(head) < 4:
                raise DatasetFormatError(f"{path}: too short for an IDX header")
            zero0, zero1, dtype, dims = head[0], head[1], head[2], head[3]
            if zero0 != 0 or zero1 != 0 or dtype != UBYTE or dims != ndim:
                raise DatasetFormatError(
                    f"{path}: bad IDX magic 0x{head[:4].hex()} (expected 0x0000{UBYTE:02x}{ndim:02x}:"
                    f" unsigned bytes, {ndim} dims)")
            if len(head) < header:
                raise DatasetFormatError(f"{path}: IDX header truncated")
            shape = tuple(int(d) for d in np.frombuffer(head, dtype=">u4", count=ndim, offset=4))
            expected = math.prod(shape)  # exact: numpy's int64 product wraps for crafted dims
            if expected > max_bytes:
                raise DatasetFormatError(f"{path}: IDX dims {shape} declare {expected} bytes, more than "
                                         f"this dataset's files hold ({max_bytes})")
            data = f.read(expected + 1)  # one more: a longer payload is an error too
            if len(data) == expected:
                f.read()  # to the end of the stream: gzip checks its CRC and length there
    except (OSError, EOFError, zlib.error) as exc:  # zlib.error: a damaged deflate stream
        raise DatasetFormatError(f"{path}: not a readable gzip file ({exc})") from exc
    if len(data) != expected:
        raise DatasetFormatError(f"{path}: IDX dims {shape} need {expected} data bytes,"
                                 f" file has {'more' if len(data) > expected else len(data)}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)
