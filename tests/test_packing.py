"""Grid packing: a packed member trains exactly as its solo run (records, divergence, checkpoints),
packs are planned from the right runs, and a packed grid run gives the same epoch rows."""
from __future__ import annotations

import dataclasses
import sqlite3

import pytest
import torch
from typer.testing import CliRunner

from kanfarm.config import RunConfig
from kanfarm.data import load_dataset
from kanfarm.packing import Member, pack_key, plan_packs, train_pack
from kanfarm.training import CheckpointManager, train

from conftest import OTHER_VALUES

FIELDS = ("train_loss", "train_acc", "test_loss", "test_acc")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def solo(config, data, **kwargs):
    records = []
    return train(config, data, records.append, **kwargs), records


def packed(configs, data, checkpoints=None, should_stop=None):
    records = [[] for _ in configs]
    members = [Member(c, records[i].append, None if checkpoints is None else checkpoints[i], should_stop)
               for i, c in enumerate(configs)]
    return train_pack(members, data), records


def assert_same_records(a, b, tol=1e-5):
    assert [r.epoch for r in a] == [r.epoch for r in b]
    for x, y in zip(a, b):
        assert x.diverged == y.diverged
        for f in FIELDS:
            u, v = getattr(x, f), getattr(y, f)
            assert (u is None) == (v is None), (f, x.epoch)
            if u is not None:
                assert abs(u - v) <= tol, (f, x.epoch, u, v)


def members(model, **base):
    """sgd, Nesterov momentum and Adam side by side, each with its own lr, init and activation."""
    config = RunConfig(dataset="digits", model=model, depth="shallow", batch_size=128, max_epochs=3, seed=2, **base)
    return [dataclasses.replace(config, optimizer=o, lr=lr, init=i, activation=a) for o, lr, i, a in [
        ("adam", 1e-2, "kaiming_normal", None), ("sgd", 0.2, "orthogonal", "silu"),
        ("sgd_momentum", 0.05, "kaiming_uniform", None), ("adam", 3e-3, "orthogonal", "silu")]]


def test_dropout_mask_is_the_solo_stream():
    """The pack draws masks as nn.Dropout does, from a generator in the solo run's state."""
    from kanfarm.packing.stacked import StackedNet
    from kanfarm.models import MLP

    torch.manual_seed(4)
    model = MLP([5, 7, 3], "relu", 0.5)
    net = StackedNet("mlp", [model], ["relu"], [0.5], torch.device("cpu"))
    x = torch.randn(6, 5)
    gen = torch.Generator().manual_seed(9)
    torch.manual_seed(9)
    model.train()
    mine, theirs = net.forward(x, [gen])[0], model(x)
    assert torch.allclose(mine, theirs, atol=1e-6)  # same masks (other masks differ by far more)
    assert torch.equal(gen.get_state(), torch.get_rng_state())


@pytest.mark.parametrize("model", ["mlp", "kan"])
def test_pack_evaluation_in_chunks_equals_each_members_own(digits, model):
    """Test sets larger than one chunk (MNIST's 10,000 rows) sum every chunk, per member."""
    from kanfarm.models import build_model
    from kanfarm.packing.stacked import StackedNet
    from kanfarm.packing.trainer import _evaluate
    from kanfarm.training.loop import evaluate

    configs = [RunConfig(dataset="digits", model=model, lr=lr, seed=0) for lr in (0.1, 0.01, 0.001)]
    models = []
    for i, config in enumerate(configs):
        torch.manual_seed(i)
        models.append(build_model(config, digits.n_features, digits.n_classes))
    net = StackedNet(model, models, [c.normalised().activation for c in configs],
                     [c.normalised().dropout for c in configs], torch.device("cpu"))
    x, y = digits.x_test, digits.y_test
    loss, acc = _evaluate(net, x, y, chunk=7)
    whole_loss, whole_acc = _evaluate(net, x, y, chunk=x.shape[0])
    assert torch.allclose(loss, whole_loss, rtol=1e-5) and torch.equal(acc, whole_acc)
    for i, m in enumerate(models):
        own_loss, own_acc = evaluate(m, x, y)
        assert loss[i].item() == pytest.approx(own_loss, rel=1e-5) and acc[i].item() == pytest.approx(own_acc)
    assert len(set(acc.tolist())) > 1  # the members are told apart


