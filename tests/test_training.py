"""The backprop trainer: accuracy on digits, exact resume, divergence, checkpoint fallback."""
from __future__ import annotations

import dataclasses
import logging
import os
import time

import pytest
import torch

from kanfarm.config import ConfigError, RunConfig
from kanfarm.data import load_dataset
from kanfarm.training import CheckpointManager, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def run(config, data, **kwargs):
    records = []
    result = train(config, data, records.append, **kwargs)
    return result, records


@pytest.mark.parametrize("model,lr", [("kan", 0.01), ("mlp", 0.01)])
def test_reaches_ninety_percent_on_digits(digits, model, lr):
    config = RunConfig(dataset="digits", model=model, depth="shallow", optimizer="adam", lr=lr,
                       batch_size=64, max_epochs=8)
    result, records = run(config, digits)
    assert result.status == "completed" and result.epochs_run == 8
    assert [r.epoch for r in records] == list(range(9))
    assert records[0].test_acc < 0.5, "epoch 0 is evaluated before any training"
    assert max(r.test_acc for r in records) >= 0.9
    for r in records:
        r.validate()


def test_evaluation_in_chunks_equals_the_direct_formula(digits):
    """Test sets larger than one chunk (MNIST's 10,000 rows): every chunk counts."""
    from kanfarm.models import build_model
    from kanfarm.training.loop import evaluate

    torch.manual_seed(0)
    model = build_model(RunConfig(dataset="digits", model="mlp"), digits.n_features, digits.n_classes)
    x, y = digits.x_test, digits.y_test
    model.eval()
    with torch.no_grad():
        logits = model(x)
    want_loss = torch.nn.functional.cross_entropy(logits, y).item()
    want_acc = (logits.argmax(dim=1) == y).float().mean().item()
    for chunk in (7, 100, x.shape[0]):
        loss, acc = evaluate(model, x, y, chunk=chunk)
        assert loss == pytest.approx(want_loss, rel=1e-5) and acc == pytest.approx(want_acc, abs=1e-7)


def test_train_metrics_come_from_the_seeded_subset_of_train_eval_size(digits):
    """``train_eval_size`` changes what train_loss/acc are measured on, nothing else: the same
    test metrics as without it, train accuracies in steps of 1/100 (not of 1/1437, the full set)."""
    config = RunConfig(dataset="digits", model="mlp", depth="shallow", optimizer="adam", lr=0.01,
                       batch_size=64, max_epochs=2)
    _, full = run(config, digits)
    _, subset = run(dataclasses.replace(config, train_eval_size=100), digits)
    assert [(r.test_loss, r.test_acc) for r in subset] == [(r.test_loss, r.test_acc) for r in full]
    for r in subset:
        assert r.train_acc * 100 == pytest.approx(round(r.train_acc * 100), abs=1e-4)
    assert [r.train_acc for r in subset] != [r.train_acc for r in full]


def test_an_epochs_loss_sum_is_float64_as_a_packs(monkeypatch):
    """Two finite batch losses of 3e38 overflow a float32 sum: the run would be "diverged" alone
    but not in a pack, which sums in float64."""
    from kanfarm.training import backprop

    monkeypatch.setattr(backprop, "backprop_step", lambda *args: torch.tensor(3e38))
    batches = [(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))] * 2
    total = backprop.Backprop().train_epoch(None, {"all": None}, iter(batches), 1, RunConfig())
    assert total.dtype == torch.float64 and total.item() == pytest.approx(6e38, rel=1e-6)


