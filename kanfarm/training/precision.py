"""A run's float32 matrix-product precision, set for the run and put back after it.

``RunConfig.matmul_precision`` "tf32" lets CUDA GPUs with TensorFloat-32 (Ampere and later) round
float32 product inputs to a 10-bit mantissa and accumulate in float32: several times the
throughput of exact float32 products, with relative errors around 1e-3 instead of 1e-6
(``benchmarks/kan_layer.py`` prints the KAN layer's). PyTorch's own switch for this is
process-wide, so it is set around the training of one run (or one pack) and restored; a process
trains one run at a time. Float64 work (the HSIC kernels) and elementwise kernels are unaffected,
and so are CPUs without reduced-precision product units.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from kanfarm.config import MATMUL_PRECISIONS

#: RunConfig value -> torch.set_float32_matmul_precision value
_TORCH = {"float32": "highest", "tf32": "high"}
assert set(_TORCH) == set(MATMUL_PRECISIONS)


@contextmanager
def matmul_precision(name: str) -> Iterator[None]:
    """Float32 products at ``name`` ("float32" or "tf32") inside the block."""
    if name not in _TORCH:
        raise ValueError(f"matmul_precision {name!r} is not one of {', '.join(MATMUL_PRECISIONS)}")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(_TORCH[name])
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
