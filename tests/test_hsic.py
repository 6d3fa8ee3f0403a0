"""HSIC Bottleneck: kernel maths against the direct float64 formula, gradients, training, resume."""
from __future__ import annotations

import dataclasses

import math

import numpy as np
import pytest
import torch

from kanfarm.config import RunConfig
from kanfarm.models import build_model
from kanfarm.training.hsic import (HSICBottleneck, HSICSettings, gaussian_kernel, hsic_step, hsic_terms, nhsic,
                                   phase)
from kanfarm.training.hsic_kernels import (_cholesky_ex, centred_gaussian_kernel, full_target,
                                           label_target, layer_terms, tril_inverse)


@pytest.fixture(autouse=True)
def one_thread():
    """Small matrices: one thread is fastest, and immune to a busy shared CPU (OpenMP spin-waits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def direct_kernel(a: np.ndarray, sigma: float) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    d = a.shape[1]
    dist = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    return np.exp(-dist / (2 * sigma**2 * d))


def direct_nhsic(kx: np.ndarray, ky: np.ndarray, eps: float = 1e-5) -> float:
    """The formula as written: explicit H, explicit inverse, float64."""
    m = kx.shape[0]
    h = np.eye(m) - np.ones((m, m)) / m

    def r(k):
        kc = h @ k @ h
        return kc @ np.linalg.inv(kc + eps * m * np.eye(m))

    return float(np.trace(r(kx) @ r(ky)))


def h(m: int) -> np.ndarray:
    return np.eye(m) - np.ones((m, m)) / m


def onehot(y: torch.Tensor, c: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(y, c).double()


@pytest.mark.parametrize("m,sigma", [(16, 1.0), (100, 10.0), (200, 10.0), (200, 0.5)])
def test_kernel_and_nhsic_match_direct_formula(m, sigma):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 7, generator=g, dtype=torch.float64)
    z = torch.randn(m, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (m,), generator=g)
    kx_ref, kz_ref, ky_ref = (direct_kernel(v.numpy(), sigma) for v in (x, z, onehot(y, 5)))
    np.testing.assert_allclose(gaussian_kernel(x, sigma).numpy(), kx_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gaussian_kernel(x.float(), sigma).numpy(), kx_ref, rtol=1e-6)

    ref_zy, ref_zx = direct_nhsic(kz_ref, ky_ref), direct_nhsic(kz_ref, kx_ref)
    assert float(nhsic(gaussian_kernel(z, sigma), gaussian_kernel(onehot(y, 5), sigma))) == pytest.approx(ref_zy, rel=1e-6)
    assert float(nhsic(torch.from_numpy(kz_ref), torch.from_numpy(kx_ref))) == pytest.approx(ref_zx, rel=1e-6)
    # the trainer's fast paths: low-rank label target and full input target, layers of different
    # widths batched (z and z padded with a constant column: same distances, other width)
    np.testing.assert_allclose(centred_gaussian_kernel(z, sigma).numpy(), np.asarray(h(m) @ kz_ref @ h(m)), atol=1e-13)
    wide = torch.cat([z, torch.zeros(m, 2, dtype=torch.float64)], dim=1)
    (fast_y, fast_x), _ = layer_terms([z, wide], [label_target(y, 5, sigma), full_target(x, sigma)], sigma)
    ref_wide = direct_nhsic(direct_kernel(wide.numpy(), sigma), ky_ref)
    assert fast_y.tolist() == pytest.approx([ref_zy, ref_wide], rel=1e-6)
    assert fast_x.tolist()[0] == pytest.approx(ref_zx, rel=1e-6)


def test_nhsic_of_a_variable_with_itself_dominates_independent_pairs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 4, generator=g, dtype=torch.float64)
    w = torch.randn(256, 4, generator=g, dtype=torch.float64)
    k = lambda v: gaussian_kernel(v, 10.0)  # the study's width
    self_dep, indep = float(nhsic(k(x), k(x))), float(nhsic(k(x), k(w)))
    dependent = float(nhsic(k(x), k(x ** 2 + 0.1 * w)))  # dependent but uncorrelated
    assert self_dep > 20 * indep
    assert self_dep > dependent > 5 * indep


def test_stable_at_batch_2048_float32_features():
    """float32 activations at the full batch size: finite value in range, finite gradient."""
    g = torch.Generator().manual_seed(2)
    m = 2048
    z = torch.randn(m, 32, generator=g).requires_grad_()
    y = torch.randint(0, 10, (m,), generator=g)
    value = hsic_terms([z], None, y, 10, HSICSettings(beta=-1.0))[0]  # nHSIC(Z, Y) alone
    value.backward()
    assert math.isfinite(value.item()) and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert 0.0 < value.item() <= 9.0 + 1e-9  # trace(R_z R_y) <= rank(R_y) <= C - 1


def test_looped_factorisation_equals_batched_and_flags_failures():
    """CUDA factorises large matrices one at a time; the choice must not change the factor or which
    matrices lack one (info), including a batch holding a non-finite kernel."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(3, 40, 40, generator=g, dtype=torch.float64)
    a = a @ a.transpose(-1, -2) + 40 * torch.eye(40, dtype=torch.float64)
    a[1, 0, 0] = float("nan")
    batched, info_b = _cholesky_ex(a, looped=False)
    looped, info_l = _cholesky_ex(a, looped=True)
    assert info_l.shape == info_b.shape == (3,)
    assert info_l.tolist()[0] == info_l.tolist()[2] == 0 and info_l.tolist()[1] != 0
    assert (info_l == 0).tolist() == (info_b == 0).tolist()
    ok = info_b == 0
    torch.testing.assert_close(looped[ok], batched[ok], rtol=0, atol=1e-12)