def test_resume_is_bit_identical(digits, tmp_path):
    config = RunConfig(dataset="digits", model="mlp", depth="medium", optimizer="sgd_momentum", lr=0.05,
                       batch_size=128, max_epochs=4, seed=3)
    straight = CheckpointManager(tmp_path / "a", config.config_hash())
    result, full = run(config, digits, checkpoints=straight)
    assert result.status == "completed"

    # Stop after epoch 2 (should_stop is asked before each epoch), then resume in a fresh call.
    ckpt = CheckpointManager(tmp_path / "b", config.config_hash())
    asked = []

    def stop_after_two() -> bool:
        asked.append(1)
        return len(asked) > 2

    first = run(config, digits, checkpoints=ckpt, should_stop=stop_after_two)
    assert first[0].status == "stopped" and first[0].epochs_run == 2
    # Scramble the global RNG: resume must restore it from the checkpoint.
    torch.manual_seed(12345)
    second = run(config, digits, checkpoints=ckpt)
    assert second[0].status == "completed"
    resumed = first[1] + second[1]
    assert [r.epoch for r in resumed] == [0, 1, 2, 3, 4]
    strip = [dataclasses.replace(r, seconds=0.0) for r in full]
    assert strip == [dataclasses.replace(r, seconds=0.0) for r in resumed]
    a = torch.load(straight.paths()[0][1], weights_only=True)["state"]["model"]
    b = torch.load(ckpt.paths()[0][1], weights_only=True)["state"]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_loads_the_checkpoint_to_host_memory(digits, tmp_path, monkeypatch):
    """Mapped to the GPU, a checkpoint would leave Adam's ``step`` counters there (torch.optim
    keeps them where they were loaded), and every later step would sync on them; load_state_dict
    moves weights and moments to the device anyway. CPU-only CI can only check the mapping."""
    config = RunConfig(dataset="digits", model="mlp", depth="shallow", optimizer="adam", lr=1e-3,
                       batch_size=256, max_epochs=2, seed=3)
    ckpt = CheckpointManager(tmp_path, config.config_hash())
    run(config, digits, checkpoints=ckpt, should_stop=lambda: len(ckpt.paths()) > 1)
    mapped = []
    load_latest = CheckpointManager.load_latest
    monkeypatch.setattr(CheckpointManager, "load_latest",
                        lambda self, map_location="cpu": mapped.append(map_location) or load_latest(self, map_location))
    result, rows = run(config, digits, checkpoints=ckpt)
    assert mapped == ["cpu"] and result.status == "completed" and rows


@pytest.mark.parametrize("model,trainer", [("mlp", "backprop"), ("kan", "backprop"), ("mlp", "hsic")])
def test_batch_norm_runs_learn_and_resume_exactly(digits, tmp_path, model, trainer):
    """The running statistics are state: a resumed run restores them with the weights, and
    evaluation uses them (eval mode), so rows after the resume equal the uninterrupted run's."""
    config = RunConfig(dataset="digits", model=model, depth="medium", optimizer="adam", lr=0.005,
                       batch_size=128, max_epochs=3, seed=2, batch_norm=True, trainer=trainer,
                       dropout=0.0 if trainer == "hsic" else 0.2)  # as in paper-hsic-mnist
    result, full = run(config, digits)
    # three epochs: HSIC learns slower than backprop (chance is 0.1)
    assert result.status == "completed" and max(r.test_acc for r in full) >= (0.5 if trainer == "hsic" else 0.8)
    ckpt = CheckpointManager(tmp_path, config.config_hash())
    calls = iter([False, True])
    first = run(config, digits, checkpoints=ckpt, should_stop=lambda: next(calls, False))
    assert first[0].epochs_run == 1
    saved = torch.load(ckpt.paths()[0][1], weights_only=True)["state"]["model"]
    assert any(k.endswith("running_mean") for k in saved)
    torch.manual_seed(999)
    _, rest = run(config, digits, checkpoints=ckpt)
    strip = lambda rows: [dataclasses.replace(r, seconds=0.0) for r in rows]
    assert strip(first[1] + rest) == strip(full)


def test_kan_resume_is_bit_identical(digits, tmp_path):
    config = RunConfig(dataset="digits", model="kan", depth="shallow", optimizer="adam", lr=0.01,
                       batch_size=128, max_epochs=3, seed=1)
    _, full = run(config, digits)
    ckpt = CheckpointManager(tmp_path, config.config_hash())
    calls = iter([False, True])
    first = run(config, digits, checkpoints=ckpt, should_stop=lambda: next(calls, False))
    second = run(config, digits, checkpoints=ckpt)
    resumed = first[1] + second[1]
    assert [dataclasses.replace(r, seconds=0.0) for r in full] == \
           [dataclasses.replace(r, seconds=0.0) for r in resumed]


