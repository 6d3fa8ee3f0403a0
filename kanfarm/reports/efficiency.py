"""The study's efficiency metric (FACTS.md): A / (t + 1) / ln(1 + N - ID)."""
from __future__ import annotations

import math

#: d_int90 for fully connected nets (Li et al. 2018), as the study used them. Datasets not listed
#: have no known intrinsic dimension: give one in the grid spec or with ``--intrinsic-dim``.
KNOWN_INTRINSIC_DIM: dict[str, int] = {"mnist": 750, "cifar10": 9000}


def efficiency(best_acc: float | None, best_epoch: int | None, n_params: int | None,
               intrinsic_dim: int | None) -> float | None:
    """Best test accuracy per epoch taken (t = 0: before training) per log excess parameter.

    None when undefined: unknown intrinsic dimension or accuracy, or ``n_params <= intrinsic_dim``.
    """
    if best_acc is None or best_epoch is None or n_params is None or intrinsic_dim is None:
        return None
    if not 0.0 <= best_acc <= 1.0:
        raise ValueError(f"best_acc={best_acc!r} lies outside [0, 1]")
    if best_epoch < 0:
        raise ValueError(f"best_epoch={best_epoch!r} is negative")
    if n_params <= intrinsic_dim:
        return None
    return best_acc / (best_epoch + 1) / math.log(1 + n_params - intrinsic_dim)
