"""The compiled CPU bases (kanfarm.models.compiled_spline): same values as eager, used only where
it should be, and a failed compile falls back to eager once, for good."""
import logging
import os
import shutil

import pytest
import torch

import kanfarm.models.compiled_spline as cs
from kanfarm.config import ConfigError
from kanfarm.models import KANLinear
from kanfarm.models.uniform_spline import bases_for_training, grid_origin_and_scale, uniform_basis


# skipped without a compiler, except under CI=true, where a missing one must fail, not hide these
needs_compiler = pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++"))
                                    and os.environ.get("CI", "").lower() != "true",
                                    reason="torch.compile on the CPU needs a C++ compiler (g++ or $CXX)")


@pytest.fixture
def fresh(monkeypatch):
    """No compiled functions or failure carried over from another test; every block compiles."""
    monkeypatch.setattr(cs, "_failed", False)
    monkeypatch.setattr(cs, "MIN_ELEMENTS", 0)
    monkeypatch.delenv("KANFARM_CPU_COMPILE", raising=False)
    return cs


def knots_and_points(n_in: int, grid_size: int, order: int, batch: int):
    layer = KANLinear(n_in, 3, grid_size=grid_size, spline_order=order)
    t0, inv_h = grid_origin_and_scale(layer.grid)
    x = torch.rand(batch, n_in) * 3 - 1.5  # inside and outside [-1, 1]
    x[:, 0] = layer.grid[0, torch.arange(batch) % layer.grid.shape[1]]  # exactly on knots
    return x, t0, inv_h, grid_size + order


@needs_compiler
@pytest.mark.parametrize("order, grid_size, with_slopes", [(3, 5, True), (3, 5, False), (2, 6, True), (5, 4, True)])
def test_compiled_bases_and_slopes_equal_eager(fresh, order, grid_size, with_slopes):
    x, t0, inv_h, n_bases = knots_and_points(37, grid_size, order, 101)
    x = x.t().contiguous().t()  # column-major rows: the compiled loop is handed a contiguous copy
    got = cs.compiled_bases(x, t0, inv_h, n_bases, order, with_slopes)
    want = uniform_basis(x, t0, inv_h, n_bases, order, with_slopes)
    assert not cs._failed and got[0].is_contiguous()
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
    if with_slopes:
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-5)  # slopes reach k/2 in size
    else:
        assert got[1] is None


@needs_compiler
def test_layer_on_the_compiled_path_equals_the_reference(fresh, monkeypatch):
    calls = []
    real = cs.compiled_bases
    monkeypatch.setattr(cs, "compiled_bases", lambda *a, **k: calls.append(a[3:]) or real(*a, **k))
    torch.manual_seed(0)
    ref = KANLinear(37, 11, fast=False)
    with torch.no_grad():
        ref.spline_weight.normal_()
    fast = KANLinear(37, 11)
    fast.load_state_dict(ref.state_dict())
    x = torch.rand(64, 37) * 2.4 - 1.2
    results = []
    for layer in (ref, fast):
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        results.append([out, *torch.autograd.grad(out.square().sum(), [xi, layer.spline_weight, layer.spline_scaler])])
    for a, b in zip(*results):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5
    assert calls == [(8, 3)]  # the fast layer's bases came from the compiled loop


@needs_compiler
def test_warm_up_compiles_what_the_epochs_use_and_nothing_recompiles(fresh, monkeypatch):
    """A run compiles before its first timed epoch (``warm_up``); then the forward and backward
    passes, any batch size, a batch as large as a layer's input, and a column-major batch
    compile nothing more."""
    from torch._dynamo.utils import counters

    from kanfarm.models import KAN

    model = KAN([37, 11, 5])
    warmed, real = [], cs.compiled_bases
    monkeypatch.setattr(cs, "compiled_bases", lambda *a: warmed.append(a[3:]) or real(*a))
    cs.warm_up(model, 64, input_grads=False)
    assert warmed == [(8, 3, False)] * 2  # both layers, no slopes
    cs.warm_up(model, 64)
    assert warmed[2:] == [(8, 3, False), (8, 3, False), (8, 3, True)]  # slopes: second layer only
    monkeypatch.setattr(cs, "compiled_bases", real)
    graphs = counters["stats"]["unique_graphs"]
    for x in (torch.rand(64, 37), torch.rand(11, 37), torch.rand(37, 37), torch.rand(50, 37).t().contiguous().t()):
        model(x).square().sum().backward()
    with torch.no_grad():
        model(torch.rand(200, 37))
    assert counters["stats"]["unique_graphs"] == graphs


def test_warm_up_leaves_small_runs_and_float64_alone(monkeypatch):
    from kanfarm.models import KAN

    monkeypatch.setattr(cs, "_failed", False)
    monkeypatch.setattr(cs, "_compiled", {})
    cs.warm_up(KAN([64, 16, 10]), 1024)  # 1024 x 8 x 64 = 2^19 elements: under MIN_ELEMENTS
    cs.warm_up(KAN([64, 16, 10]).double(), 4096)
    assert cs._compiled == {}


def test_a_failed_compile_warns_once_and_stays_eager(fresh, monkeypatch, caplog):
    """No C++ compiler (say): the eager path answers, once and for good, with one warning."""
    attempts = []

    def broken(fn, **kwargs):
        def run(*args):
            attempts.append(1)
            raise RuntimeError("no C++ compiler")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(cs, "_compiled", {})
    x, t0, inv_h, n_bases = knots_and_points(9, 5, 3, 40)
    with caplog.at_level(logging.WARNING, logger=cs.__name__):
        for _ in range(3):
            bases, slopes = bases_for_training(x, t0, inv_h, n_bases, 3, input_grad=True)
            want = uniform_basis(x, t0, inv_h, n_bases, 3, with_slopes=True)
            assert torch.equal(bases, want[0]) and torch.equal(slopes, want[1])
    assert len(attempts) == 1 and cs._failed
    assert [r.getMessage() for r in caplog.records if "no C++ compiler" in r.getMessage()] != []
    assert len(caplog.records) == 1


