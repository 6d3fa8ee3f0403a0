"""Compact cache encoding: integer codes in [0, code_max] that map linearly onto [-1, 1].

Images and bag-of-words presence are stored as uint8 (4x smaller than float32, so caches load
fast) and turned into features as ``codes / code_max * 2 - 1``. Dividing first keeps the ends exact:
code 0 gives -1.0 and code ``code_max`` gives 1.0, never a rounding step outside the grid.
"""
from __future__ import annotations

import torch


def codes_to_features(codes: torch.Tensor, code_max: float) -> torch.Tensor:
    x = codes.to(torch.float32)
    return x.div_(float(code_max)).mul_(2.0).sub_(1.0)


def decode(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cached dict -> float32 features and int64 labels (float features pass through)."""
    out = {}
    for split in ("train", "test"):
        x = tensors[f"x_{split}"]
        if "code_max" in tensors:
            x = codes_to_features(x, float(tensors["code_max"]))
        out[f"x_{split}"] = x.to(torch.float32).contiguous()
        out[f"y_{split}"] = tensors[f"y_{split}"].to(torch.int64).contiguous()
    return out
