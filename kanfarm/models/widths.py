"""Parameter counts from widths alone, and the MLP-Wide widths that match a KAN's count."""
from __future__ import annotations

from collections.abc import Sequence

from kanfarm.config import RunConfig


def norm_params(widths: Sequence[int], batch_norm: bool) -> int:
    """A batch norm's scale and shift per hidden unit (none after the output layer)."""
    return 2 * sum(widths[1:-1]) if batch_norm else 0


def kan_params(widths: Sequence[int], grid_size: int, spline_order: int, batch_norm: bool = False) -> int:
    """G + k spline coefficients, one base weight and one scaler per edge."""
    per_edge = grid_size + spline_order + 2
    return sum(a * b * per_edge for a, b in zip(widths[:-1], widths[1:])) + norm_params(widths, batch_norm)


def mlp_params(widths: Sequence[int], batch_norm: bool = False) -> int:
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:])) + norm_params(widths, batch_norm)


def scale_hidden(widths: Sequence[int], factor: float) -> list[int]:
    """Hidden widths times ``factor``, rounded, at least 1; input and output widths unchanged."""
    return [widths[0], *(max(1, round(w * factor)) for w in widths[1:-1]), widths[-1]]


def match_mlp_widths(widths: Sequence[int], target: int, batch_norm: bool = False) -> list[int]:
    """Hidden widths scaled by one factor so that the MLP's count is as close to ``target`` as the
    rounding of widths allows.

    The count grows monotonically with the factor, so bisection finds the smallest factor whose
    rounded widths reach ``target``; that and the widths just below are compared.
    """
    if len(widths) < 3:
        return list(widths)
    lo, hi = 0.0, 1.0
    while mlp_params(scale_hidden(widths, hi), batch_norm) < target:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if mlp_params(scale_hidden(widths, mid), batch_norm) >= target:
            hi = mid
        else:
            lo = mid
    candidates = [scale_hidden(widths, lo), scale_hidden(widths, hi)]
    return min(candidates, key=lambda ws: abs(mlp_params(ws, batch_norm) - target))


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
