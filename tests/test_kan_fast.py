"""The fast KAN layer computes what the reference (autograd through Cox-de Boor) computes."""
from __future__ import annotations

import pytest
import torch

from kanfarm.models import KANLinear
from kanfarm.models.uniform_spline import UniformSplineLinear, grid_origin_and_scale


def pair(in_features, out_features, grid_size, order, seed=0, dtype=torch.float32):
    """A reference layer and a fast copy, with O(1) spline coefficients so the spline term matters."""
    torch.manual_seed(seed)
    ref = KANLinear(in_features, out_features, grid_size, order, fast=False).to(dtype)
    with torch.no_grad():
        ref.spline_weight.normal_()
        ref.spline_scaler.normal_()
    fast = KANLinear(in_features, out_features, grid_size, order, fast=True).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def inputs(layer: KANLinear, batch: int, seed=1, dtype=torch.float32) -> torch.Tensor:
    """Points inside the range, in the extended cells, outside every knot, and exactly on knots."""
    g = torch.Generator().manual_seed(seed)
    grid = layer.grid.to(dtype)
    x = torch.rand(batch, layer.in_features, generator=g, dtype=dtype) * 2 - 1
    n = batch // 4
    x[:n] *= 1.2 + grid[:, -1].abs().max()                                  # reaches outside the knots
    x[n:2 * n] = grid[:, torch.randint(0, grid.shape[1], (n,), generator=g)].t()  # on knots, t_0 and t_last too
    return x


def forward_backward(layer: KANLinear, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    g = torch.Generator().manual_seed(3)
    upstream = torch.randn(out.shape, generator=g, dtype=out.dtype)
    params = [layer.base_weight, layer.spline_weight, layer.spline_scaler]
    grads = torch.autograd.grad(out, [x, *params], upstream)
    return [out.detach(), *grads]


def assert_same(fast_results, ref_results, tol=1e-5):
    names = ["output", "grad x", "grad base_weight", "grad spline_weight", "grad spline_scaler"]
    for name, a, b in zip(names, fast_results, ref_results):
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("grid_size", [3, 5, 10, 50, 100])
def test_fast_equals_reference_float32(order, grid_size):
    """At every grid size: the closed form's grid coordinate is split into cell and fraction, so its
    rounding does not grow with G (it did: 2e-5 at G = 50)."""
    ref, fast = pair(7, 5, grid_size, order)
    assert fast.uses_fast_path() == (order >= 2)
    assert not ref.uses_fast_path()
    x = inputs(ref, 96)
    assert_same(forward_backward(fast, x), forward_backward(ref, x))


@pytest.mark.parametrize("order", [8, 32])
def test_high_orders_take_the_reference_recursion(order):
    """The closed form's alternating sum loses float32 digits as the order grows (NaN from 32):
    above MAX_ORDER the layer computes the reference's bases, finite and equal to it."""
    from kanfarm.models.uniform_spline import MAX_ORDER

    assert MAX_ORDER < order
    ref, fast = pair(7, 5, 5, order)
    assert not fast.uses_fast_path()
    x = inputs(ref, 96)
    results = forward_backward(fast, x)
    assert all(bool(torch.isfinite(r).all()) for r in results)
    assert_same(results, forward_backward(ref, x))


def test_fast_equals_reference_float64_tightly():
    ref, fast = pair(6, 4, 5, 3, dtype=torch.float64)
    x = inputs(ref, 64, dtype=torch.float64)
    assert_same(forward_backward(fast, x), forward_backward(ref, x), tol=1e-12)


def test_batches_larger_than_one_chunk(monkeypatch):
    import kanfarm.models.uniform_spline as us
    monkeypatch.setattr(us, "CHUNK_ELEMENTS", 64)  # forces many small chunks
    ref, fast = pair(5, 3, 5, 3)
    x = inputs(ref, 50)
    assert_same(forward_backward(fast, x), forward_backward(ref, x))


def test_per_input_uniform_grids_after_update_grid_use_fast_path():
    ref, fast = pair(4, 3, 5, 3)
    data = torch.rand(500, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0]) - 0.5
    for layer in (ref, fast):
        layer.update_grid(data, grid_eps=1.0)  # uniform per input, different ranges
    assert fast.uses_fast_path()
    assert_same(forward_backward(fast, inputs(ref, 64)), forward_backward(ref, inputs(ref, 64)))