@pytest.mark.parametrize("model", ["mlp", "kan"])
def test_packed_members_equal_their_solo_runs(digits, model):
    configs = members(model)
    if model == "mlp":
        assert configs[0].normalised().dropout > 0  # dropout masks are per member
    results, records = packed(configs, digits)
    for config, result, recs in zip(configs, results, records):
        alone, expected = solo(config, digits)
        assert result == alone
        assert_same_records(recs, expected)


def test_members_with_different_dropout_keep_their_own_after_one_leaves(digits):
    """Dropout rate is a member's own setting: each member draws its masks at its rate, also after
    a member has left the pack (the stacked rates and streams are re-indexed)."""
    base = members("mlp")[0]
    configs = [dataclasses.replace(base, lr=1e20, dropout=0.5)] + [
        dataclasses.replace(base, dropout=rate, lr=lr) for rate, lr in ((0.0, 1e-2), (0.2, 3e-3), (0.5, 5e-3))]
    results, records = packed(configs, digits)
    assert [r.status for r in results] == ["diverged"] + ["completed"] * 3
    for config, result, recs in zip(configs, results, records):
        alone, expected = solo(config, digits)
        assert result == alone
        assert_same_records(recs, expected)


def test_divergence_stays_in_its_member(digits):
    configs = members("mlp")[:3] + [dataclasses.replace(members("mlp")[1], lr=1e20)]
    results, records = packed(configs, digits)
    assert [r.status for r in results] == ["completed"] * 3 + ["diverged"]
    for config, result, recs in zip(configs, results, records):
        alone, expected = solo(config, digits)
        assert result == alone
        assert_same_records(recs, expected)
    assert records[3][-1].diverged and records[3][-1].test_acc is None


def test_member_checkpoints_resume_alone_or_in_a_pack(digits, tmp_path):
    configs = [dataclasses.replace(c, max_epochs=4) for c in members("mlp")[:3]]
    ckpts = [CheckpointManager(tmp_path / f"m{i}", c.config_hash(), min_interval_s=3600) for i, c in enumerate(configs)]
    asked = []

    def stop_after_two() -> bool:  # asked once per member before each epoch
        asked.append(1)
        if len(asked) == 2 * len(configs) + 1:  # a stray file of the stop's epoch: the stop writes its own
            CheckpointManager(tmp_path / "m0", configs[0].config_hash(), keep=10).save(2, {"other": torch.zeros(1)})
        return len(asked) > 2 * len(configs)

    results, first = packed(configs, digits, ckpts, stop_after_two)
    assert [(r.status, r.epochs_run) for r in results] == [("stopped", 2)] * 3
    assert [e for e, _ in ckpts[0].paths()] == [2, 0]  # time-limited: epoch 1 was not written

    # Same layout as a solo run's checkpoint: the single-run path loads it.
    solo(configs[1], digits, checkpoints=CheckpointManager(tmp_path / "solo", configs[1].config_hash()))
    mine = ckpts[1].load_latest()[1]
    theirs = CheckpointManager(tmp_path / "solo", configs[1].config_hash()).load_latest()[1]
    assert mine["model"].keys() == theirs["model"].keys()
    assert mine["optimizers"]["all"]["param_groups"] == theirs["optimizers"]["all"]["param_groups"]
    assert {k: set(v) for k, v in mine["optimizers"]["all"]["state"].items()} == \
        {k: set(v) for k, v in theirs["optimizers"]["all"]["state"].items()}
    assert set(mine["rng"]) == set(theirs["rng"])

    torch.manual_seed(999)  # resume must restore every random state itself
    alone = solo(configs[0], digits, checkpoints=ckpts[0])
    rest = packed(configs[1:], digits, ckpts[1:])
    assert [r.status for r in rest[0]] == ["completed", "completed"]
    for config, tail, head in zip(configs, [alone[1]] + rest[1], first):
        assert_same_records(head + tail, solo(config, digits)[1])


