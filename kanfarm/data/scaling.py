"""The linear map of integer intensities 0..code_max onto the KAN grid range [-1, 1].

Computed in float32 as ``codes / code_max * 2 - 1``: dividing first keeps both ends exact (0 gives
-1.0, code_max gives 1.0), so no value can round to just outside the grid.
"""
from __future__ import annotations

import numpy as np


def to_grid(codes: np.ndarray, code_max: float) -> np.ndarray:
    x = codes.astype(np.float32)
    x /= np.float32(code_max)
    x *= np.float32(2.0)
    x -= np.float32(1.0)
    return x
