"""HSIC Bottleneck runs packed: each member equals its solo HSIC run (metrics and per-layer nHSIC),
in both schedules (interleaved, and HSIC epochs then format epochs), and resumes exactly, alone or
in a pack, from checkpoints in the single run's layout (optimisers ``hidden0``, ..., ``output``)."""
from __future__ import annotations

import dataclasses

import pytest

from kanfarm.config import RunConfig
from kanfarm.data import load_dataset
from kanfarm.training import CheckpointManager
from tests.test_packing import FIELDS, packed, solo


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def hsic_members(model: str, **base):
    """Adam, SGD and momentum side by side, at learning rates where HSIC training is stable: where
    the features blow up, float32 rounding differences (a stacked product against a single one)
    grow without bound, in a pack as between two machines."""
    config = RunConfig(**{**dict(dataset="digits", model=model, hidden_widths=(32, 16), trainer="hsic",
                                 batch_size=64, max_epochs=3, seed=5), **base})
    return [dataclasses.replace(config, optimizer=o, lr=lr, init=i) for o, lr, i in [
        ("adam", 3e-3, "kaiming_normal"), ("sgd", 1e-3, "orthogonal"), ("sgd_momentum", 5e-4, "kaiming_uniform")]]


def assert_same_records(a, b, rel=1e-5):
    """Metrics equal within ``rel`` relative (abs 1e-6 near 0): HSIC-trained features can be large,
    so a loss of ~1e3 carries float32 rounding of ~1e-4 in absolute terms."""
    assert [(r.epoch, r.diverged) for r in a] == [(r.epoch, r.diverged) for r in b]
    for x, y in zip(a, b):
        for fld in FIELDS:
            u, v = getattr(x, fld), getattr(y, fld)
            assert (u is None) == (v is None) and (u is None or u == pytest.approx(v, rel=rel, abs=1e-6)), \
                (fld, x.epoch, u, v)


def assert_same_extras(a, b, tol=1e-5):
    assert [r.epoch for r in a] == [r.epoch for r in b]
    for x, y in zip(a, b):
        assert set(x.extra) == set(y.extra) == {"nhsic_x", "nhsic_y"}
        for key in x.extra:
            assert len(x.extra[key]) == len(y.extra[key]) == 2
            assert x.extra[key] == pytest.approx(y.extra[key], rel=tol, abs=tol)


@pytest.mark.parametrize("model,base", [("mlp", {"dropout": 0.2}),                     # interleaved
                                        ("kan", {"hsic_format_epochs": 1}),            # 2 HSIC + 1 format
                                        ("mlp", {"dropout": 0.0, "hsic_x_term": True})])
def test_packed_hsic_members_equal_their_solo_runs(digits, model, base):
    configs = hsic_members(model, **base)
    results, records = packed(configs, digits)
    assert [r.status for r in results] == ["completed"] * 3
    for config, got in zip(configs, records):
        alone = solo(config, digits)[1]
        assert_same_records(got, alone)
        assert_same_extras(got, alone)
    # the runs learned something, and differently: the pack did not train one network three times
    assert len({round(r[-1].test_acc, 6) for r in records}) == 3


def test_packed_hsic_resumes_alone_or_in_a_pack_across_the_format_phase(digits, tmp_path):
    configs = hsic_members("mlp", dropout=0.2, hsic_format_epochs=2, max_epochs=4)  # HSIC 1-2, format 3-4
    ckpts = [CheckpointManager(tmp_path / f"m{i}", c.config_hash()) for i, c in enumerate(configs)]
    asked = []

    def stop_after_three() -> bool:
        asked.append(1)
        return len(asked) > 3 * len(configs)

    results, head = packed(configs, digits, ckpts, stop_after_three)
    assert [(r.status, r.epochs_run) for r in results] == [("stopped", 3)] * 3
    saved = ckpts[0].load_latest()[1]["optimizers"]  # the Adam member, in the single run's layout
    assert set(saved) == {"hidden0", "hidden1", "output"}
    per_epoch = -(-digits.x_train.shape[0] // 64)  # batches per epoch
    assert [int(saved[g]["state"][0]["step"]) for g in ("hidden0", "hidden1", "output")] == \
        [2 * per_epoch, 2 * per_epoch, per_epoch]

    alone = solo(configs[0], digits, checkpoints=ckpts[0])  # one member resumes in the single-run path
    rest = packed(configs[1:], digits, ckpts[1:])  # the others as a pack
    assert [r.status for r in [alone[0], *rest[0]]] == ["completed"] * 3
    for config, first, tail in zip(configs, head, [alone[1]] + rest[1]):
        whole = solo(config, digits)[1]
        assert [r.epoch for r in first + tail] == [0, 1, 2, 3, 4]
        assert_same_records(first + tail, whole)
        assert_same_extras(first + tail, whole)


def test_a_diverging_hsic_member_leaves_the_others_alone(digits):
    configs = hsic_members("mlp", dropout=0.0)
    configs[1] = dataclasses.replace(configs[1], lr=1e38)
    results, records = packed(configs, digits)
    assert [r.status for r in results] == ["completed", "diverged", "completed"]
    assert records[1][-1].diverged and records[1][-1].epoch == 1
    for i in (0, 2):
        assert_same_records(records[i], solo(configs[i], digits)[1])


def test_member_memory_counts_the_hsic_kernels():
    """auto pack sizes come from member_bytes: an HSIC member also holds float64 batch x batch
    matrices for every hidden layer (HSIC_MATRICES x 32 MiB per layer at a batch of 2048)."""
    from kanfarm.models import model_widths
    from kanfarm.packing.planner import HSIC_MATRICES, member_bytes
    for depth in ("shallow", "deep"):
        base = RunConfig(dataset="mnist", model="mlp", depth=depth, batch_size=2048)
        hidden = len(model_widths(base.normalised(), 784, 10)) - 2
        extra = member_bytes(dataclasses.replace(base, trainer="hsic"), 784, 10) - member_bytes(base, 784, 10)
        assert hidden >= 1 and extra == hidden * HSIC_MATRICES * 8 * 2048 ** 2


def test_packed_hsic_members_count_patience_from_the_format_stage(digits):
    configs = hsic_members("mlp", dropout=0.0, max_epochs=5, hsic_format_epochs=2, patience=1)
    results, records = packed(configs, digits)
    for config, result, got in zip(configs, results, records):
        alone = solo(config, digits)
        assert result == alone[0]
        assert_same_records(got, alone[1])
        assert result.epochs_run >= 4  # reached the format stage (epochs 4-5)
