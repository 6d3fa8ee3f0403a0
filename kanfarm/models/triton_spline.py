"""Fused Triton kernels for the uniform-grid spline branch on CUDA (float32).

Why: the closed-form bases in ``uniform_spline`` take about a dozen elementwise passes over a
``(batch, n_bases, in)`` tensor in eager PyTorch; on a GPU those passes, not the matrix products,
set the time. One kernel reads ``x`` once and writes every basis once. The slopes are not stored:
the input-gradient kernel recomputes them from ``x`` while it reduces ``dL/dB * dB/dx`` over the
bases, so the layer keeps only the bases (for the weight gradient) and ``x``.

The arithmetic is that of ``uniform_spline.uniform_basis`` (same symmetric truncated powers, same
order of operations). Imported only when a CUDA tensor takes the fast path, or by tests, which run
these kernels on the CPU under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 8
BLOCK_IN = 128


@triton.jit
def _powers(r, SHIFT: tl.constexpr, ORDER: tl.constexpr):
    """``q = (SHIFT - r)_+``; returns ``(q^ORDER, q^(ORDER-1))``."""
    q = tl.maximum(SHIFT - r, 0.0)
    lower = q
    for _ in tl.static_range(ORDER - 2):
        lower = lower * q
    return lower * q, lower


@triton.jit
def _basis_and_slope(t, ORDER: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
                     N_TERMS: tl.constexpr, HALF: tl.constexpr, WANT_SLOPE: tl.constexpr):
    """``N_ORDER`` at ``t + HALF`` and ``S`` with ``dN/dt = -S`` sign convention of ``uniform_basis``."""
    r = tl.abs(t)
    p, low = _powers(r, HALF, ORDER)
    value = p * C0
    slope = low * (C0 * ORDER)
    if N_TERMS > 1:
        p, low = _powers(r, HALF - 1.0, ORDER)
        value += p * C1
        slope += low * (C1 * ORDER)
    if N_TERMS > 2:
        p, low = _powers(r, HALF - 2.0, ORDER)
        value += p * C2
        slope += low * (C2 * ORDER)
    if WANT_SLOPE:
        slope = tl.where(t > 0, slope, tl.where(t < 0, -slope, 0.0))
    return value, slope


@triton.jit
def _tile(x_ptr, t0_ptr, inv_h_ptr, n_rows, n_in, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """This program's ``(BLOCK_R, BLOCK_I)`` tile: grid coordinates ``u = (x - t0) * inv_h`` split
    as ``cell + frac`` in float64 (``uniform_spline.cell_coordinates``), the tile's ``inv_h``
    (float32), its mask, and the row (int64) and column offsets."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    col_ok = cols < n_in
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * n_in + cols[None, :], mask=mask, other=0.0)
    t0 = tl.load(t0_ptr + cols, mask=col_ok, other=0.0)  # float64
    inv_h = tl.load(inv_h_ptr + cols, mask=col_ok, other=0.0)  # float64
    u = (x.to(tl.float64) - t0[None, :]) * inv_h[None, :]
    cell = tl.floor(u)
    return cell.to(tl.float32), (u - cell).to(tl.float32), inv_h.to(tl.float32), mask, rows64, cols


@triton.jit
def _bases_kernel(x_ptr, t0_ptr, inv_h_ptr, out_ptr, n_rows, n_in,
                  N_BASES: tl.constexpr, ORDER: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr,
                  C2: tl.constexpr, N_TERMS: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    cell, frac, inv_h, mask, rows64, cols = _tile(x_ptr, t0_ptr, inv_h_ptr, n_rows, n_in, BLOCK_R, BLOCK_I)
    out = out_ptr + rows64 * (N_BASES * n_in) + cols[None, :]
    for j in tl.static_range(N_BASES):
        value, _ = _basis_and_slope((cell - (j + HALF)) + frac, ORDER, C0, C1, C2, N_TERMS, HALF, False)
        tl.store(out + j * n_in, value, mask=mask)


@triton.jit
def _input_grad_kernel(grad_ptr, x_ptr, t0_ptr, inv_h_ptr, out_ptr, n_rows, n_in,
                       N_BASES: tl.constexpr, ORDER: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr,
                       C2: tl.constexpr, N_TERMS: tl.constexpr, HALF: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    cell, frac, inv_h, mask, rows64, cols = _tile(x_ptr, t0_ptr, inv_h_ptr, n_rows, n_in, BLOCK_R, BLOCK_I)
    grad = grad_ptr + rows64 * (N_BASES * n_in) + cols[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_I), dtype=tl.float32)
    for j in tl.static_range(N_BASES):
        _, slope = _basis_and_slope((cell - (j + HALF)) + frac, ORDER, C0, C1, C2, N_TERMS, HALF, True)
        acc += tl.load(grad + j * n_in, mask=mask, other=0.0) * slope
    tl.store(out_ptr + rows64 * n_in + cols[None, :], acc * -inv_h[None, :], mask=mask)


def _constants(order: int) -> dict:
    from kanfarm.models.uniform_spline import _terms

    terms = _terms(order)
    if not 2 <= order <= 5 or len(terms) > 3:
        raise ValueError(f"fused kernels support spline orders 2-5, not {order}")
    coefs = [c for _, c in terms] + [0.0] * (3 - len(terms))
    return dict(ORDER=order, C0=coefs[0], C1=coefs[1], C2=coefs[2], N_TERMS=len(terms), HALF=(order + 1) / 2,
                BLOCK_R=BLOCK_ROWS, BLOCK_I=BLOCK_IN)


def _coordinates(t: torch.Tensor) -> torch.Tensor:
    """``t0`` or ``inv_h`` as the kernels read them: contiguous float64."""
    return t.to(torch.float64).contiguous()


def _grid(n_rows: int, n_in: int) -> tuple[int, int]:
    return triton.cdiv(n_rows, BLOCK_ROWS), triton.cdiv(n_in, BLOCK_IN)


def fused_bases(x: torch.Tensor, t0: torch.Tensor, inv_h: torch.Tensor, n_bases: int, order: int) -> torch.Tensor:
    """Bases ``(batch, n_bases, in)`` of 2-D float32 ``x``, as ``uniform_basis`` computes them."""
    x, t0, inv_h = x.contiguous(), _coordinates(t0), _coordinates(inv_h)
    out = x.new_empty(x.shape[0], n_bases, x.shape[1])
    if x.numel():
        _bases_kernel[_grid(*x.shape)](x, t0, inv_h, out, x.shape[0], x.shape[1], N_BASES=n_bases,
                                       **_constants(order))
    return out


def fused_input_grad(grad_bases: torch.Tensor, x: torch.Tensor, t0: torch.Tensor, inv_h: torch.Tensor,
                     order: int) -> torch.Tensor:
    """``dL/dx[b, i] = sum_j grad_bases[b, j, i] * dB_j(x[b, i])/dx`` with the slopes recomputed from ``x``;
    ``grad_bases`` is ``(batch, n_bases * in)`` in ``(basis, in)`` order."""
    x, grad_bases = x.contiguous(), grad_bases.contiguous()
    n_bases = grad_bases.shape[1] // x.shape[1]
    out = torch.empty_like(x)
    if x.numel():
        _input_grad_kernel[_grid(*x.shape)](grad_bases, x, _coordinates(t0), _coordinates(inv_h), out, x.shape[0],
                                            x.shape[1], N_BASES=n_bases, **_constants(order))
    return out