def test_a_member_whose_optimiser_state_does_not_load_fails_alone(digits, tmp_path):
    """A checkpoint with a valid digest whose Adam step disagrees with its epoch (the pack keeps one
    step count per optimiser) fails its member; the others resume as if nothing happened."""
    configs = [dataclasses.replace(c, max_epochs=3) for c in members("mlp")[:3]]
    configs[1] = dataclasses.replace(configs[1], optimizer="adam", lr=0.02)
    ckpts = [CheckpointManager(tmp_path / f"m{i}", c.config_hash()) for i, c in enumerate(configs)]
    asked = []
    packed(configs, digits, ckpts, lambda: asked.append(1) or len(asked) > 2 * len(configs))
    epoch, state = ckpts[1].load_latest()
    for param_state in state["optimizers"]["all"]["state"].values():
        param_state["step"] += 1
    ckpts[1].save(epoch, state)
    errors, records = [], [[] for _ in configs]
    results = train_pack([Member(c, records[i].append, ckpts[i], on_error=lambda exc: errors.append(exc) or True)
                          for i, c in enumerate(configs)], digits)
    assert [r.status for r in results] == ["completed", "failed", "completed"] and records[1] == []
    assert len(errors) == 1 and "optimiser step" in str(errors[0])
    for i in (0, 2):
        assert_same_records(records[i], solo(configs[i], digits)[1][epoch + 1:])


def test_a_saved_adam_step_matches_past_two_to_the_24():
    """torch counts Adam's step in float32, which stops growing at 2^24 (a long HIGGS grid)."""
    from kanfarm.packing.optim import _same_step

    big = 2 ** 24
    assert _same_step(12.0, 12) and not _same_step(13.0, 12)
    assert _same_step(float(torch.tensor(big + 1, dtype=torch.float32)), big + 1)
    assert _same_step(float(big), big + 1000) and not _same_step(float(big - 1), big + 1)


def test_a_member_with_its_own_knots_trains_on_them_in_a_pack(digits, tmp_path):
    """The stack holds one set of buffers. A member whose checkpoint carries moved knots
    (``update_grid``) must train on its own, as when resumed alone, and keep them in its next
    checkpoint, not take the first member's."""
    import shutil

    from kanfarm.models import build_model

    configs = [dataclasses.replace(c, max_epochs=2) for c in members("kan")[:2]]
    ckpts = [CheckpointManager(tmp_path / f"m{i}", c.config_hash()) for i, c in enumerate(configs)]
    for config, ckpt in zip(configs, ckpts):  # both stop after epoch 1, checkpointed
        asked = iter([False, True])
        solo(config, digits, checkpoints=ckpt, should_stop=lambda: next(asked, True))
    epoch, state = ckpts[1].load_latest()
    model = build_model(configs[1], digits.n_features, digits.n_classes)
    model.load_state_dict(state["model"])
    model.blocks[0].update_grid(digits.x_train[:512])
    state["model"] = model.state_dict()
    ckpts[1].save(epoch, state)
    shutil.copytree(tmp_path / "m1", tmp_path / "alone")
    alone = solo(configs[1], digits, checkpoints=CheckpointManager(tmp_path / "alone", configs[1].config_hash()))[1]

    results, records = packed(configs, digits, ckpts)
    assert [r.status for r in results] == ["completed", "completed"]
    assert_same_records(records[1], alone)
    knots = ckpts[1].load_latest()[1]["model"]["blocks.0.grid"]
    assert torch.equal(knots, state["model"]["blocks.0.grid"])
    assert not torch.equal(knots, ckpts[0].load_latest()[1]["model"]["blocks.0.grid"])


