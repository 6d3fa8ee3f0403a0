"""B-spline bases on per-input knot vectors: the plain Cox-de Boor recursion (the reference).

Conventions, shared by every path in kanfarm:

- ``grid`` has shape ``(in_features, n_knots)``, knots strictly increasing along each row. A
  spline of order ``k`` (polynomial degree k) on ``n_knots`` knots has ``n_knots - k - 1`` bases;
  the KAN layer's extended grid has ``G + 2k + 1`` knots, hence ``G + k`` bases.
- Degree-0 bases are indicators of half-open cells ``[t_j, t_{j+1})``. So a point exactly on a
  knot belongs to the cell on its right, and the last knot itself belongs to no cell: inputs
  outside ``[t_0, t_last)`` get all-zero bases (the KAN spline term vanishes there).
- For ``k >= 1`` the bases are continuous, so the half-open rule changes no *value*: at the grid's
  right end ``hi`` (an interior knot of the extended grid) the bases equal their limit from the
  left, which is what ``scipy.interpolate.BSpline`` returns on its closed base interval. Only the
  derivative of order-1 splines at a knot depends on the rule (it is the right derivative).
"""
from __future__ import annotations

import torch


def uniform_knots(in_features: int, grid_size: int, spline_order: int,
                  grid_range: tuple[float, float] = (-1.0, 1.0),
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uniformly extended knots, ``lo - k*h ... hi + k*h`` with ``h = (hi - lo) / G``, one row per input.

    Computed as ``j * h + lo`` for ``j = -k ... G + k`` (the efficient-kan values, so grids match bit for bit).
    """
    lo, hi = float(grid_range[0]), float(grid_range[1])
    if not hi > lo:
        raise ValueError(f"grid_range {grid_range!r} must have lo < hi")
    h = (hi - lo) / grid_size
    steps = torch.arange(-spline_order, grid_size + spline_order + 1, dtype=dtype or torch.get_default_dtype())
    return (steps * h + lo).expand(in_features, -1).contiguous()


def cox_de_boor_basis(x: torch.Tensor, grid: torch.Tensor, spline_order: int) -> torch.Tensor:
    """Bases ``B_j(x_i)`` of shape ``(batch, in, n_knots - k - 1)`` for ``x`` of shape ``(batch, in)``.

    The textbook recursion, every step a differentiable tensor op:
    ``B_{j,d}(x) = (x - t_j) / (t_{j+d} - t_j) B_{j,d-1}(x) + (t_{j+d+1} - x) / (t_{j+d+1} - t_{j+1}) B_{j+1,d-1}(x)``.
    """
    if x.dim() != 2 or grid.dim() != 2 or x.shape[1] != grid.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and grid {tuple(grid.shape)} must be (batch, in) and (in, knots)")
    if spline_order < 0 or grid.shape[1] < spline_order + 2:
        raise ValueError(f"{grid.shape[1]} knots are too few for spline order {spline_order}")
    x = x.unsqueeze(-1)
    bases = ((x >= grid[:, :-1]) & (x < grid[:, 1:])).to(x.dtype)
    for d in range(1, spline_order + 1):
        left = (x - grid[:, :-(d + 1)]) / (grid[:, d:-1] - grid[:, :-(d + 1)])
        right = (grid[:, d + 1:] - x) / (grid[:, d + 1:] - grid[:, 1:-d])
        bases = left * bases[:, :, :-1] + right * bases[:, :, 1:]
    return bases


def is_uniform(grid: torch.Tensor) -> bool:
    """True when every row of ``grid`` is equally spaced up to floating-point rounding of its knots."""
    steps = grid[:, 1:] - grid[:, :-1]
    h = (grid[:, -1:] - grid[:, :1]) / steps.shape[1]
    scale = grid.abs().amax(dim=1, keepdim=True)
    tolerance = 8 * torch.finfo(grid.dtype).eps * scale
    return bool(((steps - h).abs() <= tolerance).all() and (h > 0).all())