@pytest.mark.parametrize("model,lr", [("kan", 1e6), ("mlp", 1e20)])
def test_absurd_learning_rate_diverges(digits, model, lr):
    config = RunConfig(dataset="digits", model=model, depth="shallow", optimizer="sgd", lr=lr,
                       batch_size=64, max_epochs=5)
    result, records = run(config, digits)
    assert result.status == "diverged"
    assert records[-1].diverged and records[-1].test_acc is None
    assert all(not r.diverged for r in records[:-1])


def test_corrupted_checkpoint_falls_back_to_previous(digits, tmp_path, caplog):
    config = RunConfig(dataset="digits", model="mlp", depth="shallow", lr=0.01, batch_size=128, max_epochs=3)
    ckpt = CheckpointManager(tmp_path, config.config_hash(), keep=2)
    _, full = run(config, digits, checkpoints=ckpt)
    (newest_epoch, newest), (older_epoch, _) = ckpt.paths()
    assert (newest_epoch, older_epoch) == (3, 2)
    newest.write_bytes(newest.read_bytes()[:-10] + b"0123456789")
    with caplog.at_level(logging.WARNING):
        loaded = ckpt.load_latest()
    assert loaded is not None and loaded[0] == 2
    assert "unusable" in caplog.text

    # Rerunning resumes from epoch 2 and reproduces epoch 3 exactly.
    result, again = run(config, digits, checkpoints=ckpt)
    assert [r.epoch for r in again] == [3]
    assert dataclasses.replace(again[0], seconds=0.0) == dataclasses.replace(full[-1], seconds=0.0)


def test_foreign_or_missing_checkpoints_start_fresh(digits, tmp_path, caplog):
    config = RunConfig(dataset="digits", model="mlp", depth="shallow", lr=0.01, batch_size=128, max_epochs=1)
    other = CheckpointManager(tmp_path, "not-this-config")
    other.save(1, {"anything": torch.zeros(1)})
    ckpt = CheckpointManager(tmp_path, config.config_hash())
    with caplog.at_level(logging.WARNING):
        result, records = run(config, digits, checkpoints=ckpt)
    assert [r.epoch for r in records] == [0, 1]
    assert "another config" in caplog.text


def test_checkpoints_of_another_config_are_refused(digits, tmp_path):
    config = RunConfig(dataset="digits", model="mlp", depth="shallow", lr=0.01, batch_size=128, max_epochs=1)
    other = RunConfig(dataset="digits", model="mlp", depth="shallow", lr=0.02, batch_size=128, max_epochs=1)
    with pytest.raises(ValueError, match="cannot resume"):
        run(config, digits, checkpoints=CheckpointManager(tmp_path, other.config_hash()))


def test_a_resume_removes_checkpoints_of_a_history_not_resumed_and_a_save_only_older_ones(tmp_path):
    """Newer files that were not resumed from (corrupt, or refused by ``usable``) would otherwise
    count towards ``keep`` and push out the checkpoint just written; they go when the resume
    passes them over. A save removes none that is newer than its own: it can be the checkpoint
    of a worker that took the run over while this one was writing (and lost its lease)."""
    ckpt = CheckpointManager(tmp_path, "h", keep=2, usable=lambda epoch, digest: epoch < 5)
    for epoch in (5, 6):
        ckpt.save(epoch, {"w": torch.full((2,), float(epoch))})
    stale = CheckpointManager(tmp_path, "h", keep=2)
    stale.save(0, {"w": torch.zeros(2)})
    assert [e for e, _ in ckpt.paths()] == [6, 5, 0]
    assert ckpt.load_latest()[0] == 0  # 6 and 5 refused
    assert [e for e, _ in ckpt.paths()] == [0]
    ckpt.save(1, {"w": torch.ones(2)})
    ckpt.save(2, {"w": torch.ones(2)})
    assert [e for e, _ in ckpt.paths()] == [2, 1]
    assert ckpt.load_latest()[0] == 2
    refused = CheckpointManager(tmp_path, "h", usable=lambda epoch, digest: False)
    assert refused.load_latest() is None and refused.paths() == []  # a fresh start leaves none behind


