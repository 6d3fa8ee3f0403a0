"""Models from a ``RunConfig``: widths (with MLP-Wide matching), construction, parameter counts."""
from __future__ import annotations

from torch import nn

from kanfarm.config import RunConfig
from kanfarm.models.init import apply_init
from kanfarm.models.kan import KAN
from kanfarm.models.mlp import MLP
from kanfarm.models.widths import kan_params, match_mlp_widths, mlp_params, scale_hidden


def model_widths(config: RunConfig, n_features: int, n_classes: int) -> list[int]:
    """``[n_features, *hidden, n_classes]`` as built. For ``mlp_wide`` the hidden widths are scaled by
    ``wide_multiplier`` when set, else by the one factor that brings the MLP's parameter count closest
    to the KAN's on the base widths."""
    config = config.normalised()
    widths = [int(n_features), *config.hidden_widths, int(n_classes)]
    if config.model != "mlp_wide":
        return widths
    if config.wide_multiplier is not None:
        return scale_hidden(widths, config.wide_multiplier)
    kan = kan_params(widths, config.grid_size, config.spline_order, config.batch_norm)
    return match_mlp_widths(widths, kan, config.batch_norm)


def param_count(config: RunConfig, n_features: int, n_classes: int) -> int:
    """Trainable parameters of ``build_model(config, ...)``, computed from the widths alone."""
    config = config.normalised()
    widths = model_widths(config, n_features, n_classes)
    if config.model == "kan":
        return kan_params(widths, config.grid_size, config.spline_order, config.batch_norm)
    return mlp_params(widths, config.batch_norm)


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
