"""Fast spline branch of a KAN layer on a uniform grid: closed-form bases and a hand-written backward.

Why it is fast, compared with autograd through the Cox-de Boor recursion:

- On equally spaced knots every basis is a shifted cardinal B-spline, ``B_j(x) = N_k(u - j)`` with
  ``u = (x - t_0) / h``. ``N_k`` is evaluated in closed form from its symmetric truncated-power
  expansion ``N_k(t) = sum_{i < (k+1)/2} c_i (half - i - |t - half|)_+^k`` (``half = (k+1)/2``, only
  the half that never cancels badly), a handful of elementwise ops instead of k recursion steps.
- Nothing of the basis construction is kept for autograd: backward uses the stored basis for the
  weight gradient and recomputes ``N_k'`` for the input gradient.
- Bases are laid out ``(batch, basis, in)`` so elementwise ops run along the long ``in`` axis, and
  they are built in batch chunks that stay in cache (on CPU). The spline weight is permuted to the
  same ``(basis, in)`` order, so one matrix product gives the spline output.

Valid for spline order >= 2: there ``N_k`` is continuously differentiable, so rounding of ``u`` at
a knot changes values and derivatives only at rounding level. (Order 1 has a kink at every knot,
where the half-open cell rule decides the gradient; the layer uses the reference path for it.)
"""
from __future__ import annotations

import math

import torch

#: elements of one ``(chunk, basis, in)`` block on CPU: about 1 MiB of float32, so it stays in cache.
CHUNK_ELEMENTS = 1 << 18


def _terms(order: int) -> list[tuple[float, float]]:
    """``(shift, coefficient)`` of each truncated power in the symmetric form of ``N_order``."""
    half = (order + 1) / 2
    return [(half - i, (-1) ** i * math.comb(order + 1, i) / math.factorial(order))
            for i in range(math.ceil(half))]


def _chunk_rows(x: torch.Tensor, n_bases: int) -> int:
    if x.device.type != "cpu":
        return max(1, x.shape[0])
    return max(1, CHUNK_ELEMENTS // (n_bases * x.shape[1]))


def _offsets(u: torch.Tensor, n_bases: int, order: int) -> torch.Tensor:
    """``u - j - half`` for every basis j: shape ``(rows, n_bases, in)``."""
    centres = torch.arange(n_bases, dtype=u.dtype, device=u.device).add_((order + 1) / 2)
    return u.unsqueeze(1) - centres.view(-1, 1)


def uniform_basis(x: torch.Tensor, t0: torch.Tensor, inv_h: torch.Tensor, n_bases: int, order: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Bases of shape ``(batch, n_bases, in)`` on the uniform knots ``t0 + m / inv_h`` (per input)."""
    if out is None:
        out = x.new_empty(x.shape[0], n_bases, x.shape[1])
    terms = _terms(order)
    step = _chunk_rows(x, n_bases)
    for start in range(0, x.shape[0], step):
        u = (x[start:start + step] - t0) * inv_h
        r = _offsets(u, n_bases, order).abs_()
        block = out[start:start + step]
        for n, (shift, coef) in enumerate(terms):
            q = torch.rsub(r, shift).clamp_(min=0).pow_(order)
            if n == 0:
                torch.mul(q, coef, out=block)
            else:
                block.add_(q, alpha=coef)
    return out


def uniform_basis_grad_dot(x: torch.Tensor, t0: torch.Tensor, inv_h: torch.Tensor,
                           grad_bases: torch.Tensor, order: int) -> torch.Tensor:
    """``sum_j grad_bases[b, j, i] * dB_j/dx (x[b, i])``: the input gradient through the bases."""
    n_bases = grad_bases.shape[1]
    terms = _terms(order)
    result = x.new_empty(x.shape)
    step = _chunk_rows(x, n_bases)
    for start in range(0, x.shape[0], step):
        u = (x[start:start + step] - t0) * inv_h
        d = _offsets(u, n_bases, order)
        sign = torch.sign(d)
        r = d.abs_()
        slope = None  # -dN/dt up to the sign of (t - half)
        for shift, coef in terms:
            q = torch.rsub(r, shift).clamp_(min=0)
            if order > 2:
                q.pow_(order - 1)
            slope = q.mul_(coef * order) if slope is None else slope.add_(q, alpha=coef * order)
        slope.mul_(sign).mul_(grad_bases[start:start + step])
        torch.sum(slope, dim=1, out=result[start:start + step])
    return result.mul_(inv_h).neg_()


def grid_origin_and_scale(grid: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``t_0`` and ``1 / h`` per input of a uniform grid (shape ``(in, G + 2k + 1)``)."""
    n_cells = grid.shape[1] - 1
    return grid[:, 0].contiguous(), n_cells / (grid[:, -1] - grid[:, 0])


class UniformSplineLinear(torch.autograd.Function):
    """``bases(x) @ weight.T`` with ``weight`` of shape ``(out, n_bases * in)`` in ``(basis, in)`` order."""

    @staticmethod
    def forward(ctx, x, weight, t0, inv_h, order: int):
        n_bases = weight.shape[1] // x.shape[1]
        bases = uniform_basis(x, t0, inv_h, n_bases, order)
        ctx.order = order
        ctx.save_for_backward(x, weight, t0, inv_h, bases)
        return bases.view(x.shape[0], -1) @ weight.t()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, t0, inv_h, bases = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad_out.t() @ bases.view(x.shape[0], -1)
        if ctx.needs_input_grad[0]:
            grad_bases = (grad_out @ weight).view(bases.shape)
            grad_x = uniform_basis_grad_dot(x, t0, inv_h, grad_bases, ctx.order)
        return grad_x, grad_weight, None, None, None


def uniform_spline_linear(x: torch.Tensor, weight: torch.Tensor, grid: torch.Tensor, order: int) -> torch.Tensor:
    """Spline branch ``sum_{i,j} B_j(x_i) weight[o, i, j]`` on a uniform ``grid``; ``weight`` is ``(out, in, n_bases)``."""
    if order < 2:
        raise ValueError("the closed-form path needs spline order >= 2")
    out_features, in_features, n_bases = weight.shape
    t0, inv_h = grid_origin_and_scale(grid, order)
    weight_ji = weight.transpose(1, 2).reshape(out_features, n_bases * in_features)
    return UniformSplineLinear.apply(x, weight_ji, t0.to(x.dtype), inv_h.to(x.dtype), order)
