"""The fused Triton optimiser step of a pack does what the eager ``StackedOptimizer.step`` does.

Runs on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set before the kernel is
defined); on CUDA the kernel is compiled (``benchmarks/cuda_checks.py``).
"""
from __future__ import annotations

import copy
import os

os.environ["TRITON_INTERPRET"] = "1"  # noqa: E402  (read when the kernels are decorated)

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("CI", "").lower() != "true":
    pytest.importorskip("triton")
import kanfarm.packing.optim as packing_optim  # noqa: E402
from kanfarm.config import RunConfig  # noqa: E402
from kanfarm.data import load_dataset  # noqa: E402
from kanfarm.packing import Member, train_pack  # noqa: E402
from kanfarm.packing.optim import StackedOptimizer  # noqa: E402
from kanfarm.packing.triton_pack import BLOCK  # noqa: E402

KINDS = ["sgd"] * 3 + ["sgd_momentum"] * 3 + ["adam"] * 3
LRS = [0.05, 0.005, 0.0005] * 3


def stacked_params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # one parameter spans several blocks per member (and ends mid-block), one is tiny
    return {"w": torch.randn(9, 3, BLOCK // 2 + 7, generator=g), "b": torch.randn(9, 5, generator=g)}


def run(fused: bool, steps: int, dead_from: dict[int, int]):
    params = stacked_params(0)
    opt = StackedOptimizer(params, KINDS, LRS, fused=fused)
    g = torch.Generator().manual_seed(1)
    history = []
    for step in range(1, steps + 1):
        grads = {name: torch.randn(p.shape, generator=g) for name, p in params.items()}
        alive = torch.tensor([dead_from.get(m, steps + 1) > step for m in range(9)])
        for m in range(9):  # a dead member's gradient is what made it die: non-finite
            if not alive[m]:
                grads["w"][m, 0, 0] = float("nan")
        opt.step(params, grads, alive)
        history.append(copy.deepcopy((params, opt.state)))
    return history, opt


def test_fused_step_equals_the_eager_step_and_freezes_dead_members():
    dead = {1: 3, 4: 2, 8: 4}  # an SGD, a momentum and an Adam member die at steps 3, 2, 4
    eager, eager_opt = run(False, 5, dead)
    fused, fused_opt = run(True, 5, dead)
    assert fused_opt.fused and not eager_opt.fused
    for (p_e, st_e), (p_f, st_f) in zip(eager, fused):
        for name in p_e:
            torch.testing.assert_close(p_f[name], p_e[name], rtol=1e-6, atol=1e-7)
            for key in st_e[name]:
                torch.testing.assert_close(st_f[name][key], st_e[name][key], rtol=1e-6, atol=1e-7)
    for m, step in dead.items():  # frozen: exactly as before the step it died in
        before = fused[step - 2][0]
        for name, p in fused[-1][0].items():
            assert torch.equal(p[m], before[name][m])
            assert torch.isfinite(p[m]).all()
    assert all(torch.isfinite(p).all() for p in fused[-1][0].values())


@pytest.mark.parametrize("model", ["mlp", "kan"])
def test_packed_training_with_the_fused_step_matches_the_eager_pack(monkeypatch, model):
    data = load_dataset("digits")
    base = RunConfig(dataset="digits", model=model, hidden_widths=(8,), max_epochs=2, batch_size=256)
    configs = [RunConfig(**{**base.to_dict(), "optimizer": o, "lr": lr, "hidden_widths": (8,)})
               for o, lr in [("sgd", 0.1), ("sgd_momentum", 0.05), ("adam", 0.01)]]

    def records(fused: bool):
        monkeypatch.setattr(packing_optim, "fused_kernels_apply", lambda p: fused)
        out = [[] for _ in configs]
        train_pack([Member(c, out[i].append) for i, c in enumerate(configs)], data)
        return out

    eager, fused = records(False), records(True)
    for a, b in zip(eager, fused):
        assert [r.epoch for r in a] == [r.epoch for r in b] == [0, 1, 2]
        for ra, rb in zip(a, b):
            for fld in ("train_loss", "train_acc", "test_loss", "test_acc"):
                assert getattr(rb, fld) == pytest.approx(getattr(ra, fld), rel=1e-5, abs=1e-6)


# --- dropout masks ---------------------------------------------------------------------------------

def test_dropout_noise_rates_scales_and_streams():
    from kanfarm.packing.triton_pack import dropout_noise
    like = torch.empty(3, 700, 40)
    keys = torch.tensor([11, 2 ** 59 + 5, 13])
    keep = torch.tensor([0.8, 1.0, 0.5])
    noise = dropout_noise(like, keys, keep, torch.ones(3) / keep, step=5, layer=0)
    kept = (noise > 0).float().mean(dim=(1, 2))
    assert abs(kept[0] - 0.8) < 0.01 and kept[1] == 1.0 and abs(kept[2] - 0.5) < 0.01
    for m in range(3):
        assert set(noise[m].unique().tolist()) <= {0.0, (torch.ones(1) / keep[m]).item()}
    again = dropout_noise(like, keys, keep, torch.ones(3) / keep, step=5, layer=0)
    assert torch.equal(noise, again)
    # a member's mask depends on its key, step and layer only, not on its place in the pack
    alone = dropout_noise(like[:1], keys[2:], keep[2:], torch.ones(1) / keep[2:], step=5, layer=0)
    assert torch.equal(alone[0], noise[2])
    for other in ({"step": 6, "layer": 0}, {"step": 5, "layer": 1}):
        moved = dropout_noise(like, keys, keep, torch.ones(3) / keep, **other)
        assert (moved[0] != noise[0]).float().mean() > 0.2
    assert (noise[0] > 0).ne(noise[2] > 0).any()


def fused_everywhere(monkeypatch):
    import kanfarm.packing.stacked as stacked
    monkeypatch.setattr(packing_optim, "fused_kernels_apply", lambda p: True)
    monkeypatch.setattr(stacked, "fused_kernels_apply", lambda p: True)


def dropout_members(epochs: int):
    base = RunConfig(dataset="digits", model="mlp", hidden_widths=(16, 8), max_epochs=epochs, batch_size=256,
                     dropout=0.3, seed=4)
    return [RunConfig(**{**base.to_dict(), "hidden_widths": (16, 8), "optimizer": o, "lr": lr, "dropout": p})
            for o, lr, p in [("sgd", 0.1, 0.3), ("sgd_momentum", 0.05, 0.0), ("adam", 0.01, 0.5)]]


def test_fused_pack_resumes_exactly_and_members_do_not_depend_on_the_pack(monkeypatch, tmp_path):
    from kanfarm.training import CheckpointManager
    fused_everywhere(monkeypatch)
    import kanfarm.packing.triton_pack as triton_pack
    calls = []
    real_noise = triton_pack.dropout_noise
    monkeypatch.setattr(triton_pack, "dropout_noise", lambda *a, **k: calls.append(a[-2:]) or real_noise(*a, **k))
    data = load_dataset("digits")
    configs = dropout_members(3)

    def train(cfgs, ckpts=None, should_stop=None):
        out = [[] for _ in cfgs]
        results = train_pack([Member(c, out[i].append, None if ckpts is None else ckpts[i], should_stop)
                              for i, c in enumerate(cfgs)], data)
        return results, out

    _, whole = train(configs)
    assert calls[:4] == [(0, 0), (0, 1), (1, 0), (1, 1)]  # (step, layer): both hidden layers, every step
    ckpts = [CheckpointManager(tmp_path / str(i), c.config_hash()) for i, c in enumerate(configs)]
    asked = []
    results, head = train(configs, ckpts, lambda: asked.append(1) or len(asked) > len(configs))
    assert [r.status for r in results] == ["stopped"] * 3
    _, tail = train(configs, ckpts)
    for w, h, t in zip(whole, head, tail):
        got = h + t
        assert [r.epoch for r in got] == [0, 1, 2, 3] == [r.epoch for r in w]
        for a, b in zip(got, w):
            for fld in ("train_loss", "train_acc", "test_loss", "test_acc"):
                assert getattr(a, fld) == getattr(b, fld), (fld, a.epoch)
    _, solo_pack = train(configs[2:])  # the Adam member (dropout 0.5) trained in a pack of its own
    for a, b in zip(solo_pack[0], whole[2]):
        assert a.test_acc == pytest.approx(b.test_acc, abs=1e-5)
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
