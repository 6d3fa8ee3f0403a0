"""scikit-learn's bundled 8x8 digits (1,797 images, offline): the small default dataset.

Split: stratified by class, 25% test, ``random_state=0`` (1,347 train / 450 test), so every run and
worker sees the same split. Scaling: pixel intensities 0..16 map to ``p / 16 * 2 - 1`` in [-1, 1].
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kanfarm.data.scaling import to_grid

if TYPE_CHECKING:
    import torch

N_CLASSES = 10
FORMAT_VERSION = 1
DEFAULTS: dict[str, Any] = {}
TEST_FRACTION = 0.25
SPLIT_SEED = 0


def n_features(options: dict[str, Any]) -> int:
    return 64


def build(folder: Path, options: dict[str, Any]) -> dict[str, torch.Tensor]:
    import torch  # here, not above: asking a dataset's shape imports no torch

    from sklearn.datasets import load_digits  # local: scikit-learn's import costs about a second
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        to_grid(x, 16), y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y)
    return {"x_train": torch.from_numpy(x_train), "y_train": torch.from_numpy(y_train.astype(np.int64)),
            "x_test": torch.from_numpy(x_test), "y_test": torch.from_numpy(y_test.astype(np.int64))}
