"""Activation modules by name: the study's relu, gelu, silu, elu and cos."""
from __future__ import annotations

import torch
from torch import nn


class Cos(nn.Module):
    """``torch.cos`` as a module (the study's cosine activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cos(x)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU, "cos": Cos,
}


def make_activation(activation: str | nn.Module | type[nn.Module]) -> nn.Module:
    """A fresh module for a name, the module itself, or an instance of a module class (efficient-kan passes classes)."""
    if isinstance(activation, nn.Module):
        return activation
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        return activation()
    if isinstance(activation, str) and activation in ACTIVATIONS:
        return ACTIVATIONS[activation]()
    raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
