"""MNIST and Fashion-MNIST from their four gzipped IDX files (same names and layout for both).

Split: the official 60,000 train / 10,000 test. Features: 28x28 images flattened row-major to 784.
Scaling: pixels 0..255 map to ``p / 255 * 2 - 1`` in [-1, 1].
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kanfarm.data.errors import DatasetFormatError
from kanfarm.data.idx import read_idx
from kanfarm.data.scaling import to_grid

if TYPE_CHECKING:
    import torch

N_CLASSES = 10
FORMAT_VERSION = 1
DEFAULTS: dict[str, Any] = {}
SIDE = 28
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def n_features(options: dict[str, Any]) -> int:
    return SIDE * SIDE


def build(folder: Path, options: dict[str, Any]) -> dict[str, torch.Tensor]:
    import torch  # here, not above: asking a dataset's shape imports no torch

    out: dict[str, torch.Tensor] = {}
    for split, (images_name, labels_name) in FILES.items():
        images = read_idx(folder / images_name, ndim=3)
        labels = read_idx(folder / labels_name, ndim=1)
        if images.shape[1:] != (SIDE, SIDE):
            raise DatasetFormatError(f"{folder / images_name}: images are {images.shape[1:]}, expected 28x28")
        if len(images) == 0:
            raise DatasetFormatError(f"{folder / images_name}: no images")
        if len(images) != len(labels):
            raise DatasetFormatError(f"{folder}: {images_name} has {len(images)} images but"
                                     f" {labels_name} has {len(labels)} labels")
        if labels.size and labels.max() >= N_CLASSES:
            raise DatasetFormatError(f"{folder / labels_name}: label {labels.max()} outside 0..9")
        out[f"x_{split}"] = torch.from_numpy(to_grid(images.reshape(len(images), SIDE * SIDE), 255))
        out[f"y_{split}"] = torch.from_numpy(labels.astype(np.int64))
    return out
