"""KANLinear layout and formula, networks, MLP-Wide matching, parameter counts and inits."""
from __future__ import annotations

import dataclasses

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kanfarm.config import RunConfig
from kanfarm.models import (KANLinear, build_model, count_params, cox_de_boor_basis, model_widths,
                            param_count)
from kanfarm.models.activations import Cos
from kanfarm.models.presets import DEPTH_WIDTHS
from kanfarm.models.widths import kan_params, mlp_params

FEATURES = {"digits": 64, "mnist": 784, "fashion-mnist": 784, "imdb": 100, "cifar10": 3072, "higgs": 28}


def test_kanlinear_state_dict_is_efficient_kan_layout():
    layer = KANLinear(6, 4, grid_size=5, spline_order=3)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"base_weight": (4, 6), "spline_weight": (4, 6, 8), "spline_scaler": (4, 6), "grid": (6, 12)}
    h = 2 / 5
    expected_knots = torch.tensor([-1 + j * h for j in range(-3, 9)])
    torch.testing.assert_close(layer.grid, expected_knots.expand(6, -1), rtol=0, atol=1e-6)


def test_foreign_state_dict_loads_and_gives_the_documented_formula():
    torch.manual_seed(0)
    state = {"base_weight": torch.randn(3, 5), "spline_weight": torch.randn(3, 5, 7),
             "spline_scaler": torch.randn(3, 5),
             "grid": (torch.arange(-2, 8) * 0.5 - 1.5).expand(5, -1).contiguous()}  # G=5 on [-1.5, 1]
    layer = KANLinear(5, 3, grid_size=5, spline_order=2, base_activation=nn.SiLU)
    layer.load_state_dict(state)
    x = torch.rand(20, 5) * 3 - 1.5
    bases = cox_de_boor_basis(x.double(), state["grid"].double(), 2)
    spline = torch.einsum("bij,oij,oi->bo", bases, state["spline_weight"].double(), state["spline_scaler"].double())
    expected = F.silu(x.double()) @ state["base_weight"].double().t() + spline
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fast", [True, False])
def test_outside_the_grid_only_the_base_branch_remains(fast):
    layer = KANLinear(4, 2, fast=fast)
    with torch.no_grad():
        layer.spline_weight.normal_()
    x = torch.tensor([[5.0, -7.0, 2.21, -2.3]])  # beyond lo - k h = -2.2 and hi + k h = 2.2
    torch.testing.assert_close(layer(x), F.gelu(x) @ layer.base_weight.t())


def test_activation_by_name_class_or_module():
    assert isinstance(KANLinear(2, 2).base_activation, nn.GELU)
    assert isinstance(KANLinear(2, 2, base_activation="cos").base_activation, Cos)
    assert isinstance(KANLinear(2, 2, base_activation=nn.ELU).base_activation, nn.ELU)
    module = nn.SiLU()
    assert KANLinear(2, 2, base_activation=module).base_activation is module
    with pytest.raises(ValueError):
        KANLinear(2, 2, base_activation="tanh")


def test_update_grid_keeps_the_function_on_the_data():
    torch.manual_seed(0)
    layer = KANLinear(6, 4)
    with torch.no_grad():
        layer.spline_weight.normal_()
    x = torch.rand(2000, 6) * 1.8 - 0.9
    before = layer(x).detach()
    stale = KANLinear(6, 4)
    stale.load_state_dict(layer.state_dict())
    layer.update_grid(x)
    after = layer(x).detach()
    assert not torch.allclose(layer.grid, stale.grid)
    assert bool((layer.grid[:, 3] <= x.min(0).values).all() and (layer.grid[:, -4] >= x.max(0).values).all())
    change = (after - before).abs().max() / before.abs().max()
    assert change < 0.02
    # the refit is what keeps it: the old coefficients on the new knots give another function
    with torch.no_grad():
        stale.grid.copy_(layer.grid)
    assert (stale(x).detach() - before).abs().max() / before.abs().max() > 10 * change


@pytest.mark.parametrize("case", ["one row", "constant input", "binary input", "3 rows"])
def test_update_grid_keeps_the_spline_when_an_input_has_fewer_values_than_bases(case):
    """The refit is rank-deficient there (G + k = 8 bases, fewer distinct values): it must still
    reproduce the old spline on x, not zero it (the default lstsq drivers did)."""
    torch.manual_seed(1)
    layer = KANLinear(3, 2)
    with torch.no_grad():
        layer.spline_weight.normal_()
    x = torch.rand(256, 3) * 1.6 - 0.8
    if case == "one row":
        x = x[:1]
    elif case == "3 rows":
        x = x[:3]
    elif case == "constant input":
        x[:, 0] = 0.3
    else:
        x[:, 0] = (x[:, 0] > 0).float()
    spline = lambda: torch.einsum("bij,oij->bio", layer.spline_bases(x), layer.scaled_spline_weight)
    with torch.no_grad():
        before = spline()
        layer.update_grid(x)
        after = spline()
    # input 0 has fewer distinct values than bases in every case: its old spline is representable
    # on the new knots, so the fit must keep it (the other inputs' fit is least squares, ~1e-2 off)
    assert before[:, 0].abs().max() > 0.05  # there is a spline to lose
    assert torch.allclose(after[:, 0], before[:, 0], rtol=0, atol=1e-6)


