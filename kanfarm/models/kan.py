"""The KAN layer in the widely used "efficient-kan" parameterisation, and a KAN network of such layers.

Per edge (input i, output o): ``phi(x_i) = base_weight[o,i] * act(x_i)
+ spline_scaler[o,i] * sum_j spline_weight[o,i,j] B_j(x_i)``, so G + k + 2 parameters per edge.
Names and shapes of parameters and of the ``grid`` buffer are those of efficient-kan (with its
standalone spline scaler), so its state dicts load unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kanfarm.models.activations import make_activation
from kanfarm.models.bspline import cox_de_boor_basis, is_uniform, uniform_knots
from kanfarm.models.uniform_spline import closed_form_applies, grid_origin_and_scale, uniform_spline_linear


class KANLinear(nn.Module):
    """``(..., in_features) -> (..., out_features)``.

    ``fast=True`` (default) evaluates the spline branch with closed-form bases and a hand-written
    backward when the grid is uniform and ``2 <= spline_order <= 7`` (see ``uniform_spline``); otherwise,
    and always with ``fast=False``, autograd runs through the Cox-de Boor recursion (the reference).
    Both compute the same function; ``fast`` is a plain attribute and can be flipped at any time.
    """

    def __init__(self, in_features: int, out_features: int, grid_size: int = 5, spline_order: int = 3,
                 grid_range: tuple[float, float] = (-1.0, 1.0),
                 base_activation: str | nn.Module | type[nn.Module] = "gelu",
                 fast: bool = True, spline_noise: float = 0.1):
        super().__init__()
        if grid_size < 1 or spline_order < 1:
            raise ValueError("grid_size and spline_order must be >= 1")
        self.in_features, self.out_features = in_features, out_features
        self.grid_size, self.spline_order = grid_size, spline_order
        self.spline_noise = spline_noise
        self.fast = fast
        n_bases = grid_size + spline_order
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, n_bases))
        self.spline_scaler = nn.Parameter(torch.empty(out_features, in_features))
        self.register_buffer("grid", uniform_knots(in_features, grid_size, spline_order, grid_range))
        self.base_activation = make_activation(base_activation)
        self._uniform_cache: tuple | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default init: ``nn.Linear``'s kaiming-uniform for base weight and scaler (as efficient-kan),
        spline coefficients uniform in ``+-spline_noise / (2 G)``, small so that the layer starts close
        to its base branch. Deterministic given the torch seed."""
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.spline_scaler, a=math.sqrt(5))
        with torch.no_grad():
            self.spline_weight.uniform_(-0.5, 0.5).mul_(self.spline_noise / self.grid_size)

    @property
    def scaled_spline_weight(self) -> torch.Tensor:
        """Spline coefficients times their edge's scaler: ``(out, in, G + k)``."""
        return self.spline_weight * self.spline_scaler.unsqueeze(-1)

    def uses_fast_path(self) -> bool:
        return self.fast and closed_form_applies(self.spline_order) and self._grid_is_uniform()

    def _grid_is_uniform(self) -> bool:
        return self._grid_facts()[2]

    def _grid_facts(self) -> tuple:
        """(grid, key, uniform, (t0, 1/h) or None) of the grid as it is now: worked out again
        only when the grid changed (``update_grid``, ``.to``, a new tensor), not in every forward
        (a host sync, and on a GPU a few launches per layer). The grid itself is kept so that
        its memory cannot be reused by another tensor with the same key."""
        grid = self.grid
        key = (grid.data_ptr(), grid._version, grid.device, grid.dtype)
        cache = self._uniform_cache
        if cache is None or cache[0] is not grid or cache[1] != key:
            uniform = is_uniform(grid)
            self._uniform_cache = cache = (grid, key, uniform, grid_origin_and_scale(grid) if uniform else None)
        return cache

    def spline_bases(self, x: torch.Tensor) -> torch.Tensor:
        """Reference bases ``(batch, in, G + k)`` of 2-D ``x``."""
        return cox_de_boor_basis(x, self.grid, self.spline_order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        out = F.linear(self.base_activation(x), self.base_weight)
        if self.uses_fast_path():
            spline = uniform_spline_linear(x, self.scaled_spline_weight, self.grid, self.spline_order,
                                           origin_scale=self._grid_facts()[3])
        else:
            spline = F.linear(self.spline_bases(x).reshape(x.shape[0], -1),
                              self.scaled_spline_weight.reshape(self.out_features, -1))
        return (out + spline).reshape(*lead, self.out_features)

    @torch.no_grad()
    def update_grid(self, x: torch.Tensor, margin: float = 0.01, grid_eps: float = 0.02) -> None:
        """Move the knots towards the data in ``x`` and refit the spline so the layer's function on
        ``x`` is kept.

        New interior knots: ``grid_eps`` times a uniform grid over ``[min - margin, max + margin]``
        plus ``1 - grid_eps`` times the sample quantiles of ``x``, per input, extended by k uniform
        steps on each side. The spline coefficients are then the least-squares fit (float64) of
        each edge's old spline values on ``x`` in the new bases. Edges whose scaler is exactly zero
        contribute nothing and get zero coefficients.
        """
        x = x.reshape(-1, self.in_features)
        k, g = self.spline_order, self.grid_size
        scaled = self.scaled_spline_weight.double()
        old = torch.einsum("bij,oij->ibo", self.spline_bases(x).double(), scaled)  # (in, batch, out)

        xs = torch.sort(x.double(), dim=0).values
        picks = torch.linspace(0, xs.shape[0] - 1, g + 1, device=x.device).round().long()
        adaptive = xs[picks]
        step = (xs[-1] - xs[0] + 2 * margin) / g
        steps = torch.arange(-k, g + k + 1, dtype=torch.float64, device=x.device).unsqueeze(1)
        knots = grid_eps * (xs[0] - margin + steps[k:g + k + 1] * step) + (1 - grid_eps) * adaptive
        grid = torch.cat([knots[:1] + steps[:k] * step, knots, knots[-1:] + (steps[g + k + 1:] - g) * step]).t()
        grid = grid.to(self.grid.dtype)  # the knots as stored: they must be increasing there
        if not bool((grid[:, 1:] > grid[:, :-1]).all()):
            raise ValueError(f"update_grid produced repeated knots in {self.grid.dtype} (inputs too far "
                             "from 0 for the knots' spacing, or margin = grid_eps = 0)")
        new_bases = cox_de_boor_basis(x.double(), grid.double(), k).transpose(0, 1)  # (in, batch, G+k)
        # gelsd (SVD) on the CPU: the fit is rank-deficient whenever an input takes fewer distinct
        # values than G + k (a small batch, a constant pixel, a binary feature), and the default
        # drivers then return wrong or zero coefficients (CUDA's gels assumes full rank). gelsd
        # gives the minimum-norm least-squares fit: exact on such an input (its few values can be
        # matched), the closest the new knots allow on the others.
        coef = torch.linalg.lstsq(new_bases.cpu(), old.cpu(), driver="gelsd").solution
        coef = coef.to(x.device).permute(2, 0, 1)  # (out, in, G+k)
        scaler = self.spline_scaler.double().unsqueeze(-1)
        safe = torch.where(scaler == 0, torch.ones_like(scaler), scaler)
        self.grid.copy_(grid)
        self.spline_weight.copy_(torch.where(scaler == 0, torch.zeros_like(coef), coef / safe))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"grid_size={self.grid_size}, spline_order={self.spline_order}, fast={self.fast}")


class KAN(nn.Module):
    """KAN layers on ``widths = [in, h1, ..., out]``; the last block outputs logits (no activation).
    With ``batch_norm`` each hidden block is ``Sequential(KANLinear, BatchNorm1d)``."""

    def __init__(self, widths: Sequence[int], grid_size: int = 5, spline_order: int = 3,
                 activation: str | nn.Module | type[nn.Module] = "gelu", fast: bool = True,
                 batch_norm: bool = False):
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"widths {list(widths)} need at least an input and an output width")
        self.widths = [int(w) for w in widths]
        pairs = list(zip(self.widths[:-1], self.widths[1:]))
        layers = [KANLinear(a, b, grid_size, spline_order, base_activation=activation, fast=fast) for a, b in pairs]
        self.blocks = nn.ModuleList(
            nn.Sequential(layer, nn.BatchNorm1d(b)) if batch_norm and i < len(pairs) - 1 else layer
            for i, (layer, (_, b)) in enumerate(zip(layers, pairs)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x
