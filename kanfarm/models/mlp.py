"""The MLP baseline: Linear (+ batch norm) + activation + dropout per hidden layer, a plain Linear
output (logits)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kanfarm.models.activations import make_activation


class MLP(nn.Module):
    """``widths = [in, h1, ..., out]``; each hidden block is ``Sequential(Linear, activation, Dropout(p))``,
    with ``BatchNorm1d`` between Linear and activation when ``batch_norm``."""

    def __init__(self, widths: Sequence[int], activation: str = "relu", dropout: float = 0.0,
                 batch_norm: bool = False):
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"widths {list(widths)} need at least an input and an output width")
        self.widths = [int(w) for w in widths]
        pairs = list(zip(self.widths[:-1], self.widths[1:]))
        blocks: list[nn.Module] = [
            nn.Sequential(nn.Linear(a, b), *([nn.BatchNorm1d(b)] if batch_norm else []),
                          make_activation(activation), nn.Dropout(dropout))
            for a, b in pairs[:-1]]
        blocks.append(nn.Linear(*pairs[-1]))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x