def test_update_grid_refuses_knots_that_collapse_in_float32():
    layer = KANLinear(2, 2)
    x = torch.randn(64, 2)
    x[:, 0] = 5000.0  # knot spacing 8e-5 there: below float32's resolution at 5000
    grid, weight = layer.grid.clone(), layer.spline_weight.detach().clone()
    with pytest.raises(ValueError, match="repeated knots in torch.float32"):
        layer.update_grid(x)
    assert torch.equal(layer.grid, grid) and torch.equal(layer.spline_weight, weight)  # untouched


def widths_of(model: nn.Module) -> list[int]:
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, KANLinear))]
    return [layers[0].in_features, *(m.out_features for m in layers)]


@pytest.mark.parametrize("model", ["kan", "mlp", "mlp_wide"])
@pytest.mark.parametrize("dataset", sorted(DEPTH_WIDTHS))
def test_param_count_matches_built_model(model, dataset):
    for depth in ("shallow", "medium", "deep"):
        config = RunConfig(dataset=dataset, model=model, depth=depth, grid_size=4, spline_order=2)
        widths = model_widths(config, FEATURES[dataset], 10)
        if dataset == "cifar10" and model == "kan" and depth == "deep":
            continue  # 17M parameters: the formula is checked on the smaller ones
        built = build_model(config, FEATURES[dataset], 10)
        assert widths_of(built) == widths
        assert count_params(built) == param_count(config, FEATURES[dataset], 10)


def test_mnist_shallow_kan_has_254080_parameters():
    config = RunConfig(dataset="mnist", model="kan", depth="shallow")
    assert model_widths(config, 784, 10) == [784, 32, 10]
    assert param_count(config, 784, 10) == 254_080
    assert count_params(build_model(config, 784, 10)) == 254_080


@pytest.mark.parametrize("dataset", sorted(DEPTH_WIDTHS))
@pytest.mark.parametrize("depth", ["shallow", "medium", "deep"])
@pytest.mark.parametrize("order", [2, 3, 5])
def test_mlp_wide_within_two_percent_of_kan(dataset, depth, order):
    kan = param_count(RunConfig(dataset=dataset, model="kan", depth=depth, spline_order=order), FEATURES[dataset], 10)
    wide_config = RunConfig(dataset=dataset, model="mlp_wide", depth=depth, spline_order=order)
    wide = param_count(wide_config, FEATURES[dataset], 10)
    assert abs(wide - kan) / kan <= 0.02
    base = model_widths(RunConfig(dataset=dataset, model="mlp", depth=depth), FEATURES[dataset], 10)
    ratios = [w / b for w, b in zip(model_widths(wide_config, FEATURES[dataset], 10)[1:-1], base[1:-1])]
    assert max(ratios) - min(ratios) <= 2 / min(base[1:-1])  # one factor, up to rounding


def test_mlp_wide_fixed_multiplier():
    config = RunConfig(dataset="mnist", model="mlp_wide", depth="deep", wide_multiplier=10)
    assert model_widths(config, 784, 10) == [784, 1280, 640, 320, 10]
    assert count_params(build_model(config, 784, 10)) == param_count(config, 784, 10)


@pytest.mark.parametrize("model", ["kan", "mlp", "mlp_wide"])
def test_blocks_produce_unactivated_logits(model):
    torch.manual_seed(0)
    config = RunConfig(dataset="digits", model=model, depth="medium", activation="relu")
    net = build_model(config, 64, 10).eval()
    assert len(net.blocks) == 3
    assert type(net.blocks[-1]) is (KANLinear if model == "kan" else nn.Linear)
    x = torch.rand(256, 64) * 2 - 1
    h = x
    for block in net.blocks:
        h = block(h)
    logits = net(x)
    torch.testing.assert_close(logits, h)
    assert (logits < 0).any() and (logits > 0).any()


