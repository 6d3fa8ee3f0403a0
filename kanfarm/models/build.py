"""Models from a ``RunConfig``: construction (widths and counts from widths: ``widths``)."""
from __future__ import annotations

from torch import nn

from kanfarm.config import RunConfig
from kanfarm.models.init import apply_init
from kanfarm.models.kan import KAN
from kanfarm.models.mlp import MLP
from kanfarm.models.widths import model_widths


def build_model(config: RunConfig, n_features: int, n_classes: int) -> nn.Module:
    """The run's network, initialised with ``config.init``; seed torch before calling for repeatability."""
    config = config.normalised()
    widths = model_widths(config, n_features, n_classes)
    if config.model == "kan":
        model: nn.Module = KAN(widths, config.grid_size, config.spline_order, config.activation,
                               batch_norm=config.batch_norm)
    else:
        model = MLP(widths, config.activation, config.dropout, batch_norm=config.batch_norm)
    return apply_init(model, config.init)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