def test_a_packed_member_records_its_share_of_the_packs_epoch_time(digits, monkeypatch):
    """Summed over a pack's members, ``seconds`` is the pack's time, as for runs trained one by
    one (``kanfarm status`` estimates what is left from it): a clock that moves 12 s per epoch."""
    from kanfarm.packing import trainer

    clock = [0.0]
    extras = trainer._extras
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(trainer, "_extras", lambda *args: clock.__setitem__(0, clock[0] + 12.0) or extras(*args))
    configs = [dataclasses.replace(c, max_epochs=2) for c in members("mlp")]
    results, records = packed(configs, digits)
    assert [r.status for r in results] == ["completed"] * 4
    assert {r.seconds for rs in records for r in rs} == {12.0 / 4}


def test_a_bad_record_fails_its_member_alone(digits, monkeypatch):
    """A record that fails validation with finite losses (here a NaN in ``extra``) is its member's
    error, as a solo run's is its run's: that member is failed and the pack trains on."""
    from kanfarm.packing import trainer

    configs = [dataclasses.replace(c, max_epochs=2) for c in members("mlp")[:3]]
    extras, calls = trainer._extras, []  # the second member's record of epoch 1 holds a NaN

    def bad_extras(net, data, config):
        calls.append(1)
        return [{"x": float("nan")} if (m, len(calls)) == (1, 2) else e for m, e in enumerate(extras(net, data, config))]
    monkeypatch.setattr(trainer, "_extras", bad_extras)
    errors = []
    records = [[] for _ in configs]
    results = train_pack([Member(c, records[i].append, on_error=lambda exc: errors.append(exc) or True)
                          for i, c in enumerate(configs)], digits)
    assert sorted(r.status for r in results) == ["completed", "completed", "failed"]
    [bad] = [i for i, r in enumerate(results) if r.status == "failed"]
    assert len(errors) == 1 and isinstance(errors[0], ValueError)
    assert [len(r) for r in records] == [1 if i == bad else 3 for i in range(3)]