@pytest.mark.parametrize("model", ["kan", "mlp", "mlp_wide"])
def test_batch_norm_follows_each_hidden_layer_and_is_counted(model):
    """FACTS.md: batch norm on CIFAR-10. After every hidden layer (before the MLP's activation),
    never after the output; its scale and shift count as parameters, and MLP-Wide matches the
    KAN with batch norm."""
    config = RunConfig(dataset="cifar10", model=model, depth="medium", batch_norm=True)
    net = build_model(config, 3072, 10)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm1d)]
    widths = model_widths(config, 3072, 10)
    assert [n.num_features for n in norms] == widths[1:-1]
    assert not isinstance(net.blocks[-1], nn.Sequential)
    plain = kan_params(widths, 5, 3) if model == "kan" else mlp_params(widths)
    assert count_params(net) == param_count(config, 3072, 10) == plain + 2 * sum(widths[1:-1])
    if model == "mlp":
        assert isinstance(net.blocks[0][1], nn.BatchNorm1d)  # Linear, BatchNorm1d, activation, Dropout
    if model == "mlp_wide":
        kan = param_count(dataclasses.replace(config, model="kan"), 3072, 10)
        assert abs(count_params(net) - kan) / kan <= 0.001
    torch.manual_seed(0)
    h = net.blocks[0](torch.rand(64, 3072) * 2 - 1)  # training mode: normalised over the batch
    if model == "kan":
        torch.testing.assert_close(h.mean(dim=0), torch.zeros(h.shape[1]), atol=1e-5, rtol=0)
    assert RunConfig(dataset="cifar10", model=model).config_hash() == RunConfig(
        dataset="cifar10", model=model, batch_norm=False).config_hash() != config.config_hash()


def test_dropout_only_in_mlp_hidden_blocks():
    mlp = build_model(RunConfig(dataset="mnist", model="mlp", depth="deep", dropout=0.3), 784, 10)
    drops = [m for m in mlp.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 3 and all(d.p == 0.3 for d in drops)
    assert not isinstance(mlp.blocks[-1], nn.Sequential)
    kan = build_model(RunConfig(dataset="mnist", model="kan", depth="deep", dropout=0.3), 784, 10)
    assert not any(isinstance(m, nn.Dropout) for m in kan.modules())


@pytest.mark.parametrize("activation,kind", [("relu", nn.ReLU), ("gelu", nn.GELU), ("silu", nn.SiLU),
                                             ("elu", nn.ELU), ("cos", Cos)])
def test_activations(activation, kind):
    mlp = build_model(RunConfig(dataset="digits", model="mlp", activation=activation), 64, 10)
    kan = build_model(RunConfig(dataset="digits", model="kan", activation=activation), 64, 10)
    assert isinstance(mlp.blocks[0][1], kind)
    assert all(isinstance(b.base_activation, kind) for b in kan.blocks)


def test_default_activations_from_unnormalised_config():
    kan = build_model(RunConfig(dataset="digits", model="kan"), 64, 10)
    mlp = build_model(RunConfig(dataset="digits", model="mlp"), 64, 10)
    assert isinstance(kan.blocks[0].base_activation, nn.GELU)
    assert isinstance(mlp.blocks[0][1], nn.ReLU)


@pytest.mark.parametrize("init", ["kaiming_normal", "kaiming_uniform", "orthogonal"])
@pytest.mark.parametrize("model", ["kan", "mlp"])
def test_inits_are_deterministic_under_a_seed(init, model):
    config = RunConfig(dataset="digits", model=model, depth="medium", init=init)

    def build(seed):
        torch.manual_seed(seed)
        return build_model(config, 64, 10).state_dict()

    a, b, c = build(3), build(3), build(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("weight") or k.endswith("scaler"))


def test_init_schemes_shape_the_weights():
    torch.manual_seed(0)
    ortho = RunConfig(dataset="digits", model="mlp", hidden_widths=(64,), init="orthogonal")
    w = build_model(ortho, 512, 10).blocks[0][0].weight  # (64, 512): orthonormal rows
    torch.testing.assert_close(w @ w.t(), torch.eye(64), rtol=0, atol=1e-4)
    normal = RunConfig(dataset="digits", model="mlp", hidden_widths=(64,), init="kaiming_normal")
    mlp = build_model(normal, 512, 10)
    assert mlp.blocks[0][0].weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.03)
    assert not any(m.bias.any() for m in mlp.modules() if isinstance(m, nn.Linear))
    kan = build_model(RunConfig(dataset="mnist", model="kan", init="kaiming_uniform"), 784, 10)
    layer = kan.blocks[0]
    bound = math.sqrt(6 / 784)
    for t in (layer.base_weight, layer.spline_scaler):
        assert t.abs().max().item() <= bound and t.abs().max().item() > 0.95 * bound
    assert layer.spline_weight.abs().max().item() <= 0.05 / 5 + 1e-9


def test_kan_spline_weights_start_as_symmetric_uniform_noise():
    """Spline coefficients are uniform in +-noise/(2G), centred on 0: a one-sided draw biases every spline."""
    torch.manual_seed(0)
    w = KANLinear(784, 32, grid_size=5, spline_noise=0.1).spline_weight.detach().double()
    bound = 0.1 / (2 * 5)
    assert w.abs().max().item() <= bound + 1e-9
    assert w.min().item() < -0.9 * bound and w.max().item() > 0.9 * bound
    standard_error = bound / math.sqrt(3 * w.numel())  # std of U(-b, b) is b / sqrt(3)
    assert abs(w.mean().item()) < 10 * standard_error