def test_small_blocks_float64_and_the_setting_stay_eager(monkeypatch):
    monkeypatch.setattr(cs, "_failed", False)
    monkeypatch.delenv("KANFARM_CPU_COMPILE", raising=False)
    big = torch.zeros(cs.MIN_ELEMENTS // 8, 1)
    assert cs.applies(big, 8)
    assert not cs.applies(big[:-1], 8)
    assert not cs.applies(big.double(), 8)
    monkeypatch.setenv("KANFARM_CPU_COMPILE", "0")
    assert not cs.applies(big, 8)
    monkeypatch.setenv("KANFARM_CPU_COMPILE", "sure")
    with pytest.raises(ConfigError, match="KANFARM_CPU_COMPILE"):
        cs.applies(big, 8)


def test_when_eager_fails_too_its_error_is_raised_and_compiling_stays_on(fresh, monkeypatch):
    """Out of memory (say) is the input's fault, not the compiler's: it is raised, and later
    blocks are still compiled."""
    import kanfarm.models.uniform_spline as us

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: out_of_memory)
    monkeypatch.setattr(cs, "_compiled", {})
    monkeypatch.setattr(us, "uniform_basis", out_of_memory)
    x, t0, inv_h, n_bases = knots_and_points(9, 5, 3, 40)
    with pytest.raises(RuntimeError, match="not enough memory"):
        cs.compiled_bases(x, t0, inv_h, n_bases, 3, True)
    assert not cs._failed


def test_runs_and_packs_warm_up_before_their_first_epoch(monkeypatch):
    """What a run's passes will compile is compiled before epoch 0 is timed: ``warm_up`` gets the
    model and the most rows one pass takes (a batch, an evaluation chunk; a pack's later layers
    take every member's rows)."""
    import dataclasses

    import kanfarm.packing.trainer as pack_trainer
    import kanfarm.training.loop as loop
    from kanfarm.config import RunConfig
    from kanfarm.data import load_dataset
    from kanfarm.packing import Member, train_pack
    from kanfarm.training import train

    digits = load_dataset("digits")
    records, calls = [], []

    def spy(model, rows, input_grads):
        calls.append((type(model).__name__, rows, input_grads, len(records)))
    monkeypatch.setattr(loop, "warm_up", spy)
    monkeypatch.setattr(pack_trainer, "warm_up", spy)
    config = RunConfig(dataset="digits", model="kan", depth="shallow", batch_size=64, max_epochs=1)
    train(config, digits, records.append)
    evaluated = max(digits.x_train.shape[0], digits.x_test.shape[0])  # under one evaluation chunk
    assert calls == [("KAN", evaluated, True, 0)]
    train_pack([Member(dataclasses.replace(config, lr=lr), records.append) for lr in (0.01, 0.02)], digits)
    assert calls[1:] == [("KAN", 2 * evaluated, True, 2)]  # before the pack's first rows
    hsic = dataclasses.replace(config, trainer="hsic")
    train(hsic, digits, records.append)
    train_pack([Member(dataclasses.replace(hsic, lr=lr), records.append) for lr in (0.01, 0.02)], digits)
    assert [c[2] for c in calls[2:]] == [False, False]  # HSIC detaches every layer's input


def test_a_run_compiles_only_when_its_spline_work_repays_the_compile(fresh, monkeypatch):
    """A small run (or small pack) paid a 5-25 s compile to save under a second: it now trains
    eager from the start. The work is the run's whole, fixed by its settings (a resumed run takes
    the path it took before); a paper-sized MNIST run still compiles."""
    import dataclasses

    from kanfarm.config import RunConfig
    from kanfarm.data import load_dataset
    from kanfarm.packing import Member, train_pack
    from kanfarm.training import train

    mnist = RunConfig(dataset="mnist", model="kan", depth="shallow", batch_size=4096, max_epochs=100).normalised()
    rows = 60_000 + 60_000 + 10_000  # trained, then evaluated: the training rows and the test rows
    assert cs.run_elements(mnist, 784, 10, rows) == 100 * rows * (784 + 32) * 8 >= cs.WORTH_ELEMENTS
    assert cs.run_elements(mnist, 784, 10, rows, members=9) == 100 * rows * (784 + 9 * 32) * 8
    assert cs.run_elements(dataclasses.replace(mnist, model="mlp"), 784, 10, rows) == 0
    x = torch.zeros(4, 3)
    assert cs.applies(x, 8)  # outside a run: as the layer is used directly
    with cs.for_run(cs.WORTH_ELEMENTS - 1):
        assert not cs.applies(x, 8)
        with cs.for_run(cs.WORTH_ELEMENTS):
            assert cs.applies(x, 8)
        assert not cs.applies(x, 8)
    assert cs.applies(x, 8)

    digits = load_dataset("digits")
    compiled = []
    monkeypatch.setattr(cs, "compiled_bases", lambda *a, **k: compiled.append(a[3:]) or uniform_basis(*a, **k))
    config = RunConfig(dataset="digits", model="kan", depth="shallow", batch_size=256, max_epochs=1)
    train(config, digits, lambda record: None)
    train_pack([Member(dataclasses.replace(config, lr=lr), lambda record: None) for lr in (0.01, 0.02)], digits)
    assert compiled == []
    monkeypatch.setattr(cs, "WORTH_ELEMENTS", 0)
    train(config, digits, lambda record: None)
    assert compiled  # the same run, were it worth it