def test_packed_patience_waits_on_test_accuracy_not_train_accuracy(digits, monkeypatch, tmp_path):
    """A member's best epoch is its best *test* accuracy's, as in a solo run: with train accuracy
    rising every epoch, a best tracked on it would never let patience stop the member."""
    from kanfarm.packing import trainer

    test_acc = [0.1, 0.5, 0.5, 0.4, 0.4, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    calls = []

    def evaluate(net, x, y, chunk=8192):  # the train subset, then the test set, once per epoch
        calls.append(1)
        epoch = (len(calls) - 1) // 2
        acc = torch.full((net.size,), 0.05 * (epoch + 1) if len(calls) % 2 else test_acc[epoch])
        return 1.0 - acc, acc
    monkeypatch.setattr(trainer, "_evaluate", evaluate)
    configs = [dataclasses.replace(c, max_epochs=10, patience=2) for c in members("mlp")[:2]]
    ckpts = [CheckpointManager(tmp_path / f"m{i}", c.config_hash()) for i, c in enumerate(configs)]
    results, records = packed(configs, digits, ckpts)
    assert [(r.status, r.epochs_run) for r in results] == [("completed", 3)] * 2
    assert [r.train_acc for r in records[0]] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert [c.load_latest()[1]["progress"] for c in ckpts] == [{"best_acc": 0.5, "best_epoch": 1}] * 2


def test_planner_groups_runs_that_share_shapes_and_data_order():
    base = RunConfig(dataset="digits", model="kan", depth="shallow", max_epochs=3)
    runs = [
        (1, base), (2, dataclasses.replace(base, optimizer="sgd", lr=0.1, init="orthogonal", activation="silu")),
        (3, dataclasses.replace(base, seed=1)),                  # other batch order
        (4, dataclasses.replace(base, grid_size=8)),             # other shapes
        (5, dataclasses.replace(base, trainer="hsic")),          # another trainer
        (6, dataclasses.replace(base, model="mlp")), (7, dataclasses.replace(base, model="mlp", dropout=0.0)),
        (8, dataclasses.replace(base, model="mlp", grid_size=8)),  # unused by an MLP: same pack
        (9, dataclasses.replace(base, lr=0.5)), (10, dataclasses.replace(base, batch_size=32)),
    ]
    assert plan_packs(runs, 8) == [[1, 2, 9], [3], [4], [5], [6, 7, 8], [10]]
    assert plan_packs(runs, 2) == [[1, 2], [3], [4], [5], [6, 7], [8], [9], [10]]
    assert plan_packs(runs, 1) == [[i] for i, _ in runs]
    hsic = runs[4][1]  # HSIC runs pack with HSIC runs of the same settings only
    assert pack_key(dataclasses.replace(hsic, lr=0.5, optimizer="sgd")) == pack_key(hsic)
    assert pack_key(dataclasses.replace(hsic, hsic_beta=50.0)) != pack_key(hsic)
    assert pack_key(dataclasses.replace(hsic, hsic_format_epochs=1)) != pack_key(hsic)
    wide = dataclasses.replace(base, model="mlp_wide")
    assert pack_key(wide) != pack_key(dataclasses.replace(wide, grid_size=8))  # other matched widths


def test_every_field_but_the_member_fields_keeps_runs_apart():
    """Field by field: members may differ only in init, optimiser, learning rate, activation,
    dropout and patience; any other difference (one the config does not normalise away) gives
    another pack key, e.g. ``train_eval_size`` (other train metrics) or ``max_epochs`` (another end)."""
    members = {"init", "optimizer", "lr", "activation", "dropout", "patience"}
    base = RunConfig(dataset="higgs", model="kan", depth="shallow", trainer="hsic", max_epochs=3)
    fields = [f.name for f in dataclasses.fields(RunConfig)]
    assert sorted(OTHER_VALUES) == sorted(fields), "give a second value for each RunConfig field"
    for name in fields:
        other = dataclasses.replace(base, **{name: OTHER_VALUES[name]})
        if other.normalised() == base.normalised():
            assert name in ("dropout", "wide_multiplier"), name  # a KAN has neither
            continue
        assert (pack_key(other) == pack_key(base)) == (name in members), name
    mlp = dataclasses.replace(base, model="mlp")
    assert pack_key(dataclasses.replace(mlp, dropout=0.0)) == pack_key(mlp)


def test_auto_pack_size_fits_half_the_memory_free_for_it(monkeypatch):
    import torch

    from kanfarm.packing import planner

    config = RunConfig(dataset="mnist", model="kan", depth="shallow", batch_size=4096)
    per = planner.member_bytes(config, 784, 10)
    for available, want in ((10 ** 15, planner.CPU_PACK), (2 * 3 * per + 1, 3), (per, 1), (None, planner.CPU_PACK)):
        monkeypatch.setattr(planner, "host_available_bytes", lambda: available)
        assert planner.auto_pack_size(config, 784, 10) == want, available
    # CUDA: the driver's free memory plus the blocks this process's allocator holds unused
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (10 * per, 80 * per))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: 30 * per)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: 20 * per)
    assert planner.auto_pack_size(config, 784, 10, device="cuda") == 10  # (10 + 30 - 20) / 2
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (10 ** 4 * per, 10 ** 4 * per))
    assert planner.auto_pack_size(config, 784, 10, device="cuda") == planner.MAX_PACK


