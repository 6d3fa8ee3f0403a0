"""CIFAR-10 from the *binary* archive ``cifar-10-binary.tar.gz`` (the pickled Python version is not
supported: nothing here ever unpickles downloaded data).

Each record is 1 label byte followed by 3,072 pixel bytes: the 32x32 red plane, then green, then
blue, each row-major. Features keep exactly that channel-major order (3072 = 3x32x32).
Split: ``data_batch_1..5.bin`` (50,000) train, ``test_batch.bin`` (10,000) test; all six batches must
hold the same number of records (a short one means a damaged archive).
Scaling: pixels 0..255 map to ``p / 255 * 2 - 1`` in [-1, 1].
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kanfarm.data.archive import read_files
from kanfarm.data.errors import DatasetFormatError
from kanfarm.data.scaling import to_grid

if TYPE_CHECKING:
    import torch

N_CLASSES = 10
FORMAT_VERSION = 1
DEFAULTS: dict[str, Any] = {}
ARCHIVE = "cifar-10-binary.tar.gz"
PIXELS = 3 * 32 * 32
RECORD = 1 + PIXELS
BATCH_RECORDS = 10_000  # images per batch file of the real archive
MEMBERS = {"train": [f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)],
           "test": ["cifar-10-batches-bin/test_batch.bin"]}


def n_features(options: dict[str, Any]) -> int:
    return PIXELS


def build(folder: Path, options: dict[str, Any]) -> dict[str, torch.Tensor]:
    import torch  # here, not above: asking a dataset's shape imports no torch

    path = folder / ARCHIVE
    wanted = {name for names in MEMBERS.values() for name in names}
    blobs = read_files(path, wanted.__contains__, max_member_bytes=BATCH_RECORDS * RECORD,
                       max_total_bytes=len(wanted) * BATCH_RECORDS * RECORD, max_members=len(wanted))
    out: dict[str, torch.Tensor] = {}
    sizes: dict[str, int] = {}
    for split, names in MEMBERS.items():
        records = []
        for name in names:
            if name not in blobs:
                raise DatasetFormatError(f"{path}: member {name} is missing (is this the binary version?)")
            blob = blobs[name]
            if len(blob) % RECORD:
                raise DatasetFormatError(f"{path}: {name} has {len(blob)} bytes, not a multiple of {RECORD}")
            records.append(np.frombuffer(blob, dtype=np.uint8).reshape(-1, RECORD))
            sizes[name] = len(records[-1])
        data = np.concatenate(records)
        labels = data[:, 0].astype(np.int64)
        if labels.size and labels.max() >= N_CLASSES:
            raise DatasetFormatError(f"{path}: label {labels.max()} outside 0..9")
        out[f"x_{split}"] = torch.from_numpy(to_grid(data[:, 1:], 255))
        out[f"y_{split}"] = torch.from_numpy(labels)
    if len(set(sizes.values())) > 1:  # all 10,000 in the real archive; the test archives are smaller
        raise DatasetFormatError(f"{path}: batches differ in size ("
                                 + ", ".join(f"{n.rsplit('/', 1)[1]}: {k} records" for n, k in sizes.items()) + ")")
    return out
