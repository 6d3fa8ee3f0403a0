"""Fast spline branch of a KAN layer on a uniform grid: closed-form bases and a hand-written backward.

Why it is fast, compared with autograd through the Cox-de Boor recursion:

- On equally spaced knots every basis is a shifted cardinal B-spline, ``B_j(x) = N_k(u - j)`` with
  ``u = (x - t_0) / h``. ``N_k`` is evaluated in closed form from its symmetric truncated-power
  expansion ``N_k(t) = sum_{i < (k+1)/2} c_i (half - i - |t - half|)_+^k`` (``half = (k+1)/2``, only
  the half that never cancels badly), a handful of elementwise ops instead of k recursion steps.
- Nothing of the basis construction is kept for autograd: the forward pass stores only the bases
  (for the weight gradient) and their closed-form slopes ``N_k'`` (for the input gradient).
- Bases are laid out ``(batch, basis, in)`` so elementwise ops run along the long ``in`` axis, and
  they are built in batch chunks that stay in cache (on CPU). The spline weight is permuted to the
  same ``(basis, in)`` order, so one matrix product gives the spline output.

The grid coordinate ``u`` is split into a whole cell and a fraction in float64
(``cell_coordinates``), so rounding does not grow with the grid size. What remains is the knots':
stored in float32, uniform knots are uneven by up to ~1e-7 in x, i.e. ~5e-8 G of a cell, which the
reference sees and this closed form does not (1.1e-5 relative input gradients between the two at
G = 200, 1.5e-6 at G = 20; the reference is as far from exactly uniform knots).

Valid for spline order >= 2: there ``N_k`` is continuously differentiable, so rounding of ``u`` at
a knot changes values and derivatives only at rounding level. (Order 1 has a kink at every knot,
where the half-open cell rule decides the gradient; the layer uses the reference path for it.)
Used up to order ``MAX_ORDER``: the truncated powers' alternating sum loses float32 digits as k
grows (largest relative difference from the reference, G = 100: 6e-6 at k = 7 as at k = 5, 1.5e-5
at k = 8; outputs 2e-5 at k = 16; NaN from k = 32, where ``((k+1)/2)^k`` overflows float32), so
higher orders take the reference recursion.
"""
from __future__ import annotations

import math

import torch

from kanfarm.models import compiled_spline

#: the highest spline order evaluated in closed form (see the module docstring)
MAX_ORDER = 7


def closed_form_applies(order: int) -> bool:
    """Whether bases of ``order`` on a uniform grid come from the closed form here."""
    return 2 <= order <= MAX_ORDER


#: elements of one ``(chunk, basis, in)`` block on CPU (4 MiB of float32): small enough to stay in
#: cache, large enough to keep the number of parallel regions low on a busy machine.
CHUNK_ELEMENTS = 1 << 20


def _terms(order: int) -> list[tuple[float, float]]:
    """``(shift, coefficient)`` of each truncated power in the symmetric form of ``N_order``."""
    half = (order + 1) / 2
    return [(half - i, (-1) ** i * math.comb(order + 1, i) / math.factorial(order))
            for i in range(math.ceil(half))]