def test_a_save_whose_record_is_refused_removes_no_checkpoint(tmp_path):
    """A worker that lost its run writes a file before its record is refused: it must not prune
    the checkpoints of the worker that took the run over. ``usable`` is asked with the digest."""
    ckpt = CheckpointManager(tmp_path, "h", keep=1)
    ckpt.save(0, {"w": torch.zeros(2)})
    ckpt.save(1, {"w": torch.ones(2)})
    assert [e for e, _ in ckpt.paths()] == [1]
    refused = CheckpointManager(tmp_path, "h", keep=1, on_save=lambda *args: False)
    refused.save(2, {"w": torch.full((2,), 2.0)})
    assert [e for e, _ in ckpt.paths()] == [2, 1]
    digests = [(e, (tmp_path / f"epoch-00000{e}.pt.sha256").read_text()) for e in (2, 1)]
    asked = []
    trusting = CheckpointManager(tmp_path, "h", usable=lambda epoch, digest: asked.append((epoch, digest)) or epoch < 2)
    assert trusting.load_latest()[0] == 1
    assert asked == digests and [e for e, _ in ckpt.paths()] == [1]  # the refused newer one goes


def test_an_error_of_the_store_during_a_resume_leaves_every_checkpoint(tmp_path):
    """``usable`` asks the database: its error (a blip) is not the file's fault. Taken for an
    unusable file, it made the resume delete every checkpoint and start again from epoch 0."""
    ckpt = CheckpointManager(tmp_path, "h", keep=2)
    for epoch in (2, 3):
        ckpt.save(epoch, {"w": torch.full((2,), float(epoch))})

    def database_down(epoch, digest):
        raise ConnectionError("server closed the connection unexpectedly")

    with pytest.raises(ConnectionError):
        CheckpointManager(tmp_path, "h", usable=database_down).load_latest()
    assert [e for e, _ in ckpt.paths()] == [3, 2]


def test_a_save_removes_no_checkpoint_newer_than_its_own(tmp_path):
    """Another worker (which took the run over while this one was stalled between its record and
    its prune) may write a newer checkpoint meanwhile: it is theirs, and stays."""
    theirs = CheckpointManager(tmp_path, "h", keep=10)
    ckpt = CheckpointManager(tmp_path, "h", keep=1,
                             on_save=lambda epoch, path, digest: theirs.save(epoch + 1, {"w": torch.ones(2)}) and None)
    ckpt.save(0, {"w": torch.zeros(2)})
    assert [e for e, _ in ckpt.paths()] == [1, 0]


def test_a_stop_writes_its_checkpoint_even_where_a_file_of_that_epoch_is(digits, tmp_path):
    """A file of the stop's epoch that this run did not write (a worker that lost the run wrote it,
    or another database's run) may be one the store never recorded: the stop writes its own."""
    config = RunConfig(dataset="digits", model="mlp", depth="shallow", lr=0.05, batch_size=256, max_epochs=3)
    told = []
    ckpt = CheckpointManager(tmp_path, config.config_hash(), min_interval_s=3600,
                             on_save=lambda epoch, path, digest: told.append((epoch, digest)))
    calls = iter([False, True])

    def stop_before_epoch_2():
        stopping = next(calls, False)
        if stopping:  # epoch 1 trained, not checkpointed (min_interval_s); a stray file of it appears
            CheckpointManager(tmp_path, config.config_hash(), keep=10).save(1, {"other": torch.zeros(1)})
        return stopping

    result, _ = run(config, digits, checkpoints=ckpt, should_stop=stop_before_epoch_2)
    assert result.status == "stopped" and [e for e, _ in told] == [0, 1]
    assert told[1][1] == (tmp_path / "epoch-000001.pt.sha256").read_text()  # the file is this run's now


def test_a_resume_records_its_checkpoint_and_clears_what_killed_writes_left(tmp_path):
    """A crash between a checkpoint's write and its record (or mid-write) must not leave the
    store naming other files than the folder holds, nor temporaries that are never removed."""
    ckpt = CheckpointManager(tmp_path, "h")
    ckpt.save(3, {"w": torch.zeros(2)})
    for name in (".epoch-000004.pt.i6goci8m.tmp", ".epoch-000004.pt.sha256.pwpqq3pb.tmp", ".notes.tmp",
                 ".epoch-000005.pt.k2w9x0ab.tmp"):
        (tmp_path / name).write_bytes(b"half")
        if name != ".epoch-000005.pt.k2w9x0ab.tmp":  # that one is being written now, by another process
            os.utime(tmp_path / name, (time.time() - 7200, time.time() - 7200))
    told = []
    resumed = CheckpointManager(tmp_path, "h", on_save=lambda *args: told.append(args))
    assert resumed.load_latest()[0] == 3
    digest = (tmp_path / "epoch-000003.pt.sha256").read_text()
    assert told == [(3, tmp_path / "epoch-000003.pt", digest)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".epoch-000005.pt.k2w9x0ab.tmp", ".notes.tmp",
                                                          "epoch-000003.pt", "epoch-000003.pt.sha256"]


