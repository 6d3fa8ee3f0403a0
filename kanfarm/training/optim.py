"""The study's three optimisers by name."""
from __future__ import annotations

from typing import Iterable

import torch


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """``sgd``; ``sgd_momentum`` (0.9, Nesterov); ``adam`` (plain Adam; the authors' code used
    AdamW, whose default decoupled weight decay of 0.01 we leave out so that "adam" means Adam)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")