def _chunk_rows(x: torch.Tensor, n_bases: int) -> int:
    if x.device.type != "cpu":
        return max(1, x.shape[0])
    return max(1, CHUNK_ELEMENTS // (n_bases * x.shape[1]))


def uniform_basis(x: torch.Tensor, t0: torch.Tensor, inv_h: torch.Tensor, n_bases: int, order: int,
                  with_slopes: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bases ``B_j(x_i)`` of shape ``(batch, n_bases, in)`` on the uniform knots ``t0 + m / inv_h``.

    With ``with_slopes``, also ``S`` of the same shape with ``dB_j/dx_i = -inv_h[i] * S[b, j, i]``.
    """
    bases = x.new_empty(x.shape[0], n_bases, x.shape[1])
    slopes = torch.empty_like(bases) if with_slopes else None
    centres = torch.arange(n_bases, dtype=x.dtype, device=x.device).add_((order + 1) / 2).view(-1, 1)
    terms = _terms(order)
    step = _chunk_rows(x, n_bases)
    for start in range(0, x.shape[0], step):
        rows = slice(start, start + step)
        cell, frac = cell_coordinates(x[rows], t0, inv_h)
        offset = (cell.unsqueeze(1) - centres).add_(frac.unsqueeze(1))  # t - half, t = u - j
        r = offset.abs()
        for n, (shift, coef) in enumerate(terms):
            q = torch.rsub(r, shift).clamp_(min=0)
            if with_slopes:  # d/dt of (shift - |t - half|)_+^k is -sign(t - half) * k * q^(k-1)
                power = q if order == 2 else q * q if order == 3 else q.pow(order - 1)
                if n == 0:
                    torch.mul(power, coef * order, out=slopes[rows])
                else:
                    slopes[rows].add_(power, alpha=coef * order)
                q.mul_(power)
            else:
                q.pow_(order)
            if n == 0:
                torch.mul(q, coef, out=bases[rows])
            else:
                bases[rows].add_(q, alpha=coef)
        if with_slopes:
            slopes[rows].mul_(offset.sign_())
    return bases, slopes


def cell_coordinates(x: torch.Tensor, t0: torch.Tensor, inv_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``u = (x - t0) * inv_h`` split as ``cell + frac`` (``cell`` whole, ``0 <= frac < 1``), both in
    ``x``'s dtype; ``t0`` and ``inv_h`` come as float64 from ``grid_origin_and_scale``.

    Why the split, and float64 for it: ``u`` runs up to G + 2k, and in float32 it keeps only
    ~1e-7 (G + 2k) of a cell, which the bases then turn into errors growing with the grid size
    (2e-5 relative input gradients against the reference at G = 50). ``frac + (cell - centre)`` is
    exact to float32 rounding of a number below (k + 1) / 2, whatever G. The float64 work is one
    pass over ``(batch, in)``, not over the ``(batch, basis, in)`` bases."""
    u = (x.to(torch.float64) - t0) * inv_h
    cell = u.floor()
    return cell.to(x.dtype), (u - cell).to(x.dtype)


def triton_wanted() -> bool:
    """``KANFARM_TRITON`` (default on): 0, false, no or off turn the fused kernels off; any other
    value than those and 1, true, yes, on is refused, so a typo cannot leave them silently on."""
    from kanfarm.settings import env_flag

    return env_flag("KANFARM_TRITON", True)


def fused_kernels_apply(x: torch.Tensor) -> bool:
    """True when kanfarm's Triton kernels take ``x`` (the spline bases here, a pack's optimiser
    step in ``packing.optim``): float32 CUDA tensor, Triton importable, ``KANFARM_TRITON`` not
    0/false/no/off."""
    if not (x.is_cuda and x.dtype == torch.float32) or not triton_wanted():
        return False
    try:
        import kanfarm.models.triton_spline  # noqa: F401  (Triton importable?)
    except ImportError:
        return False
    return True


def bases_for_training(x: torch.Tensor, t0: torch.Tensor, inv_h: torch.Tensor, n_bases: int, order: int,
                       input_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bases ``(batch, n_bases, in)`` and what ``input_grad_from_bases`` needs later (None when no
    input gradient is wanted): ``x`` itself on the fused CUDA path, the slopes otherwise (from one
    compiled loop for large CPU blocks, see ``compiled_spline``)."""
    if fused_kernels_apply(x):
        from kanfarm.models.triton_spline import fused_bases

        return fused_bases(x, t0, inv_h, n_bases, order), (x if input_grad else None)
    if compiled_spline.applies(x, n_bases):
        return compiled_spline.compiled_bases(x, t0, inv_h, n_bases, order, with_slopes=input_grad)
    return uniform_basis(x, t0, inv_h, n_bases, order, with_slopes=input_grad)


def input_grad_from_bases(grad_bases: torch.Tensor, saved: torch.Tensor, t0: torch.Tensor, inv_h: torch.Tensor,
                          order: int) -> torch.Tensor:
    """``dL/dx`` from ``dL/dB`` (``(batch, n_bases * in)``, overwritten) and ``bases_for_training``'s
    saved tensor (``x`` on the fused path, else slopes ``(batch, n_bases, in)``)."""
    if saved.dim() == 2:
        from kanfarm.models.triton_spline import fused_input_grad

        return fused_input_grad(grad_bases, saved, t0, inv_h, order)
    return grad_bases.view(saved.shape).mul_(saved).sum(dim=1).mul_(-inv_h.to(saved.dtype))


def grid_origin_and_scale(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t_0`` and ``1 / h`` per input of a uniform grid (shape ``(in, G + 2k + 1)``), in float64
    whatever the grid's dtype (see ``cell_coordinates``)."""
    n_cells = grid.shape[1] - 1
    grid = grid.to(torch.float64)
    return grid[:, 0].contiguous(), n_cells / (grid[:, -1] - grid[:, 0])


class UniformSplineLinear(torch.autograd.Function):
    """``bases(x) @ weight.T`` with ``weight`` of shape ``(out, n_bases * in)`` in ``(basis, in)`` order.

    Saves the bases (for the weight gradient) and their slopes (for the input gradient), nothing else.
    """

    @staticmethod
    def forward(ctx, x, weight, t0, inv_h, order: int):
        n_bases = weight.shape[1] // x.shape[1]
        bases, saved = bases_for_training(x, t0, inv_h, n_bases, order, ctx.needs_input_grad[0])
        ctx.save_for_backward(weight, t0, inv_h, bases, saved)
        ctx.order = order
        return bases.view(x.shape[0], -1) @ weight.t()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        weight, t0, inv_h, bases, saved = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad_out.t() @ bases.view(bases.shape[0], -1)
        if ctx.needs_input_grad[0]:
            if saved.is_cpu and saved.dim() == 3:
                grad_x = _input_grad(grad_out, weight, saved).mul_(-inv_h.to(saved.dtype))
            else:  # saved is x on the fused CUDA path, slopes on other devices
                grad_x = input_grad_from_bases(grad_out @ weight, saved, t0, inv_h, ctx.order)
        return grad_x, grad_weight, None, None, None


def _input_grad(grad_out: torch.Tensor, weight: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """On the CPU: ``sum_j (grad_out @ weight_j) * slopes[:, j]``, one basis ``j`` (a ``(batch, in)``
    block of the products) at a time: the full ``(batch, n_bases * in)`` gradient of the bases
    never exists (no fresh pages to fault in), and each product stays large (row chunks of it ran
    at half the speed on 2 CPU threads)."""
    batch, n_bases, n_in = slopes.shape
    result = torch.mm(grad_out, weight[:, :n_in]).mul_(slopes[:, 0])
    buffer = torch.empty_like(result)
    for j in range(1, n_bases):
        torch.mm(grad_out, weight[:, j * n_in:(j + 1) * n_in], out=buffer)
        result.addcmul_(buffer, slopes[:, j])
    return result


def uniform_spline_linear(x: torch.Tensor, weight: torch.Tensor, grid: torch.Tensor, order: int,
                          origin_scale: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Spline branch ``sum_{i,j} B_j(x_i) weight[o, i, j]`` on a uniform ``grid``; ``weight`` is ``(out, in, n_bases)``.
    ``origin_scale``: ``grid_origin_and_scale(grid)`` if the caller keeps it."""
    if not closed_form_applies(order):
        raise ValueError(f"the closed-form path needs spline order 2..{MAX_ORDER}, got {order}")
    out_features, in_features, n_bases = weight.shape
    t0, inv_h = grid_origin_and_scale(grid) if origin_scale is None else origin_scale
    weight_ji = weight.transpose(1, 2).reshape(out_features, n_bases * in_features)
    return UniformSplineLinear.apply(x, weight_ji, t0, inv_h, order)