def test_host_memory_available_reads_meminfo_and_a_containers_limit(tmp_path):
    from kanfarm.packing.planner import host_available_bytes

    meminfo, cgroup = tmp_path / "meminfo", tmp_path / "cgroup"
    cgroup.mkdir()
    meminfo.write_text("MemTotal:       2048 kB\nMemFree:         100 kB\nMemAvailable:    1000 kB\n")
    assert host_available_bytes(meminfo, cgroup) == 1000 * 1024  # no limit files
    (cgroup / "memory.max").write_text("500000\n")
    (cgroup / "memory.current").write_text("100000\n")
    assert host_available_bytes(meminfo, cgroup) == 400000
    (cgroup / "memory.stat").write_text("anon 50000\nfile 70000\ninactive_file 60000\n")
    assert host_available_bytes(meminfo, cgroup) == 460000  # cached files are dropped first
    (cgroup / "memory.max").write_text("max\n")
    assert host_available_bytes(meminfo, cgroup) == 1000 * 1024
    assert host_available_bytes(tmp_path / "absent", tmp_path / "absent") is None


def test_a_pack_size_per_shape_when_auto_sizes_differ():
    """``plan_packs`` with a callable: each pack key gets the size its first config asks for."""
    kan = [(i, RunConfig(model="kan", lr=0.01 * (i + 1))) for i in range(5)]
    mlp = [(10 + i, RunConfig(model="mlp", lr=0.01 * (i + 1))) for i in range(5)]
    packs = plan_packs(kan + mlp, lambda config: 2 if config.model == "kan" else 4)
    assert packs == [[0, 1], [2, 3], [4], [10, 11, 12, 13], [14]]


def test_batch_norm_runs_train_alone(digits):
    """A stacked model keeps no per-member running statistics: batch-norm runs get packs of one,
    and train_pack refuses them rather than train them wrong."""
    base = RunConfig(dataset="digits", model="mlp", depth="shallow", max_epochs=1, batch_norm=True)
    runs = [(i, dataclasses.replace(base, lr=lr)) for i, lr in enumerate((0.1, 0.01, 0.001))]
    assert plan_packs(runs, 8) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="batch norm"):
        train_pack([Member(c, lambda r: None) for _, c in runs], digits)


GRID = """
name = "packed"
datasets = ["digits"]
models = ["mlp", "kan"]
depths = ["shallow"]
inits = ["kaiming_normal", "orthogonal"]
optimizers = ["adam", "sgd", "sgd_momentum"]
learning_rates = [0.01]
seeds = [0]
batch_size = 128
epochs = 2
"""


HSIC_GRID = GRID.replace('learning_rates = [0.01]', 'learning_rates = [0.001]\ntrainers = ["hsic"]\ndropout = 0.0')


@pytest.mark.parametrize("grid", [GRID, HSIC_GRID], ids=["backprop", "hsic"])
def test_run_grid_with_packs_writes_the_same_rows(tmp_path, monkeypatch, grid):
    from cli.main import app

    (tmp_path / "g.toml").write_text(grid)
    monkeypatch.chdir(tmp_path)
    rows = {}
    for size in ("1", "4"):
        monkeypatch.setenv("KANFARM_DATABASE_URL", f"sqlite:///{tmp_path / f'{size}.db'}")
        monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / f"ckpt{size}"))
        assert CliRunner().invoke(app, ["db", "upgrade"]).exit_code == 0
        result = CliRunner().invoke(app, ["run", "grid", "g.toml", "--pack-size", size])
        assert result.exit_code == 0, result.output
        con = sqlite3.connect(tmp_path / f"{size}.db")
        rows[size] = {(h, e): acc for h, e, acc in con.execute(
            "SELECT r.config_hash, e.epoch, e.test_acc FROM epoch_metrics e JOIN runs r ON r.id = e.run_id")}
        assert {s for (s,) in con.execute("SELECT status FROM runs")} == {"completed"}
        con.close()
    assert len(rows["1"]) == 12 * 3 and rows["1"].keys() == rows["4"].keys()
    for key, acc in rows["1"].items():
        assert abs(rows["4"][key] - acc) <= 1e-5, key
    assert CliRunner().invoke(app, ["run", "grid", "g.toml", "--pack-size", "0"]).exit_code == 2
