"""The study's weight-init schemes (kaiming_normal, kaiming_uniform, orthogonal) applied to a model.

- MLP: every ``nn.Linear`` weight gets the scheme, biases are zeroed.
- KAN: in every ``KANLinear`` the scheme draws ``base_weight`` and ``spline_scaler`` (both
  ``(out, in)`` matrices: the base branch and the per-edge spline amplitude, the two tensors
  efficient-kan also draws with a kaiming init); ``spline_weight`` keeps the small uniform noise of
  ``KANLinear.reset_parameters``, so every spline starts near zero whatever the scheme.
"""
from __future__ import annotations

import torch
from torch import nn

from kanfarm.models.kan import KANLinear

INIT_SCHEMES = ("kaiming_normal", "kaiming_uniform", "orthogonal")


def init_matrix_(weight: torch.Tensor, scheme: str) -> None:
    if scheme == "kaiming_normal":
        nn.init.kaiming_normal_(weight, nonlinearity="relu")
    elif scheme == "kaiming_uniform":
        nn.init.kaiming_uniform_(weight, nonlinearity="relu")
    elif scheme == "orthogonal":
        nn.init.orthogonal_(weight)
    else:
        raise ValueError(f"unknown init {scheme!r}; known: {', '.join(INIT_SCHEMES)}")


def apply_init(model: nn.Module, scheme: str) -> nn.Module:
    """Re-draw ``model``'s weights with ``scheme`` in module order (deterministic given the torch seed)."""
    for module in model.modules():
        if isinstance(module, KANLinear):
            init_matrix_(module.base_weight, scheme)
            init_matrix_(module.spline_scaler, scheme)
        elif isinstance(module, nn.Linear):
            init_matrix_(module.weight, scheme)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