@pytest.mark.parametrize("n,leaf", [(64, 8), (60, 8), (37, 4), (8, 8), (5, 8), (300, 128)])
def test_tril_inverse_matches_a_triangular_solve(n, leaf):
    """The doubling inverse (CUDA's way to solve with large factors), at sizes that split evenly,
    that need padding, and that fit one leaf; batched over a leading dimension."""
    g = torch.Generator().manual_seed(n)
    a = torch.randn(2, n, n, generator=g, dtype=torch.float64)
    factor = torch.linalg.cholesky(a @ a.transpose(-1, -2) / n + 0.5 * torch.eye(n, dtype=torch.float64))
    want = torch.linalg.solve_triangular(factor, torch.eye(n, dtype=torch.float64), upper=False)
    got = tril_inverse(factor, leaf=leaf)
    assert got.shape == (2, n, n)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tril_inverse(factor[1], leaf=leaf), want[1], rtol=1e-10, atol=1e-12)
    assert (got.triu(1) == 0).all()


def test_each_way_of_solving_gives_the_same_terms_and_gradients(monkeypatch):
    """CUDA solves with a batch of large factors one matrix at a time, and with the largest through
    their inverse: the trainer's losses and gradients (label and input terms), for one run and for a
    pack, are those of the batched triangular solves; a member with a non-finite activation gets NaN
    values and gradients either way, the others not."""
    from kanfarm.training import hsic_kernels

    class Stand:  # what the choices read of a tensor
        def __init__(self, device, m):
            self.device, self.shape = torch.device(device), (2, m, m)
    by_inverse, one_at_a_time = hsic_kernels._by_inverse, hsic_kernels._one_at_a_time
    assert [by_inverse(Stand(d, m)) for d, m in (("cuda", 2048), ("cuda", 2047), ("cpu", 4096))] == [True, False, False]
    assert [one_at_a_time(Stand(d, m), None) for d, m in (("cuda", 256), ("cuda", 255), ("cpu", 2048))] == [True, False, False]
    assert one_at_a_time(Stand("cpu", 8), True) is True and one_at_a_time(Stand("cuda", 4096), False) is False

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(48, 20, generator=g), torch.randint(0, 10, (48,), generator=g)
    for lead in ((), (3,)):
        z0 = [torch.randn(*lead, 48, 12, generator=g), torch.randn(*lead, 48, 6, generator=g)]

        def terms_and_grads():
            zs = [z.clone().requires_grad_(True) for z in z0]
            terms = hsic_terms(zs, x, y, 10, HSICSettings(x_term=True))
            terms.sum().backward()
            return terms.detach(), [z.grad for z in zs]
        monkeypatch.setattr(hsic_kernels, "_by_inverse", lambda factor: False)
        solved = terms_and_grads()
        calls = []
        monkeypatch.setattr(hsic_kernels, "_one_at_a_time", lambda a, looped: calls.append(a.shape) or True)
        looped = terms_and_grads()
        assert calls and all(shape[-1] == shape[-2] == 48 for shape in calls)  # the looped path ran
        monkeypatch.setattr(hsic_kernels, "_one_at_a_time", lambda a, looped: False)
        calls = []
        monkeypatch.setattr(hsic_kernels, "_by_inverse", lambda factor: calls.append(factor.shape) or True)
        inverted = terms_and_grads()
        assert calls and all(shape[-1] == shape[-2] == 48 for shape in calls)  # the inverse path ran
        assert inverted[0].shape == looped[0].shape == (2, *lead)
        for other in (looped, inverted):
            torch.testing.assert_close(other[0], solved[0], rtol=1e-10, atol=1e-12)
            for got, want in zip(other[1], solved[1]):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)

    for inverse in (False, True):  # diverging members of a pack: NaN all through, the others untouched
        monkeypatch.setattr(hsic_kernels, "_by_inverse", lambda factor: inverse)
        bad = torch.randn(4, 48, 5, generator=g).relu()
        bad[1, 7, 2], bad[2, 40, 0] = float("nan"), float("inf")
        bad[3, 3, 0] = 1e10  # finite, but its kernel does not factorise: a finite nHSIC of -1e17 unless caught
        bad.requires_grad_(True)
        terms = hsic_terms([bad], x, y, 10, HSICSettings(x_term=True))
        terms.sum().backward()
        assert torch.isfinite(terms[0, 0]) and torch.isnan(terms[0, 1:]).all()
        assert torch.isfinite(bad.grad[0]).all() and torch.isnan(bad.grad[1:]).all()
        outlier = x.clone()
        outlier[3, 0] = 1e10  # an input kernel that does not factorise: a NaN input target, not a wrong one
        assert torch.isnan(full_target(outlier, 10.0).r).all() and torch.isfinite(full_target(x, 10.0).r).all()