def test_checkpoints_keep_last_n_and_verify_digest(tmp_path):
    ckpt = CheckpointManager(tmp_path, "h", keep=2)
    for epoch in range(4):
        ckpt.save(epoch, {"w": torch.full((2,), float(epoch))})
    assert [e for e, _ in ckpt.paths()] == [3, 2]
    (tmp_path / "epoch-000003.pt.sha256").write_text("0" * 64)
    epoch, state = ckpt.load_latest()
    assert epoch == 2 and torch.equal(state["w"], torch.full((2,), 2.0))


def test_a_link_or_fifo_planted_in_a_checkpoint_folder_is_replaced_not_followed(tmp_path):
    """Checkpoint folders are named by config hash, which anyone can compute. A link planted at
    the next checkpoint's name made the worker overwrite the file it pointed to; a FIFO there
    blocked the worker for good (saving or loading) while its heartbeat kept the lease."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "ck"
    ckpt = CheckpointManager(folder, "h", keep=3)
    ckpt.save(0, {"w": torch.zeros(2)})
    (folder / "epoch-000001.pt").symlink_to(victim)
    (folder / "epoch-000001.pt.sha256").symlink_to(victim)
    os.mkfifo(folder / "epoch-000002.pt")
    ckpt.save(1, {"w": torch.ones(2)})
    ckpt.save(2, {"w": torch.full((2,), 2.0)})
    assert victim.read_text() == "precious"
    assert not (folder / "epoch-000001.pt").is_symlink() and (folder / "epoch-000002.pt").is_file()
    assert torch.equal(ckpt.load_latest()[1]["w"], torch.full((2,), 2.0))
    # planted after the save: skipped on load (not read, not waited on), the previous one used
    (folder / "epoch-000002.pt").unlink()
    os.mkfifo(folder / "epoch-000002.pt")
    (folder / "epoch-000001.pt").unlink()
    (folder / "epoch-000001.pt").symlink_to("/dev/zero")
    epoch, state = ckpt.load_latest()
    assert epoch == 0 and torch.equal(state["w"], torch.zeros(2))


def test_a_link_planted_as_a_runs_checkpoint_folder_is_not_followed(tmp_path):
    """Its checkpoints were written where the link pointed, and that folder's files of checkpoint
    names pruned."""
    victim = tmp_path / "victim"
    CheckpointManager(victim, "h").save(0, {"w": torch.zeros(2)})
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "h").symlink_to(victim)
    planted = CheckpointManager(tmp_path / "root" / "h", "h", keep=1)
    for act in (lambda: planted.save(5, {"w": torch.ones(2)}), planted.load_latest):
        with pytest.raises(ValueError, match="is a symbolic link"):
            act()
    (tmp_path / "root" / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="is a symbolic link"):
        CheckpointManager(tmp_path / "root" / "dangling", "h").save(0, {"w": torch.zeros(2)})
    assert sorted(p.name for p in victim.iterdir()) == ["epoch-000000.pt", "epoch-000000.pt.sha256"]


def test_a_checkpoint_with_compressed_records_is_skipped_unread(tmp_path):
    """torch.load inflates a deflated record whole: 1 MB of file, 1 GB of memory. torch.save
    never compresses, so such a file is not ours."""
    import hashlib
    import io
    import zipfile

    ckpt = CheckpointManager(tmp_path, "h")
    ckpt.save(0, {"w": torch.zeros(2)})
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "config_hash": "h", "state": {"w": torch.ones(2)}}, buffer)
    squeezed = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, \
            zipfile.ZipFile(squeezed, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
    (tmp_path / "epoch-000001.pt").write_bytes(squeezed.getvalue())
    (tmp_path / "epoch-000001.pt.sha256").write_text(hashlib.sha256(squeezed.getvalue()).hexdigest())
    assert torch.load(io.BytesIO(squeezed.getvalue()), weights_only=True)["epoch"] == 1  # torch would take it
    epoch, state = ckpt.load_latest()
    assert epoch == 0 and torch.equal(state["w"], torch.zeros(2))


def test_batch_norm_run_skips_a_last_batch_of_one_row(digits):
    """BatchNorm1d cannot train on one row: such a final batch is left out, not a crash."""
    n = digits.x_train.shape[0]
    config = RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=n - 1, max_epochs=1,
                       batch_norm=True)
    result, records = run(config, digits)
    assert result.status == "completed" and [r.epoch for r in records] == [0, 1]
    with pytest.raises(ConfigError) as err:  # batches of one row could not train at all
        dataclasses.replace(config, batch_size=1).normalised()
    assert err.value.field == "batch_size"


@pytest.mark.parametrize("n,min_rows,rows", [(10, 1, 10), (11, 2, 11), (10, 2, 9)])
def test_shuffled_batches_keep_a_last_batch_of_exactly_min_rows(n, min_rows, rows):
    """Only a last batch *shorter* than ``min_rows`` is left out: one of exactly 1 row (2 with
    batch norm) trains, or its rows would silently never be seen."""
    from kanfarm.training.loop import shuffled_batches

    x, y = torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n)
    batches = list(shuffled_batches(x, y, 3, torch.Generator().manual_seed(0), min_rows=min_rows))
    assert [b[0].shape[0] for b in batches] == [3] * (n // 3) + ([n % 3] if n % 3 >= min_rows else [])
    seen = torch.cat([b[1] for b in batches])
    assert seen.shape[0] == rows and seen.unique().shape[0] == rows  # each row once


SCRIPTED_TEST_ACC = [0.1, 0.5, 0.5, 0.4, 0.4, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]


def scripted_evaluate(monkeypatch, records):
    """Make every evaluation of epoch ``len(records)`` return SCRIPTED_TEST_ACC[that epoch]."""
    from kanfarm.training import loop

    def evaluate(model, x, y, chunk=8192):
        acc = SCRIPTED_TEST_ACC[len(records)]
        return 1.0 - acc, acc
    monkeypatch.setattr(loop, "evaluate", evaluate)


def test_patience_stops_counting_from_the_first_best_epoch(digits, tmp_path, monkeypatch):
    """Best 0.5 at epoch 1 (the tie at 2 does not move it); patience 2 stops the run at epoch 3."""
    config = RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=10,
                       patience=2)
    records = []
    scripted_evaluate(monkeypatch, records)
    ckpt = CheckpointManager(tmp_path, config.config_hash())
    result = train(config, digits, records.append, checkpoints=ckpt)
    assert (result.status, result.epochs_run) == ("completed", 3)
    assert [r.epoch for r in records] == [0, 1, 2, 3]
    epoch, state = ckpt.load_latest()
    assert epoch == 3 and state["progress"] == {"best_acc": 0.5, "best_epoch": 1}


def test_a_resumed_run_stops_by_patience_where_the_straight_run_did(digits, tmp_path, monkeypatch):
    """best_acc/best_epoch are checkpointed state: a resume after epoch 2 must still stop at 3."""
    config = RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=10,
                       patience=2)
    full = []
    scripted_evaluate(monkeypatch, full)
    assert train(config, digits, full.append).epochs_run == 3
    records = []
    scripted_evaluate(monkeypatch, records)
    ckpt = CheckpointManager(tmp_path, config.config_hash())
    calls = iter([False, False, True])  # asked before each epoch: stop after epoch 2
    first = train(config, digits, records.append, checkpoints=ckpt, should_stop=lambda: next(calls, False))
    assert (first.status, first.epochs_run) == ("stopped", 2)
    second = train(config, digits, records.append, checkpoints=ckpt)
    assert (second.status, second.epochs_run) == ("completed", 3)
    strip = lambda rows: [dataclasses.replace(r, seconds=0.0) for r in rows]
    assert strip(records) == strip(full)


def test_patience_waits_on_test_accuracy_not_train_accuracy(digits, tmp_path, monkeypatch):
    """The best epoch is the best *test* accuracy's: with train accuracy rising every epoch, a
    best tracked on train accuracy would never let patience stop the run."""
    from kanfarm.training import loop

    config = RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=10,
                       patience=2)
    calls = []

    def evaluate(model, x, y, chunk=8192):  # the train subset, then the test set, once per epoch
        calls.append(1)
        epoch = (len(calls) - 1) // 2
        acc = 0.05 * (epoch + 1) if len(calls) % 2 else SCRIPTED_TEST_ACC[epoch]
        return 1.0 - acc, acc
    monkeypatch.setattr(loop, "evaluate", evaluate)
    records = []
    ckpt = CheckpointManager(tmp_path, config.config_hash())
    result = train(config, digits, records.append, checkpoints=ckpt)
    assert (result.status, result.epochs_run) == ("completed", 3)
    assert [r.train_acc for r in records] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert ckpt.load_latest()[1]["progress"] == {"best_acc": 0.5, "best_epoch": 1}


@pytest.mark.parametrize("spacing", [{"every": 5}, {"min_interval_s": 3600}])
def test_a_run_stopped_by_patience_checkpoints_its_last_epoch(digits, tmp_path, monkeypatch, spacing):
    """A patience stop is the run's final epoch: it is saved even when ``every`` or
    ``min_interval_s`` would skip it, or a resume would train epochs again that the store has."""
    config = RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=10,
                       patience=2)
    records = []
    scripted_evaluate(monkeypatch, records)
    ckpt = CheckpointManager(tmp_path, config.config_hash(), **spacing)
    result = train(config, digits, records.append, checkpoints=ckpt)
    assert (result.status, result.epochs_run) == ("completed", 3)
    assert [e for e, _ in ckpt.paths()] == [3, 0]


def test_a_non_finite_training_loss_is_divergence_even_where_evaluation_is_finite(digits):
    """An epoch whose summed training loss is NaN ends the run as diverged at that epoch (as a
    pack does for its member), although the weights still evaluate to finite numbers."""
    from kanfarm.training.backprop import Backprop
    from kanfarm.training.loop import fit

    class NaNLossAtEpoch2(Backprop):
        def train_epoch(self, model, optimizers, batches, epoch, config):
            total = super().train_epoch(model, optimizers, batches, epoch, config)
            return torch.full_like(total, float("nan")) if epoch == 2 else total

    config = RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=4)
    records = []
    result = fit(config, digits, records.append, NaNLossAtEpoch2())
    assert (result.status, result.epochs_run) == ("diverged", 2)
    assert [(r.epoch, r.diverged) for r in records] == [(0, False), (1, False), (2, True)]
    assert records[-1].test_acc is None


CODE_RAN = []


def _run_code(tag):
    CODE_RAN.append(tag)
    return tag


class _Tampered:
    def __reduce__(self):
        return _run_code, ("unpickled",)


def test_a_checkpoint_that_would_run_code_on_load_is_skipped(tmp_path):
    """weights_only loading: a file pickling arbitrary objects is refused even with a valid digest."""
    import hashlib
    import io

    ckpt = CheckpointManager(tmp_path, "h")
    ckpt.save(3, {"w": torch.ones(2)})
    buffer = io.BytesIO()
    torch.save({"epoch": 4, "config_hash": "h", "state": {"w": _Tampered()}}, buffer)
    (tmp_path / "epoch-000004.pt").write_bytes(buffer.getvalue())
    (tmp_path / "epoch-000004.pt.sha256").write_text(hashlib.sha256(buffer.getvalue()).hexdigest())
    CODE_RAN.clear()
    epoch, state = ckpt.load_latest()
    assert epoch == 3 and torch.equal(state["w"], torch.ones(2))
    assert CODE_RAN == []


def test_a_checkpoint_renamed_to_another_epoch_is_skipped(tmp_path):
    """The epoch inside the file must match its name: a copy named epoch 5 holds epoch 3's state."""
    import shutil

    ckpt = CheckpointManager(tmp_path, "h")
    ckpt.save(3, {"w": torch.ones(2)})
    for suffix in (".pt", ".pt.sha256"):
        shutil.copy(tmp_path / f"epoch-000003{suffix}", tmp_path / f"epoch-000005{suffix}")
    assert [e for e, _ in ckpt.paths()] == [5, 3]
    epoch, state = ckpt.load_latest()
    assert epoch == 3 and torch.equal(state["w"], torch.ones(2))