def test_the_fast_path_follows_a_grid_changed_after_use():
    """The grid's origin and spacing are kept between forwards: a grid moved in place (to
    other uniform knots), or a new grid tensor, must not be computed with the old ones."""
    ref, fast = pair(4, 3, 5, 3)
    x = inputs(ref, 64)
    assert_same(forward_backward(fast, x), forward_backward(ref, x))  # fills the cache
    data = torch.rand(500, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0]) - 0.5
    for layer in (ref, fast):
        layer.update_grid(data, grid_eps=1.0)
    assert fast.uses_fast_path()
    assert_same(forward_backward(fast, x), forward_backward(ref, x))
    wider = KANLinear(4, 3, 5, 3, grid_range=(-3.0, 3.0)).grid
    for layer in (ref, fast):
        layer.grid = wider.clone()  # a new tensor, not an in-place change
    assert_same(forward_backward(fast, x), forward_backward(ref, x))


def test_non_uniform_grid_falls_back_to_reference():
    ref, fast = pair(4, 3, 5, 3)
    data = torch.rand(500, 4) ** 3 * 2 - 1
    for layer in (ref, fast):
        layer.update_grid(data)
    assert not fast.uses_fast_path()
    x = inputs(ref, 64)
    assert_same(forward_backward(fast, x), forward_backward(ref, x))
    with torch.no_grad():  # the cache follows in-place changes of the grid
        fast.grid.copy_(KANLinear(4, 3).grid)
    assert fast.uses_fast_path()


def test_leading_dimensions():
    ref, fast = pair(4, 3, 5, 2)
    x = torch.rand(2, 5, 4) * 2 - 1
    assert fast(x).shape == (2, 5, 3)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


def test_hand_written_backward_passes_gradcheck():
    torch.manual_seed(0)
    layer = KANLinear(3, 2, 4, 3).double()
    x = (torch.rand(6, 3, dtype=torch.float64) * 2.4 - 1.2).requires_grad_(True)
    n_bases = layer.grid_size + layer.spline_order
    weight = torch.randn(2, n_bases * 3, dtype=torch.float64, requires_grad=True)
    t0, inv_h = grid_origin_and_scale(layer.grid)
    assert torch.autograd.gradcheck(lambda a, w: UniformSplineLinear.apply(a, w, t0, inv_h, 3), (x, weight))


def test_triton_switch_reads_the_usual_spellings_and_refuses_others(monkeypatch):
    from kanfarm.config import ConfigError
    from kanfarm.models.uniform_spline import triton_wanted

    for value, wanted in [("0", False), ("off", False), ("False", False), ("no", False), ("1", True), ("on", True)]:
        monkeypatch.setenv("KANFARM_TRITON", value)
        assert triton_wanted() is wanted, value
    monkeypatch.delenv("KANFARM_TRITON")
    assert triton_wanted()
    monkeypatch.setenv("KANFARM_TRITON", "maybe")
    with pytest.raises(ConfigError, match="KANFARM_TRITON"):
        triton_wanted()


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
def test_non_finite_inputs_give_nan_on_both_paths(value):
    """An overflowed activation must not read as a finite output on one path only (with ELU,
    whose base branch is finite at -inf, the closed form used to give every basis 0 there)."""
    ref, fast = pair(2, 1, 5, 3)
    ref.base_activation = fast.base_activation = torch.nn.ELU()
    x = torch.tensor([[value, 0.3]])
    for layer in (ref, fast):
        out, grad_x = forward_backward(layer, x)[:2]
        assert torch.isnan(out).all() and torch.isnan(grad_x[:, 0]).all() and torch.isfinite(grad_x[:, 1]).all()