def test_closed_form_gradients_equal_autograd_through_the_formula():
    """The trainer's closed-form gradients (label and input terms, layers of different widths,
    float32 features) against autograd through the general ``nhsic`` (Cholesky solves, explicit
    kernels); and a kernel that does not keep the gradient."""
    g = torch.Generator().manual_seed(6)
    zs = [torch.randn(40, 9, generator=g), torch.randn(40, 3, generator=g)]
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 4, (40,), generator=g)
    settings = HSICSettings(beta=3.0, sigma=1.5, x_term=True, eps=1e-3)
    ours = [z.clone().requires_grad_(True) for z in zs]
    hsic_terms(ours, x, y, 4, settings).sum().backward()
    ky, kx = gaussian_kernel(onehot(y, 4), 1.5), gaussian_kernel(x, 1.5)
    for z, got in zip(zs, ours):
        ref = z.double().requires_grad_(True)
        kz = gaussian_kernel(ref, 1.5)
        (nhsic(kz, kx, 1e-3) - 3.0 * nhsic(kz, ky, 1e-3)).backward()
        assert got.grad.dtype == torch.float32
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-5, atol=1e-7)
    assert not centred_gaussian_kernel(ours[0], 1.0).requires_grad


def test_terms_compute_gradients_only_when_asked_and_to_first_order(monkeypatch):
    """No closed-form gradient is computed under no_grad; a second derivative is refused with an
    error, not silently zero."""
    from kanfarm.training import hsic_kernels
    g = torch.Generator().manual_seed(8)
    zs = [torch.randn(20, 4, generator=g, requires_grad=True)]
    y = torch.randint(0, 3, (20,), generator=g)
    calls = []
    real = hsic_kernels._kernel_grad
    monkeypatch.setattr(hsic_kernels, "_kernel_grad", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        hsic_terms(zs, None, y, 3, HSICSettings())
    assert calls == []
    terms = hsic_terms(zs, None, y, 3, HSICSettings())
    assert calls == [1]
    upstream = torch.ones_like(terms, requires_grad=True)  # as gradgradcheck differentiates
    (grad,) = torch.autograd.grad(terms, zs, upstream, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    w = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    pack = [torch.randn(2, 7, d, generator=g, dtype=torch.float64, requires_grad=True) for d in (3, 5)]
    for x_term in (False, True):
        settings = HSICSettings(beta=2.0, sigma=1.0, x_term=x_term, eps=1e-2)
        torch.autograd.gradcheck(lambda a, b: hsic_terms([a, b], x, y, 3, settings), (z, w))
        torch.autograd.gradcheck(lambda a, b: hsic_terms([a, b], x, y, 3, settings), pack)
    torch.autograd.gradcheck(lambda v: nhsic(gaussian_kernel(v, 1.0), gaussian_kernel(x, 1.0), 1e-2), (z,))


def test_kernel_keeps_precision_when_features_share_a_large_offset():
    """The |a|^2 + |b|^2 - 2ab expansion cancels when every row sits near the same far-off point."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(128, 32, generator=g, dtype=torch.float64) + 1e5
    y = torch.randint(0, 4, (128,), generator=g)
    kz_ref, ky_ref = direct_kernel(z.numpy(), 1.0), direct_kernel(onehot(y, 4).numpy(), 1.0)
    np.testing.assert_allclose(gaussian_kernel(z, 1.0).numpy(), kz_ref, rtol=1e-9)
    got = float(nhsic(gaussian_kernel(z, 1.0), gaussian_kernel(onehot(y, 4), 1.0)))
    assert got == pytest.approx(direct_nhsic(kz_ref, ky_ref), rel=1e-6)
    np.testing.assert_allclose(centred_gaussian_kernel(z, 1.0).numpy(), h(128) @ kz_ref @ h(128), atol=1e-9)
    (trainer,), _ = layer_terms([z], [label_target(y, 4, 1.0)], 1.0)  # the trainer's own kernel
    assert trainer.item() == pytest.approx(direct_nhsic(kz_ref, ky_ref), rel=1e-6)


@pytest.mark.parametrize("changes, field", [
    ({"hsic_format_epochs": 0}, "hsic_format_epochs"),             # the output layer would never train
    ({"hsic_sigma": 0.0}, "hsic_sigma"), ({"hsic_sigma": float("nan")}, "hsic_sigma"),
    ({"hsic_sigma": -10.0}, "hsic_sigma"), ({"hsic_beta": -100.0}, "hsic_beta"),
    ({"hsic_sigma": 1e-200}, "hsic_sigma"), ({"hsic_sigma": 1e300}, "hsic_sigma"),
    ({"hsic_beta": True}, "hsic_beta"), ({"hsic_x_term": "no"}, "hsic_x_term"),
])
def test_run_config_refuses_bad_hsic_settings(changes, field):
    from kanfarm.config import ConfigError

    with pytest.raises(ConfigError) as err:
        RunConfig(trainer="hsic", max_epochs=3, **changes).normalised()
    assert err.value.field == field
    # unused by backprop: reset to the defaults, not refused
    reset = RunConfig(trainer="backprop", max_epochs=3, **changes).normalised()
    assert reset == RunConfig(trainer="backprop", max_epochs=3).normalised()


def test_a_format_stage_as_long_as_the_run_is_refused_at_submission_but_loads_when_stored():
    """Earlier versions accepted it: such stored runs must still hash, load and pack."""
    from kanfarm.config import ConfigError
    from kanfarm.packing.planner import pack_key

    stored = RunConfig(trainer="hsic", max_epochs=5, hsic_format_epochs=5)
    assert stored.config_hash() and pack_key(stored)
    with pytest.raises(ConfigError) as err:
        stored.check_new()
    assert err.value.field == "hsic_format_epochs"


def test_grid_refuses_a_format_stage_as_long_as_the_run():
    from kanfarm.config import ConfigError
    from kanfarm.grids import parse_spec

    spec = {"name": "h", "datasets": ["digits"], "models": ["mlp"], "depths": ["shallow"], "trainers": ["hsic"],
            "inits": ["kaiming_normal"], "optimizers": ["adam"], "learning_rates": [1e-3], "seeds": [0],
            "epochs": 5, "hsic": {"format_epochs": 5}}
    with pytest.raises(ConfigError) as err:
        parse_spec(spec)
    assert err.value.field == "hsic.format_epochs"
    parse_spec({**spec, "hsic": {"format_epochs": 4}})
    parse_spec({**spec, "trainers": ["backprop"]})  # unused by backprop cells


def test_settings_from_config_take_each_hsic_field_from_its_own_config_field():
    """The trainer builds its settings this way: swapped or dropped fields would train silently wrong."""
    config = RunConfig(trainer="hsic", hsic_beta=3.0, hsic_sigma=7.0, hsic_x_term=True).normalised()
    settings = HSICSettings.from_config(config)
    assert (settings.beta, settings.sigma, settings.x_term) == (3.0, 7.0, True)
    default = HSICSettings.from_config(RunConfig(trainer="hsic").normalised())
    assert (default.beta, default.sigma, default.x_term) == (100.0, 10.0, False)


@pytest.mark.parametrize("x_term", [True, False])
def test_layer_loss_adds_the_x_term_and_subtracts_beta_times_the_label_term(x_term):
    """Each hidden layer minimises nHSIC(Z, X) - beta nHSIC(Z, Y) (FACTS.md); a sign slip reverses training."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(24, 6, generator=g, dtype=torch.float64)
    zs = [torch.randn(24, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    y = torch.randint(0, 3, (24,), generator=g)
    ky, kx = direct_kernel(onehot(y, 3).numpy(), 1.0), direct_kernel(x.numpy(), 1.0)
    expected = []
    for z in zs:
        kz = direct_kernel(z.numpy(), 1.0)
        expected.append((direct_nhsic(kz, kx) if x_term else 0.0) - 2.0 * direct_nhsic(kz, ky))
    got = hsic_terms(zs, x, y, 3, HSICSettings(beta=2.0, sigma=1.0, x_term=x_term))
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)


def test_phase_schedule():
    interleaved = RunConfig(max_epochs=5, hsic_format_epochs=None)
    assert [phase(e, interleaved) for e in (1, 5)] == [(True, True)] * 2
    staged = RunConfig(max_epochs=5, hsic_format_epochs=2)
    assert [phase(e, staged) for e in range(1, 6)] == [(True, False)] * 3 + [(False, True)] * 2
    with pytest.raises(ValueError):
        phase(1, RunConfig(hsic_format_epochs=-1))


# ---- with real models -------------------------------------------------------------------------

def _build(config: RunConfig, n_features: int, n_classes: int):
    return build_model(config.normalised(), n_features, n_classes)


@pytest.fixture(scope="module")
def digits():
    from kanfarm.data import load_dataset
    return load_dataset("digits")


def _config(model: str, **kw) -> RunConfig:
    base = dict(dataset="digits", model=model, trainer="hsic", hidden_widths=(32, 16), optimizer="adam",
                lr=1e-2, batch_size=64, max_epochs=3, dropout=0.0, seed=0)
    base.update(kw)
    return RunConfig(**base)


def test_optimizers_one_per_block_and_no_gradient_crosses_blocks():
    config = _config("mlp").normalised()
    torch.manual_seed(0)
    model = _build(config, 12, 3)
    method = HSICBottleneck()
    opts = method.optimizers(model, config)
    n_hidden = len(model.blocks) - 1
    assert list(opts) == [f"hidden{i}" for i in range(n_hidden)] + ["output"]
    for i, block in enumerate(model.blocks):
        name = "output" if i == n_hidden else f"hidden{i}"
        assert {id(p) for g in opts[name].param_groups for p in g["params"]} == {id(p) for p in block.parameters()}

    x, y = torch.randn(40, 12), torch.randint(0, 3, (40,))
    settings = HSICSettings.from_config(config)
    hsic_step(model, {k: torch.optim.SGD(o.param_groups[0]["params"], lr=0.0) for k, o in opts.items()},
              x, y, settings)
    # block 0's gradient is that of its own HSIC loss alone
    block0 = model.blocks[0]
    model.train()
    z0 = block0(x)
    own = -settings.beta * nhsic(gaussian_kernel(z0, settings.sigma), gaussian_kernel(onehot(y, 3), settings.sigma))
    expected = torch.autograd.grad(own, list(block0.parameters()))
    for p, e in zip(block0.parameters(), expected):
        torch.testing.assert_close(p.grad, e)


@pytest.mark.parametrize("model", ["mlp", "kan"])
def test_hsic_training_reaches_accuracy_on_digits(model, digits):
    from kanfarm.training import train
    records = []
    result = train(_config(model), digits, records.append)
    assert result.status == "completed"
    assert records[0].epoch == 0 and records[0].test_acc is not None
    assert records[-1].test_acc >= 0.8, [r.test_acc for r in records]
    for r in records:
        assert len(r.extra["nhsic_x"]) == len(r.extra["nhsic_y"]) == 2
        assert all(isinstance(v, float) and math.isfinite(v) for v in r.extra["nhsic_x"] + r.extra["nhsic_y"])
    # HSIC training raises the label dependence of the last hidden layer
    assert records[-1].extra["nhsic_y"][-1] > records[0].extra["nhsic_y"][-1]


def test_format_stage_freezes_hidden_blocks(digits):
    config = _config("mlp", max_epochs=3, hsic_format_epochs=1)
    snaps = []

    class Spy(HSICBottleneck):
        def train_epoch(self, model, optimizers, batches, epoch, config):
            out = super().train_epoch(model, optimizers, batches, epoch, config)
            snaps.append([b.state_dict() for b in model.blocks])
            snaps[-1] = [{k: v.clone() for k, v in s.items()} for s in snaps[-1]]
            return out

    from kanfarm.training.loop import fit
    records = []
    fit(config, digits, records.append, Spy())
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)
    assert same(snaps[0][-1], snaps[1][-1])          # output untouched during HSIC epochs
    assert not same(snaps[0][0], snaps[1][0])        # hidden trained during HSIC epochs
    assert same(snaps[1][0], snaps[2][0]) and same(snaps[1][1], snaps[2][1])  # frozen in format stage
    assert not same(snaps[1][-1], snaps[2][-1])
    assert records[-1].test_acc > records[-2].test_acc


def test_patience_counts_from_the_format_stage(digits):
    """Before the format stage the output layer is untrained and test accuracy sits near chance:
    patience must not end the run there."""
    from kanfarm.training import train

    config = _config("mlp", max_epochs=6, hsic_format_epochs=2, patience=1)
    records = []
    result = train(config, digits, records.append)
    assert result.status == "completed"
    assert result.epochs_run >= 5 and records[-1].epoch == result.epochs_run
    assert records[-1].test_acc > 0.5  # the format stage ran and trained the classifier


#: test accuracy per epoch: epoch 0's (an untrained network) beats every HSIC epoch (1-5, the
#: output layer untrained); the format stage (6-9) improves, then dips at 8
STAGED_TEST_ACC = [0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2, 0.25, 0.22, 0.3]


def _staged_run(config, digits, monkeypatch, packed, accs):
    """Train ``config`` alone or as the first of a pack of two, every evaluation of epoch e
    returning ``accs[e]``; the result and records of ``config``."""
    from kanfarm.packing import Member, train_pack
    from kanfarm.packing import trainer as pack_trainer
    from kanfarm.training import loop, train

    records = []
    if packed:
        calls = []

        def evaluate(net, x, y, chunk=8192):  # train then test, once per epoch
            calls.append(1)
            acc = torch.full((net.size,), accs[(len(calls) - 1) // 2])
            return 1.0 - acc, acc
        monkeypatch.setattr(pack_trainer, "_evaluate", evaluate)
        configs = [config, dataclasses.replace(config, lr=config.lr / 2)]
        results = train_pack([Member(c, records.append if i == 0 else (lambda r: None))
                              for i, c in enumerate(configs)], digits)
        assert results[0].epochs_run == results[1].epochs_run
        return results[0], records
    monkeypatch.setattr(loop, "evaluate", lambda model, x, y, chunk=8192: (
        1.0 - accs[len(records)], accs[len(records)]))
    return train(config, digits, records.append), records


@pytest.mark.parametrize("packed", [False, True])
def test_patience_waits_on_the_best_accuracy_of_the_format_stage(digits, monkeypatch, packed):
    """Patience 1 stops at epoch 8 (no gain on epoch 7's 0.25), not at 6 against epoch 0's 0.5."""
    config = _config("mlp", max_epochs=9, hsic_format_epochs=4, patience=1)
    result, records = _staged_run(config, digits, monkeypatch, packed, STAGED_TEST_ACC)
    assert (result.status, result.epochs_run) == ("completed", 8)
    assert [r.test_acc for r in records] == pytest.approx(STAGED_TEST_ACC[:9])


#: as STAGED_TEST_ACC, but the last HSIC epoch (5) beats the format stage's first (6)
STAGED_DIP_ACC = [0.5, 0.1, 0.1, 0.1, 0.1, 0.3, 0.2, 0.25, 0.22, 0.3]


@pytest.mark.parametrize("packed", [False, True])
def test_the_best_accuracy_restarts_at_the_first_epoch_of_the_format_stage(digits, monkeypatch, packed):
    """The best restarts at epoch 6, the stage's first: restarted at 5 (the last HSIC epoch, its
    0.3 from an untrained output layer), patience 1 would stop at 6 instead of 8."""
    config = _config("mlp", max_epochs=9, hsic_format_epochs=4, patience=1)
    result, records = _staged_run(config, digits, monkeypatch, packed, STAGED_DIP_ACC)
    assert (result.status, result.epochs_run) == ("completed", 8)
    assert [r.test_acc for r in records] == pytest.approx(STAGED_DIP_ACC[:9])


def test_extra_is_measured_on_rows_of_every_class_when_the_loader_orders_rows_by_label(digits):
    """IMDB's training rows come sorted by label: the first rows are all one class."""
    from kanfarm.data.dataset import Dataset
    from kanfarm.training.hsic import EXTRA_ROWS, extra_rows

    order = torch.argsort(digits.y_train, stable=True)
    binary = (digits.y_train[order] >= 5).long()
    data = Dataset("sorted", digits.x_train[order], binary, digits.x_test, (digits.y_test >= 5).long(), 2)
    assert data.y_train[:EXTRA_ROWS].unique().numel() == 1
    x, y = extra_rows(data, seed=0)
    assert x.shape[0] == EXTRA_ROWS and y.unique().numel() == 2
    assert torch.equal(extra_rows(data, seed=0)[1], y)  # the same rows every epoch
    config = _config("mlp").normalised()
    torch.manual_seed(0)
    model = build_model(config, data.n_features, 2)
    extra = HSICBottleneck().extra(model, data, config)
    assert all(v > 1e-3 for v in extra["nhsic_y"])


def test_resume_is_exact(digits, tmp_path):
    from kanfarm.training import CheckpointManager, train
    config = _config("mlp", max_epochs=4, dropout=0.1)
    full, part = [], []
    train(config, digits, full.append, checkpoints=CheckpointManager(tmp_path / "a", config.config_hash()))
    ckpt = CheckpointManager(tmp_path / "b", config.config_hash())
    stop_after = iter([False, False, True])
    assert train(config, digits, part.append, checkpoints=ckpt, should_stop=lambda: next(stop_after)).status == "stopped"
    train(config, digits, part.append, checkpoints=ckpt)
    strip = lambda r: (r.epoch, r.train_loss, r.train_acc, r.test_loss, r.test_acc, r.extra, r.diverged)
    assert [strip(r) for r in full] == [strip(r) for r in part]
    a = torch.load(CheckpointManager(tmp_path / "a", "").paths()[0][1], weights_only=True)["state"]["model"]
    b = torch.load(ckpt.paths()[0][1], weights_only=True)["state"]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model", ["mlp", "kan"])
def test_exploding_run_is_marked_diverged_not_failed(model, digits):
    """Non-finite activations leave a kernel with no Cholesky factor: the run must end as
    ``diverged`` at that epoch (as under backprop), not raise."""
    from kanfarm.training import train

    config = _config(model, lr=1e38, optimizer="sgd_momentum", max_epochs=3)
    records = []
    result = train(config, digits, records.append)
    assert result.status == "diverged"
    assert [(r.epoch, r.diverged) for r in records] == [(0, False), (1, True)]
