"""The fused Triton kernels compute what the eager closed form and the Cox-de Boor reference compute.

They run here on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set before the
kernels are defined); on CUDA the same kernels are compiled (checked by ``benchmarks/kan_layer.py``).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # noqa: E402  (read when the kernels are decorated)

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("CI", "").lower() != "true":
    pytest.importorskip("triton")
from kanfarm.models import uniform_spline  # noqa: E402
from kanfarm.models.bspline import cox_de_boor_basis, uniform_knots  # noqa: E402
from kanfarm.models.triton_spline import fused_bases, fused_input_grad  # noqa: E402
from kanfarm.models.uniform_spline import grid_origin_and_scale, uniform_basis  # noqa: E402
from kanfarm.packing.stacked import StackedSpline  # noqa: E402
from tests.test_kan_fast import assert_same, forward_backward, inputs, pair  # noqa: E402


def points(grid: torch.Tensor, batch: int, seed: int) -> torch.Tensor:
    """Inside the range, far outside it, and exactly on knots (t_0 and the last knot included)."""
    g = torch.Generator().manual_seed(seed)
    n_in = grid.shape[0]
    x = torch.rand(batch, n_in, generator=g) * 2 - 1
    x[: batch // 3] *= 3
    x[-(batch // 3):] = grid[torch.arange(n_in), torch.randint(0, grid.shape[1], (batch // 3, n_in), generator=g)]
    return x


@pytest.mark.parametrize("order", [2, 3, 4, 5])
@pytest.mark.parametrize("grid_size,n_in,batch", [(5, 37, 19), (3, 130, 9), (10, 5, 12)])
def test_fused_bases_and_input_grad_match_eager_and_reference(order, grid_size, n_in, batch):
    grid = uniform_knots(n_in, grid_size, order, (-1.0, 1.0))
    t0, inv_h = grid_origin_and_scale(grid)
    n_bases = grid_size + order
    x = points(grid, batch, seed=order * 100 + n_in)
    eager, slopes = uniform_basis(x, t0, inv_h, n_bases, order, with_slopes=True)
    fused = fused_bases(x, t0, inv_h, n_bases, order)
    reference = cox_de_boor_basis(x.double(), grid.double(), order).transpose(1, 2)
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(fused.double(), reference, rtol=0, atol=2e-6)

    grad_bases = torch.randn(batch, n_bases * n_in, generator=torch.Generator().manual_seed(1))
    expected = (grad_bases.view(batch, n_bases, n_in) * slopes).sum(dim=1) * -inv_h.float()
    got = fused_input_grad(grad_bases, x, t0, inv_h, order)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_fused_kernels_write_every_element():
    grid = uniform_knots(33, 5, 3, (-1.0, 1.0))
    t0, inv_h = grid_origin_and_scale(grid)
    x = torch.rand(17, 33, generator=torch.Generator().manual_seed(5)) * 2 - 1  # inside the grid range
    out = fused_bases(x, t0, inv_h, 8, 3)
    assert out.shape == (17, 8, 33) and torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(dim=1), torch.ones(17, 33), rtol=0, atol=1e-5)  # partition of unity
    assert fused_bases(x[:0], t0, inv_h, 8, 3).shape == (0, 8, 33)


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """Route the fast path through the kernels for CPU tensors (the interpreter runs them)."""
    monkeypatch.setattr(uniform_spline, "fused_kernels_apply", lambda x: x.dtype == torch.float32)


@pytest.mark.parametrize("order", [2, 3, 5])
def test_layer_on_fused_path_equals_reference(fused_on_cpu, order):
    ref, fast = pair(11, 6, 5, order)
    x = inputs(ref, 40)
    assert_same(forward_backward(fast, x), forward_backward(ref, x))


def test_first_layer_on_fused_path_gives_reference_weight_gradients(fused_on_cpu):
    """x needs no gradient (data): only the bases are built and kept, the weight gradients stay right."""
    ref, fast = pair(9, 4, 5, 3)
    x = inputs(ref, 24)
    grads = []
    for layer in (ref, fast):
        out = layer(x)
        params = [layer.base_weight, layer.spline_weight, layer.spline_scaler]
        grads.append([out.detach(), *torch.autograd.grad(out, params, torch.ones_like(out))])
    for a, b in zip(*reversed(grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("shared", [True, False])
def test_stacked_spline_fused_equals_eager(monkeypatch, shared):
    members, batch, n_in, out_f, order = 3, 10, 7, 4, 3
    grid = uniform_knots(n_in, 5, order, (-1.0, 1.0))
    t0, inv_h = grid_origin_and_scale(grid)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand((batch, n_in) if shared else (members, batch, n_in), generator=g) * 2.4 - 1.2
    w0 = torch.randn(members, out_f, 8 * n_in, generator=g)
    upstream = torch.randn(members, batch, out_f, generator=g)

    def run():
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        out = StackedSpline.apply(x, w, t0, inv_h, order)
        return [out.detach(), *torch.autograd.grad(out, [x, w], upstream)]

    eager = run()
    monkeypatch.setattr(uniform_spline, "fused_kernels_apply", lambda x: True)
    fused = run()
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
