"""The runner's wiring of a claimed run to the store: a worker that lost its lease writes nothing more."""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from kanfarm.config import ConfigError, RunConfig
from kanfarm.runner import execute_run


def test_worker_whose_run_was_taken_over_writes_no_more_rows(sqlite_store, tmp_path, monkeypatch):
    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    store = sqlite_store
    config = RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=4)
    store.submit_grid("g", {}, [(config, 1000, None)])
    run_id = store.run_ids()[0]
    seen = []

    def take_over_after_epoch_1(rid, record):
        seen.append(record.epoch)
        if record.epoch == 1:  # w1 "paused" past its lease: the lease expires and w2 claims the run
            with store.engine.begin() as conn:
                conn.execute(sa.text("UPDATE runs SET lease_expires_at = '2000-01-01 00:00:00' WHERE id = :i"),
                             {"i": rid})
            assert store.claim(rid, "w2", 600) is not None

    outcome = execute_run(store, run_id, "w1", lease_s=600, on_epoch=take_over_after_epoch_1)
    assert outcome.status == "stopped"
    assert seen == [0, 1]
    assert [row["epoch"] for row in store.epoch_metrics(run_id)] == [0, 1]
    run = store.run(run_id)
    assert (run.status, run.worker, run.attempts) == ("running", "w2", 2)  # w1 left w2's claim alone
    # nor did it write a checkpoint after losing the run: the folder is w2's now
    assert [c.epoch for c in store.checkpoints(run_id)] == [0]
    assert sorted(p.name for p in (tmp_path / "ckpt" / run.config_hash).glob("*.pt")) == ["epoch-000000.pt"]


@pytest.mark.parametrize("packed", [False, True])
def test_a_checkpoint_folder_that_cannot_be_written_claims_nothing(sqlite_store, tmp_path, monkeypatch, packed):
    """Read-only, an absent mount, a full disk: every run taken would fail for the machine's fault.
    (/proc refuses new entries, to root too.)"""
    from kanfarm.config import ConfigError
    from kanfarm.runner import work_loop

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", "/proc/kanfarm-checkpoints")
    config = RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=1)
    sqlite_store.submit_grid("g", {}, [(dataclasses.replace(config, lr=lr), 1000, None) for lr in (0.1, 0.01)])
    with pytest.raises(ConfigError, match="KANFARM_CHECKPOINT_DIR: '/proc/kanfarm-checkpoints' cannot be written"):
        work_loop(sqlite_store, "w1", grid="g", pack_size=2 if packed else 1)
    assert [(r.status, r.attempts) for r in map(sqlite_store.run, sqlite_store.run_ids())] == [("pending", 0)] * 2


@pytest.mark.parametrize("packed", [False, True])
def test_a_setting_gone_bad_between_runs_claims_nothing_more(sqlite_store, tmp_path, monkeypatch, packed):
    """Checked before each claim, not once per worker nor after the claim: the second run stays
    waiting with no attempt spent, rather than held until its lease runs out."""
    from kanfarm.runner import work_loop

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    config = RunConfig(dataset="digits", model="mlp", depth="shallow", max_epochs=1)
    sqlite_store.submit_grid("g", {}, [(dataclasses.replace(config, batch_size=b), 1000, None) for b in (256, 128)])

    def break_after_the_first_run(run_id, record):
        if record.epoch == 1:
            monkeypatch.setenv("KANFARM_CHECKPOINT_KEEP", "none")

    with pytest.raises(ConfigError, match="KANFARM_CHECKPOINT_KEEP"):
        work_loop(sqlite_store, "w1", grid="g", pack_size=2 if packed else 1, on_epoch=break_after_the_first_run)
    assert sorted((r.status, r.attempts) for r in map(sqlite_store.run, sqlite_store.run_ids())) == [
        ("completed", 1), ("pending", 0)]


def _run_cancelled_after(store, tmp_path, monkeypatch, max_epochs: int, epoch: int):
    """One digits MLP run of ``max_epochs``, trained by w1 and cancelled once ``epoch`` is written
    (so during the next one); checkpoints only at epoch 0 and at the stop. Returns (id, outcome)."""
    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("KANFARM_CHECKPOINT_SECONDS", "3600")
    config = RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=max_epochs)
    store.submit_grid("g", {}, [(config, 1000, None)])
    run_id = store.run_ids()[0]

    def cancel(rid, record):
        if record.epoch == epoch:
            store.cancel("g")

    return run_id, execute_run(store, run_id, "w1", lease_s=600, on_epoch=cancel)


def test_a_run_cancelled_in_its_last_epoch_is_not_reported_completed(sqlite_store, tmp_path, monkeypatch):
    run_id, outcome = _run_cancelled_after(sqlite_store, tmp_path, monkeypatch, max_epochs=2, epoch=2)
    assert (outcome.status, sqlite_store.run(run_id).status) == ("stopped", "cancelled")


def test_a_cancelled_run_writes_the_epoch_in_progress_and_a_checkpoint_then_stops(sqlite_store, tmp_path, monkeypatch):
    """`cancel` says running runs stop at the next epoch boundary: the epoch that was training is
    kept with a checkpoint, so a run taken back resumes there (it was dropped, with no checkpoint
    since the last timed one, and retrained)."""
    store = sqlite_store
    run_id, outcome = _run_cancelled_after(store, tmp_path, monkeypatch, max_epochs=6, epoch=1)
    assert (outcome.status, store.run(run_id).status) == ("stopped", "cancelled")
    assert [row["epoch"] for row in store.epoch_metrics(run_id)] == [0, 1, 2]
    assert [c.epoch for c in store.checkpoints(run_id)] == [0, 2]
    assert store.mark_queued([run_id]) == 1
    resumed = []
    assert execute_run(store, run_id, "w2", on_epoch=lambda rid, rec: resumed.append(rec.epoch)).status == "completed"
    assert resumed == [3, 4, 5, 6]  # from the stop's checkpoint, nothing trained twice


def test_a_cancelled_run_taken_back_before_its_stop_checkpoint_writes_none(sqlite_store, tmp_path, monkeypatch):
    """Cancelled during epoch 2, then taken back and claimed by w2 before w1 checkpoints its stop:
    the folder is w2's now, and w1 writes (and prunes) nothing there."""
    store = sqlite_store
    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("KANFARM_CHECKPOINT_SECONDS", "3600")
    config = RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=6)
    store.submit_grid("g", {}, [(config, 1000, None)])
    run_id = store.run_ids()[0]

    def cancel_then_take_back(rid, record):
        if record.epoch == 1:
            store.cancel("g")
        elif record.epoch == 2:  # written as w1's last epoch; its stop checkpoint comes next
            assert store.mark_queued([run_id]) == 1 and store.claim(run_id, "w2", 600) is not None

    assert execute_run(store, run_id, "w1", lease_s=600, on_epoch=cancel_then_take_back).status == "stopped"
    assert sorted(p.name for p in (tmp_path / "ckpt" / config.config_hash()).glob("*.pt")) == ["epoch-000000.pt"]
    assert store.run(run_id).worker == "w2" and [c.epoch for c in store.checkpoints(run_id)] == [0]


def _grid(store, configs):
    store.submit_grid("g", {}, [(c, 1000, None) for c in configs])
    return store.run_ids()


def _three_one_epoch_runs(store, monkeypatch, tmp_path) -> list[int]:
    """Three one-epoch digits MLPs that pack together (checkpoints under ``tmp_path``)."""
    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    base = dict(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=1)
    return _grid(store, [RunConfig(lr=lr, **base) for lr in (0.01, 0.02, 0.03)])


def test_a_packs_epoch_rows_go_in_one_transaction_and_a_member_taken_over_stops(sqlite_store, tmp_path, monkeypatch):
    """One write per pack epoch, not one per member (each cost more than a small pack's epoch on a
    GPU). A member whose run another worker took over writes no more rows and stops, alone."""
    from kanfarm.runner import execute_pack

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    store = sqlite_store
    base = dict(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=3, optimizer="sgd")
    ids = _grid(store, [RunConfig(lr=lr, **base) for lr in (0.01, 0.02, 0.03)])
    taken = ids[1]
    batches, seen = [], []
    write_many = store.write_epochs

    def spy(rows, worker):
        batches.append(sorted(run_id for run_id, _ in rows))
        return write_many(rows, worker)

    def take_over_after_epoch_1(rid, record):
        seen.append((rid, record.epoch))
        if rid == taken and record.epoch == 1:
            with store.engine.begin() as conn:
                conn.execute(sa.text("UPDATE runs SET lease_expires_at = '2000-01-01 00:00:00' WHERE id = :i"),
                             {"i": rid})
            assert store.claim(rid, "w2", 600) is not None

    monkeypatch.setattr(store, "write_epochs", spy)
    monkeypatch.setattr(store, "write_epoch", lambda *a, **k: pytest.fail("a pack member wrote a row alone"))
    outcomes = {o.run_id: o.status for o in execute_pack(store, ids, "w1", lease_s=600, on_epoch=take_over_after_epoch_1)}
    assert outcomes == {ids[0]: "completed", taken: "stopped", ids[2]: "completed"}
    # epochs 0-3, one write each; at epoch 2 the taken run's row is refused, and it stops
    assert batches == [ids, ids, ids, [ids[0], ids[2]]]
    assert [r["epoch"] for r in store.epoch_metrics(taken)] == [0, 1]
    assert (store.run(taken).status, store.run(taken).worker) == ("running", "w2")
    assert all([r["epoch"] for r in store.epoch_metrics(i)] == [0, 1, 2, 3] for i in (ids[0], ids[2]))


def test_a_pack_member_cancelled_mid_epoch_keeps_that_epoch_and_stops_alone(sqlite_store, tmp_path, monkeypatch):
    from kanfarm.runner import execute_pack

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("KANFARM_CHECKPOINT_SECONDS", "3600")
    store = sqlite_store
    base = dict(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=4, optimizer="sgd")
    ids = _grid(store, [RunConfig(lr=lr, **base) for lr in (0.01, 0.02, 0.03)])
    store.submit_grid("just-one", {}, [(RunConfig(lr=0.02, **base), 1000, None)])  # ids[1] alone

    def cancel_after_epoch_1(rid, record):
        if rid == ids[1] and record.epoch == 1:
            store.cancel("just-one")

    outcomes = {o.run_id: o.status for o in execute_pack(store, ids, "w1", lease_s=600, on_epoch=cancel_after_epoch_1)}
    assert outcomes == {ids[0]: "completed", ids[1]: "stopped", ids[2]: "completed"}
    assert store.run(ids[1]).status == "cancelled"
    assert [r["epoch"] for r in store.epoch_metrics(ids[1])] == [0, 1, 2]  # the epoch under way kept
    assert [c.epoch for c in store.checkpoints(ids[1])] == [0, 2]
    assert all([r["epoch"] for r in store.epoch_metrics(i)] == [0, 1, 2, 3, 4] for i in (ids[0], ids[2]))


@pytest.mark.parametrize("lrs", [(0.01, 0.02, 0.03), (1e30, 0.02, 0.03)], ids=["healthy", "one-diverging"])
def test_a_failed_write_of_a_packs_rows_fails_every_member_whose_row_it_held(sqlite_store, tmp_path, monkeypatch, lrs):
    """Not only the member that happened to flush the batch: the others would train on without
    that epoch's row and end completed with a gap in their history. A member diverging in that
    epoch had its row in the failed batch too: its outcome must say failed, as the store does."""
    from kanfarm.runner import execute_pack

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    store = sqlite_store
    base = dict(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=3, optimizer="sgd")
    ids = _grid(store, [RunConfig(lr=lr, **base) for lr in lrs])
    write_many = store.write_epochs

    def refuse_epoch_1(rows, worker):
        if rows[0][1].epoch == 1:
            raise sa.exc.IntegrityError("INSERT INTO epoch_metrics ...", {}, Exception("constraint failed"))
        return write_many(rows, worker)

    monkeypatch.setattr(store, "write_epochs", refuse_epoch_1)
    outcomes = {o.run_id: o.status for o in execute_pack(store, ids, "w1")}
    assert outcomes == dict.fromkeys(ids, "failed") == {i: store.run(i).status for i in ids}
    assert all("constraint failed" in store.run(i).error for i in ids)
    assert all([r["epoch"] for r in store.epoch_metrics(i)] == [0] for i in ids)
    # each member's error carries the write's own traceback, not one grown by every member before it
    assert len({store.run(i).error for i in ids}) == 1


def test_a_pack_that_crashes_keeps_the_results_of_members_that_had_ended(sqlite_store, tmp_path, monkeypatch):
    """A member that diverged at epoch 1 stays diverged when the pack itself crashes at epoch 2
    (out of memory in a step); only the members still training are marked failed."""
    import kanfarm.packing.trainer as pack_trainer
    from kanfarm.runner import execute_pack

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    store = sqlite_store
    base = dict(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=4, optimizer="sgd")
    blows_up, second, healthy = _grid(store, [RunConfig(lr=lr, **base) for lr in (1e30, 0.01, 0.02)])
    step, calls = pack_trainer.pack_step, []
    per_epoch = -(-1437 // 256)  # digits' training rows in batches of 256

    def out_of_memory_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) > per_epoch:
            raise RuntimeError("CUDA out of memory (simulated)")
        return step(*args, **kwargs)

    monkeypatch.setattr(pack_trainer, "pack_step", out_of_memory_in_epoch_2)
    outcomes = {o.run_id: o.status for o in execute_pack(store, [blows_up, second, healthy], "w1")}
    assert outcomes == {blows_up: "diverged", second: "failed", healthy: "failed"}
    assert store.run(blows_up).status == "diverged" and store.run(blows_up).error is None
    assert "out of memory" in store.run(healthy).error


def test_a_members_own_error_fails_it_alone(sqlite_store, tmp_path, monkeypatch):
    """One member's checkpoint folder cannot be made (a file is in its place), another's record
    cannot be taken at epoch 2: each fails alone, with its error; the third trains to the end."""
    from kanfarm.runner import execute_pack

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    store = sqlite_store
    base = dict(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=3, optimizer="sgd")
    no_folder, bad_sink, healthy = _grid(store, [RunConfig(lr=lr, **base) for lr in (0.01, 0.02, 0.03)])
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / store.run(no_folder).config_hash).write_text("a file where its folder goes")

    def refuse_epoch_2(rid, record):
        if rid == bad_sink and record.epoch == 2:
            raise RuntimeError("disk quota exceeded (simulated)")

    outcomes = {o.run_id: o.status for o in execute_pack(store, [no_folder, bad_sink, healthy], "w1",
                                                           on_epoch=refuse_epoch_2)}
    assert outcomes == {no_folder: "failed", bad_sink: "failed", healthy: "completed"}
    assert "quota" in store.run(bad_sink).error and store.run(no_folder).error
    assert [r["epoch"] for r in store.epoch_metrics(healthy)] == [0, 1, 2, 3]
    alone = []
    from kanfarm.data import load_dataset
    from kanfarm.training import train
    train(store.run(healthy).config, load_dataset("digits"), alone.append)
    assert [r["test_acc"] for r in store.epoch_metrics(healthy)] == pytest.approx([r.test_acc for r in alone], abs=1e-6)


def _failing_once(store, monkeypatch, epoch: int, error=None):
    """Writing the rows of ``epoch`` raises a database error (``error``, else a lost connection)
    the first time (``write_epoch`` for a single run, ``write_epochs`` for a pack's rows)."""
    from sqlalchemy.exc import OperationalError

    write, write_many, failed = store.write_epoch, store.write_epochs, []

    def fail_once(run_id, record):
        if record.epoch == epoch and not failed:
            failed.append(run_id)
            raise error or OperationalError("INSERT ...", {}, Exception("server closed the connection unexpectedly"))

    def flaky(run_id, record, worker=None):
        fail_once(run_id, record)
        return write(run_id, record, worker=worker)

    def flaky_many(rows, worker):
        for run_id, record in rows:
            fail_once(run_id, record)
        return write_many(rows, worker)

    monkeypatch.setattr(store, "write_epoch", flaky)
    monkeypatch.setattr(store, "write_epochs", flaky_many)
    return failed


@pytest.mark.parametrize("pool_timeout", [False, True])
def test_a_database_error_hands_the_run_back_instead_of_failing_it(sqlite_store, tmp_path, monkeypatch, pool_timeout):
    """A lost connection, or no connection to be had from the pool in time (a pack's heartbeats
    and a lock held by a migration, say)."""
    from sqlalchemy.exc import OperationalError, TimeoutError

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    store = sqlite_store
    (run_id,) = _grid(store, [RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=3)])
    error = TimeoutError("QueuePool limit of size 5 overflow 10 reached, connection timed out") if pool_timeout else None
    _failing_once(store, monkeypatch, epoch=2, error=error)
    with pytest.raises(TimeoutError if pool_timeout else OperationalError):  # the Celery task retries on this
        execute_run(store, run_id, "w1")
    run = store.run(run_id)
    assert (run.status, run.error, run.lease_expires_at) == ("queued", None, None)
    assert run.attempts == 0  # the database's fault: the attempt is given back
    assert execute_run(store, run_id, "w2").status == "completed"  # resumes from epoch 1's checkpoint
    assert [r["epoch"] for r in store.epoch_metrics(run_id)] == [0, 1, 2, 3]


def test_the_local_work_loop_rides_out_a_database_error(sqlite_store, tmp_path, monkeypatch):
    from kanfarm.runner import work_loop

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    store = sqlite_store
    base = dict(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=2)
    ids = _grid(store, [RunConfig(lr=lr, **base) for lr in (0.01, 0.02)])
    failed = _failing_once(store, monkeypatch, epoch=1)
    outcomes = work_loop(store, "w1", grid="g", pack_size=2)
    assert failed and sorted(o.status for o in outcomes) == ["completed", "completed"]
    assert all(store.run(i).status == "completed" for i in ids)
    assert all([r["epoch"] for r in store.epoch_metrics(i)] == [0, 1, 2] for i in ids)


def test_a_new_database_beside_an_old_checkpoint_folder_trains_the_run_again(sqlite_store, tmp_path, monkeypatch):
    """Checkpoint folders are named by config: a second database (or study) with the same cell
    finds the first one's checkpoints, and must not resume past rows it never got."""
    from kanfarm.store import Store

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    config = RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=2)
    (first,) = _grid(sqlite_store, [config])
    assert execute_run(sqlite_store, first, "w1").status == "completed"
    second = Store(f"sqlite:///{tmp_path / 'second.db'}")
    second.upgrade()
    try:
        (run_id,) = _grid(second, [config])
        assert execute_run(second, run_id, "w1").status == "completed"
        assert [r["epoch"] for r in second.epoch_metrics(run_id)] == [0, 1, 2]
        # the rows of checkpoints name the files kept: epoch 0 and the final one (no 30 s between
        # them: KANFARM_CHECKPOINT_SECONDS)
        assert [c.epoch for c in second.checkpoints(run_id)] == [0, 2]
        strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "run_id")} for r in rows]
        assert strip(second.epoch_metrics(run_id)) == strip(sqlite_store.epoch_metrics(first))
    finally:
        second.dispose(close=True)


def test_a_pack_that_crashes_while_the_database_fails_leaves_no_run_held(sqlite_store, tmp_path, monkeypatch):
    """Failing the members of a crashed pack hits a database error: the members not yet failed are
    handed back and no heartbeat keeps renewing a lease nobody trains under."""
    import threading

    import pytest
    from sqlalchemy.exc import OperationalError

    from kanfarm.runner import execute_pack

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    store = sqlite_store
    base = dict(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=3)
    ids = _grid(store, [RunConfig(lr=lr, **base) for lr in (0.01, 0.02, 0.03)])
    finish, calls = store.finish, []

    def finish_fails_once(run_id, worker, status, error=None, last_epoch=None):
        calls.append(run_id)
        if len(calls) == 1:
            raise OperationalError("UPDATE runs ...", {}, Exception("server closed the connection"))
        return finish(run_id, worker, status, error=error, last_epoch=last_epoch)

    def crash(rid, record):
        if record.epoch == 1:
            raise RuntimeError("boom")

    monkeypatch.setattr(store, "finish", finish_fails_once)
    with pytest.raises(OperationalError):
        execute_pack(store, ids, "w1", lease_s=0.3, on_epoch=crash)
    for beat in [t for t in threading.enumerate() if t.name.startswith("heartbeat-")]:
        beat.join(timeout=5)  # a beat already under way when it was stopped may still be finishing
        assert not beat.is_alive()
    assert [store.run(i).status for i in ids] == ["queued"] * 3


def test_the_local_work_loop_plans_its_packs_once_and_skips_those_others_took(sqlite_store, tmp_path, monkeypatch):
    """Planning every waiting run again for each pack was quadratic in the grid (0.75 s a pack at
    9,720 runs); a pack whose runs another worker took claims nothing and is no outcome here."""
    from kanfarm.runner import work_loop

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    store = sqlite_store
    base = dict(dataset="digits", model="mlp", depth="shallow", batch_size=512, max_epochs=1)
    ids = _grid(store, [RunConfig(lr=lr, **base) for lr in (0.01, 0.02, 0.03, 0.04, 0.05, 0.06)])
    listed = []
    claimable_runs = store.claimable_runs
    monkeypatch.setattr(store, "claimable_runs", lambda grid=None: listed.append(1) or claimable_runs(grid))

    def another_worker_takes_the_second_pack(run_id, record):
        if record.epoch == 0 and run_id == ids[0]:
            assert all(store.claim(i, "other", 600) is not None for i in ids[2:4])

    outcomes = work_loop(store, "w1", grid="g", pack_size=2, on_epoch=another_worker_takes_the_second_pack)
    assert len(listed) == 2  # one plan, then nothing left
    assert sorted(o.run_id for o in outcomes) == ids[:2] + ids[4:] and {o.status for o in outcomes} == {"completed"}


def test_the_local_work_loop_rides_out_an_outage_of_its_claims(sqlite_store, tmp_path, monkeypatch):
    from sqlalchemy.exc import OperationalError

    import kanfarm.runner
    from kanfarm.runner import work_loop

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setattr(kanfarm.runner.time, "sleep", lambda s: None)
    store = sqlite_store
    (run_id,) = _grid(store, [RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=1)])
    claim_next, failures = store.claim_next, []

    def down_for_three_claims(*args, **kwargs):
        if len(failures) < 3:
            failures.append(1)
            raise OperationalError("SELECT ...", {}, Exception("connection refused"))
        return claim_next(*args, **kwargs)

    monkeypatch.setattr(store, "claim_next", down_for_three_claims)
    assert [o.status for o in work_loop(store, "w1", grid="g")] == ["completed"]
    assert len(failures) == 3 and store.run(run_id).status == "completed"


def test_a_run_whose_finish_hits_a_database_error_is_handed_back(sqlite_store, tmp_path, monkeypatch):
    import pytest
    from sqlalchemy.exc import OperationalError

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    store = sqlite_store
    (run_id,) = _grid(store, [RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=1)])
    finish = store.finish
    monkeypatch.setattr(store, "finish", lambda *a, **k: (_ for _ in ()).throw(
        OperationalError("UPDATE runs ...", {}, Exception("server closed the connection"))))
    with pytest.raises(OperationalError):
        execute_run(store, run_id, "w1")
    assert (store.run(run_id).status, store.run(run_id).attempts) == ("queued", 0)
    monkeypatch.setattr(store, "finish", finish)
    assert execute_run(store, run_id, "w2").status == "completed"  # from the final checkpoint
    assert [r["epoch"] for r in store.epoch_metrics(run_id)] == [0, 1]


def test_a_run_whose_failure_cannot_be_recorded_is_handed_back(sqlite_store, tmp_path, monkeypatch):
    import pytest
    from sqlalchemy.exc import OperationalError

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    store = sqlite_store
    (run_id,) = _grid(store, [RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=2)])
    monkeypatch.setattr(store, "finish", lambda *a, **k: (_ for _ in ()).throw(
        OperationalError("UPDATE runs ...", {}, Exception("server closed the connection"))))

    def crash(rid, record):
        if record.epoch == 1:
            raise RuntimeError("boom")

    with pytest.raises(OperationalError):
        execute_run(store, run_id, "w1", on_epoch=crash)
    assert (store.run(run_id).status, store.run(run_id).lease_expires_at) == ("queued", None)


def test_rows_of_an_abandoned_attempt_past_the_final_epoch_are_deleted(sqlite_store, tmp_path, monkeypatch):
    """An attempt wrote epochs 0-5 and crashed before checkpointing them; the retry ends at epoch 2
    (here: fewer epochs; in life, patience or divergence on a resumed trajectory). Rows 3-5 belong
    to no trajectory of the finished run and must go, or run_summary counts 5 epochs."""
    from kanfarm.training import EpochRecord

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    store = sqlite_store
    (run_id,) = _grid(store, [RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=2)])
    assert store.claim(run_id, "crashed", 600) is not None
    for epoch in range(6):
        store.write_epoch(run_id, EpochRecord(epoch, 1.0, 0.5, 1.0, 0.5, 0.1, {}), worker="crashed")
    with store.engine.begin() as conn:  # its lease runs out
        conn.execute(sa.text("UPDATE runs SET lease_expires_at = '2000-01-01 00:00:00' WHERE id = :i"), {"i": run_id})
    assert execute_run(store, run_id, "w2").status == "completed"
    assert [r["epoch"] for r in store.epoch_metrics(run_id)] == [0, 1, 2]
    assert all(r["test_acc"] != 0.5 for r in store.epoch_metrics(run_id))  # rewritten by w2
    (summary,) = [s for s in store.summary() if s["run_id"] == run_id]
    assert summary["epochs_run"] == 2


@pytest.mark.parametrize("packed", [False, True])
def test_a_failed_resume_drops_rows_an_earlier_attempt_wrote_past_its_failure(sqlite_store, tmp_path, monkeypatch,
                                                                              packed):
    """Attempt 1 checkpointed epoch 2, wrote rows up to 5 and was killed. Attempt 2 resumes at 2 and
    fails after writing epoch 3: rows 4-5 are not of the failed run's trajectory, and reports
    (epochs run, best accuracy) must not count them. Alone and as a pack member."""
    from kanfarm.runner import execute_pack
    from kanfarm.training import EpochRecord

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("KANFARM_CHECKPOINT_SECONDS", "0")
    store = sqlite_store
    base = dict(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=6, optimizer="sgd")
    ids = _grid(store, [RunConfig(lr=lr, **base) for lr in (0.01, 0.02)])
    for run_id in ids:  # attempt 1, for real up to its epoch-2 checkpoint ...
        stop = threading.Event()
        assert execute_run(store, run_id, "w1", shutdown=stop,
                           on_epoch=lambda rid, rec: rec.epoch == 2 and stop.set()).status == "released"
        assert store.checkpoints(run_id)[-1].epoch == 2
        with store.engine.begin() as conn:  # ... then rows 3-5 written and killed: a lapsed lease
            conn.execute(sa.text("UPDATE runs SET status = 'running', worker = 'crashed', "
                                 "lease_expires_at = '2000-01-01 00:00:00' WHERE id = :i"), {"i": run_id})
        for epoch in (3, 4, 5):
            store.write_epoch(run_id, EpochRecord(epoch, 1.0, 0.99, 1.0, 0.99, 0.1, {}), worker="crashed")
    failing = ids[0]

    def fail_after_epoch_3(rid, record):
        if rid == failing and record.epoch == 3:
            raise RuntimeError("a bug of this run")  # not a full disk: that hands the run back

    if packed:
        outcomes = {o.run_id: o.status for o in execute_pack(store, ids, "w2", on_epoch=fail_after_epoch_3)}
        assert outcomes == {ids[0]: "failed", ids[1]: "completed"}
    else:
        assert execute_run(store, failing, "w2", on_epoch=fail_after_epoch_3).status == "failed"
    assert [r["epoch"] for r in store.epoch_metrics(failing)] == [0, 1, 2, 3]
    (summary,) = [s for s in store.summary() if s["run_id"] == failing]
    assert summary["epochs_run"] == 3 and summary["best_test_acc"] < 0.99


def test_a_resume_puts_the_checkpoints_table_right_after_a_crash_between_write_and_record(sqlite_store, tmp_path,
                                                                                            monkeypatch):
    """The attempt wrote its final checkpoint (epoch 3) and crashed before recording it: the table
    named epochs 1 and 2 while the folder held 2 and 3. The retry does not trust the unrecorded
    file: it resumes at epoch 2, trains epoch 3 again, and must leave the table naming the files
    there are."""
    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("KANFARM_CHECKPOINT_SECONDS", "0")
    store = sqlite_store
    (run_id,) = _grid(store, [RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=3)])
    assert execute_run(store, run_id, "w1").status == "completed"
    assert [c.epoch for c in store.checkpoints(run_id)] == [2, 3]
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE runs SET status = 'running', worker = 'crashed', "
                             "lease_expires_at = '2000-01-01 00:00:00' WHERE id = :i"), {"i": run_id})
        conn.execute(sa.text("UPDATE checkpoints SET epoch = 1 WHERE run_id = :i AND epoch = 3"), {"i": run_id})
    trained = []
    assert execute_run(store, run_id, "w2", on_epoch=lambda rid, rec: trained.append(rec.epoch)).status == "completed"
    assert trained == [3]
    recorded = store.checkpoints(run_id)
    assert [c.epoch for c in recorded] == [2, 3]
    assert all(tmp_path.joinpath("ckpt", store.run(run_id).config_hash, f"epoch-{c.epoch:06d}.pt") == Path(c.path)
               and Path(c.path).is_file() for c in recorded)


def test_a_checkpoint_the_store_did_not_record_is_not_resumed(sqlite_store, tmp_path, monkeypatch):
    """A worker that lost the run between its lease check and its write leaves a checkpoint whose
    record the store refused; its epoch rows may be there (written while it held the run). The
    next attempt resumes from the newest checkpoint the store recorded, with that digest."""
    from kanfarm.training import CheckpointManager, EpochRecord

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("KANFARM_CHECKPOINT_SECONDS", "0")
    store = sqlite_store
    (run_id,) = _grid(store, [RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=4)])
    stop = threading.Event()  # a warm shutdown after epoch 2: checkpointed and released
    assert execute_run(store, run_id, "w1", shutdown=stop,
                       on_epoch=lambda rid, rec: rec.epoch == 2 and stop.set()).status == "released"
    assert [c.epoch for c in store.checkpoints(run_id)] == [1, 2]
    config_hash = store.run(run_id).config_hash
    stray = CheckpointManager(tmp_path / "ckpt" / config_hash, config_hash, keep=10)
    epoch, state = stray.load_latest()
    state["model"] = {k: v * 0 for k, v in state["model"].items()}  # another trajectory than the store's
    stray.save(3, state)
    stray.save(2, state)  # and epoch 2 rewritten, with another digest than the store's
    with store.engine.begin() as conn:  # the rows of epoch 3 were written while it held the run
        conn.execute(sa.text("UPDATE runs SET status = 'running', worker = 'lost', "
                             "lease_expires_at = '2000-01-01 00:00:00' WHERE id = :i"), {"i": run_id})
    store.write_epoch(run_id, EpochRecord(3, 1.0, 0.5, 1.0, 0.5, 0.1, {}), worker="lost")
    trained = []
    assert execute_run(store, run_id, "w2", on_epoch=lambda rid, rec: trained.append(rec.epoch)).status == "completed"
    assert trained == [2, 3, 4]  # from epoch 1's checkpoint: 3 was never recorded, 2 is not what was
    assert all(r["test_acc"] != 0.5 for r in store.epoch_metrics(run_id))


def test_a_checkpoint_whose_own_epoch_row_is_missing_is_not_resumed(sqlite_store, tmp_path, monkeypatch):
    """Resuming from epoch 2's checkpoint without epoch 2's row would leave that row missing for
    good (a resume writes only the epochs after its checkpoint): the run resumes from epoch 1."""
    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("KANFARM_CHECKPOINT_SECONDS", "0")
    store = sqlite_store
    (run_id,) = _grid(store, [RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=3)])
    stop = threading.Event()
    assert execute_run(store, run_id, "w1", shutdown=stop,
                       on_epoch=lambda rid, rec: rec.epoch == 2 and stop.set()).status == "released"
    assert [c.epoch for c in store.checkpoints(run_id)] == [1, 2]
    with store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM epoch_metrics WHERE run_id = :i AND epoch = 2"), {"i": run_id})
    trained = []
    assert execute_run(store, run_id, "w2", on_epoch=lambda rid, rec: trained.append(rec.epoch)).status == "completed"
    assert trained == [2, 3]
    assert [r["epoch"] for r in store.epoch_metrics(run_id)] == [0, 1, 2, 3]


def test_a_run_that_writes_no_epoch_for_too_long_gives_up_its_lease(sqlite_store, tmp_path, monkeypatch, caplog):
    """A worker hung in a call (here: blocked in ``on_epoch`` after epoch 1) keeps beating, so
    its lease never lapsed. Past KANFARM_STALL_SECONDS without an epoch, and past STALL_FACTOR
    times its longest gap between epochs, its heartbeat ends the lease; another worker takes the
    run over, and the first one, when it wakes up, writes nothing more."""
    import time

    from kanfarm import runner

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("KANFARM_STALL_SECONDS", "0.3")
    monkeypatch.setattr(runner, "STALL_FACTOR", 50.0)  # 15 s to the first rows, whatever the load
    store = sqlite_store
    (run_id,) = _grid(store, [RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=3)])
    taken = []

    def hang_after_epoch_1(rid, record):
        if record.epoch != 1:
            return
        monkeypatch.setattr(runner, "STALL_FACTOR", 1.0)  # from here on the limit is the longest gap
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and store.claim(rid, "w2", 600) is None:
            time.sleep(0.05)
        taken.append(store.run(rid).worker)

    assert execute_run(store, run_id, "w1", lease_s=3, on_epoch=hang_after_epoch_1).status == "stopped"
    assert taken == ["w2"] and "taken for hung" in caplog.text
    assert [r["epoch"] for r in store.epoch_metrics(run_id)] == [0, 1]  # w1 wrote nothing after waking
    assert execute_run(store, run_id, "w2", claimed=True).status == "completed"
    assert [r["epoch"] for r in store.epoch_metrics(run_id)] == [0, 1, 2, 3]
    monkeypatch.setenv("KANFARM_STALL_SECONDS", "-1")
    with pytest.raises(ConfigError, match="KANFARM_STALL_SECONDS: '-1' must be a non-negative number"):
        execute_run(store, run_id, "w3")


def test_a_run_hung_before_its_first_epoch_gives_up_its_lease(sqlite_store, tmp_path, monkeypatch, caplog):
    """A worker hung loading its dataset (a dead network file system) wrote no row: past
    STALL_FACTOR times KANFARM_STALL_SECONDS from the claim, its lease ends all the same, and it
    writes nothing if it wakes up after another worker took the run."""
    import time

    from kanfarm import runner

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("KANFARM_STALL_SECONDS", "0.1")  # 1 s before the first row
    store = sqlite_store
    (run_id,) = _grid(store, [RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=2)])
    load = runner._dataset
    taken = []

    def hung_loading(config):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and store.claim(run_id, "w2", 600) is None:
            time.sleep(0.05)
        taken.append(store.run(run_id).worker)
        return load(config)

    monkeypatch.setattr(runner, "_dataset", hung_loading)
    assert execute_run(store, run_id, "w1", lease_s=0.6, shutdown=None).status == "stopped"
    assert taken == ["w2"] and "taken for hung" in caplog.text
    assert store.epoch_metrics(run_id) == []
    monkeypatch.setattr(runner, "_dataset", load)
    assert execute_run(store, run_id, "w2", claimed=True).status == "completed"


def _resumed_and_fresh(store, monkeypatch, tmp_path) -> tuple[int, int]:
    """Two runs that pack together but train as two parts: one released after epoch 1 (it
    resumes there), one fresh (trained first, from epoch 0)."""
    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    base = dict(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=3)
    resumed, fresh = _grid(store, [RunConfig(lr=lr, **base) for lr in (0.01, 0.02)])
    stop = threading.Event()
    assert execute_run(store, resumed, "w0", shutdown=stop,
                       on_epoch=lambda rid, rec: rec.epoch == 1 and stop.set()).status == "released"
    return resumed, fresh


def test_a_hung_pack_gives_up_every_member_and_a_slow_first_epoch_is_not_a_hang(sqlite_store, tmp_path,
                                                                                 monkeypatch, caplog):
    """The members share one progress clock: a hang of the part of the pack that trains gives up
    the members waiting for their part too (they wrote no row yet: alone, they would be held
    for good). Before a gap between two epochs is known the limit is STALL_FACTOR times
    KANFARM_STALL_SECONDS: a first training epoch longer than the limit alone is not a hang."""
    import time

    from kanfarm import runner
    from kanfarm.runner import execute_pack

    store = sqlite_store
    resumed, fresh = _resumed_and_fresh(store, monkeypatch, tmp_path)
    monkeypatch.setenv("KANFARM_STALL_SECONDS", "0.2")
    monkeypatch.setattr(runner, "STALL_FACTOR", 20.0)  # 4 s for the first gap, whatever the load
    hung = []

    def slow_then_hung(rid, record):
        if record.epoch == 0:
            time.sleep(0.5)  # a slow first epoch: over the limit alone
        elif record.epoch == 2:
            monkeypatch.setattr(runner, "STALL_FACTOR", 1.0)  # from here on the limit is the longest gap
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (caplog.text.count("taken for hung") < 2 or len(hung) < 2):
                hung[:] = store.stale_runs()  # ended by the watchdog just after it said so
                time.sleep(0.05)

    outcomes = execute_pack(store, [resumed, fresh], "w1", lease_s=0.6, on_epoch=slow_then_hung)  # asked every 0.2 s
    assert sorted(hung) == sorted([resumed, fresh]) and caplog.text.count("taken for hung") == 2
    assert {o.run_id: o.status for o in outcomes} == {fresh: "stopped", resumed: "stopped"}
    assert [r["epoch"] for r in store.epoch_metrics(fresh)] == [0, 1, 2]
    assert [r["epoch"] for r in store.epoch_metrics(resumed)] == [0, 1]  # its part never started


def test_the_next_part_of_a_pack_is_not_judged_by_the_pace_of_the_last(sqlite_store, tmp_path, monkeypatch, caplog):
    """Once every member that wrote a row has ended, the next part (resumed at another epoch)
    starts afresh: its warm-up and first epoch are held to the limit before a first row (10x
    KANFARM_STALL_SECONDS), not to 10x the last part's epochs."""
    import time

    from kanfarm.packing import trainer
    from kanfarm.runner import execute_pack

    store = sqlite_store
    resumed, fresh = _resumed_and_fresh(store, monkeypatch, tmp_path)
    monkeypatch.setenv("KANFARM_STALL_SECONDS", "1.0")  # 10 s to a part's first row, whatever the load
    warm_ups = []
    original = trainer.warm_up

    def slow_second_warm_up(*args, **kwargs):
        warm_ups.append(1)
        if len(warm_ups) == 2:
            time.sleep(3.5)  # a compile: far over 10x the first part's epochs, well under 10x the limit
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "warm_up", slow_second_warm_up)
    outcomes = execute_pack(store, [resumed, fresh], "w1", lease_s=0.6)
    assert len(warm_ups) == 2 and "taken for hung" not in caplog.text
    assert {o.run_id: o.status for o in outcomes} == {fresh: "completed", resumed: "completed"}
    assert [r["epoch"] for r in store.epoch_metrics(resumed)] == [0, 1, 2, 3]


def test_a_pack_whose_member_cannot_be_wired_hands_back_every_member(sqlite_store, tmp_path, monkeypatch):
    """A database error while wiring the second member left the first one's heartbeat beating:
    its run stayed running, held by this process, for good; the second and third, claimed but
    never wired, waited for their leases."""
    from kanfarm import runner
    from kanfarm.runner import execute_pack

    store, ids = sqlite_store, _three_one_epoch_runs(sqlite_store, monkeypatch, tmp_path)
    wired = []
    original = runner._ClaimedRun._say_where_checkpoints_went

    def second_fails(self):
        wired.append(self.run.id)
        if len(wired) == 2:
            raise sa.exc.OperationalError("SELECT", {}, Exception("server closed the connection"))
        return original(self)

    monkeypatch.setattr(runner._ClaimedRun, "_say_where_checkpoints_went", second_fails)
    with pytest.raises(sa.exc.OperationalError):
        execute_pack(store, ids, "w1")
    for run_id in ids:  # handed back, their attempts given back
        assert (store.run(run_id).status, store.run(run_id).attempts) == ("queued", 0)
    beats = [t for t in threading.enumerate() if t.name == f"heartbeat-{wired[0]}"]
    for beat in beats:
        beat.join(timeout=5)
    assert not any(beat.is_alive() for beat in beats)


def test_time_the_process_stood_still_is_not_waiting(monkeypatch):
    """Ctrl-Z, SIGSTOP or a suspended VM stop the heartbeats too: they wake far too late, and the
    pause must not count as a stalled epoch (no other worker took the run meanwhile). Every
    heartbeat of a pack reports it; it counts once. A hang before the first row (a dead file
    system under the dataset) is judged too, with the generous limit."""
    from kanfarm import runner

    clock = [0.0]
    monkeypatch.setattr(runner.time, "monotonic", lambda: clock[0])
    progress = runner._Progress(10.0)

    def stalled_after(seconds: float) -> float | None:
        clock[0] += seconds
        return progress.stalled()

    assert stalled_after(99) is None  # no row yet (a dataset loading): 10x KANFARM_STALL_SECONDS
    progress.stood_still(clock[0] - 50, clock[0])  # a standstill before the first row is not waiting
    assert stalled_after(50) is None and stalled_after(2) == pytest.approx(101)
    progress.written(7)
    progress.written(8)
    assert stalled_after(60) is None  # no gap known yet: 10x KANFARM_STALL_SECONDS
    assert stalled_after(3600) == pytest.approx(3660)
    for _ in range(2):  # two heartbeats woke an hour late
        progress.stood_still(clock[0] - 3600, clock[0])
    assert progress.stalled() is None
    assert stalled_after(40) is None
    progress.written(7)  # a gap of 100 s of training, not of the hour
    assert stalled_after(999) is None  # up to 10x the longest gap
    assert stalled_after(2) == pytest.approx(1001)
    progress.ended(7)
    assert progress.stalled() == pytest.approx(1001)  # 8 goes on: still judged
    progress.ended(8)  # every run that wrote a row ended: the next part of the pack starts afresh
    assert stalled_after(99) is None and stalled_after(2) == pytest.approx(101)  # its first row: 10x
    progress.written(9)
    assert stalled_after(99) is None and stalled_after(2) == pytest.approx(101)  # 10x the limit, no gap known
    progress.written(9)  # gaps of 101 s, then 5 s: the limit is 10x the longest, not the last
    assert stalled_after(5) is None
    progress.written(9)
    assert stalled_after(1000) is None and stalled_after(20) == pytest.approx(1020)


def test_warm_shutdowns_do_not_use_up_attempts(sqlite_store, tmp_path, monkeypatch):
    import threading

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    store = sqlite_store
    (run_id,) = _grid(store, [RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=4)])
    for stop_after in (1, 2, 3):  # three worker restarts, each after one more epoch
        shutdown = threading.Event()

        def on_epoch(rid, record, shutdown=shutdown, stop_after=stop_after):
            if record.epoch >= stop_after:
                shutdown.set()

        assert execute_run(store, run_id, "w", shutdown=shutdown, max_attempts=3, on_epoch=on_epoch).status == "released"
        assert (store.run(run_id).status, store.run(run_id).attempts) == ("queued", 0)
    assert execute_run(store, run_id, "w", max_attempts=3).status == "completed"
    assert [r["epoch"] for r in store.epoch_metrics(run_id)] == [0, 1, 2, 3, 4]


def test_checkpoint_interval_from_the_environment(sqlite_store, tmp_path, monkeypatch):
    """Packs and single runs alike checkpoint at most once every KANFARM_CHECKPOINT_SECONDS
    (besides epoch 0 and the last); 0 means every epoch."""
    import pytest

    from kanfarm.config import ConfigError
    from kanfarm.runner import execute_pack

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    store = sqlite_store
    base = dict(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=3, optimizer="sgd")
    every_epoch = _grid(store, [RunConfig(lr=lr, **base) for lr in (0.01, 0.02)])
    monkeypatch.setenv("KANFARM_CHECKPOINT_SECONDS", "0")
    assert {o.status for o in execute_pack(store, every_epoch, "w")} == {"completed"}
    assert [[c.epoch for c in store.checkpoints(i)] for i in every_epoch] == [[2, 3]] * 2  # the last two kept
    store.submit_grid("h", {}, [(RunConfig(lr=lr, **base), 1000, None) for lr in (0.03, 0.04)])
    by_time = store.run_ids("h")
    monkeypatch.setenv("KANFARM_CHECKPOINT_SECONDS", "3600")
    assert {o.status for o in execute_pack(store, by_time, "w")} == {"completed"}
    assert [[c.epoch for c in store.checkpoints(i)] for i in by_time] == [[0, 3]] * 2  # the start and the end
    store.submit_grid("solo", {}, [(RunConfig(lr=0.07, **base), 1000, None)])
    (solo,) = store.run_ids("solo")
    assert execute_run(store, solo, "w").status == "completed"
    assert [c.epoch for c in store.checkpoints(solo)] == [0, 3]
    monkeypatch.setenv("KANFARM_CHECKPOINT_SECONDS", "0")
    store.submit_grid("solo2", {}, [(RunConfig(lr=0.08, **base), 1000, None)])
    (solo,) = store.run_ids("solo2")
    assert execute_run(store, solo, "w").status == "completed"
    assert [c.epoch for c in store.checkpoints(solo)] == [2, 3]
    from kanfarm.run_environment import checkpoint_interval

    monkeypatch.setenv("KANFARM_PACK_CHECKPOINT_SECONDS", "")  # what compose passes when .env does not set it
    assert checkpoint_interval() == 0
    monkeypatch.setenv("KANFARM_PACK_CHECKPOINT_SECONDS", "10")
    with pytest.raises(ConfigError, match="renamed KANFARM_CHECKPOINT_SECONDS"):
        checkpoint_interval()
    monkeypatch.delenv("KANFARM_PACK_CHECKPOINT_SECONDS")
    for bad in ("abc", "-1", "nan", "inf"):
        monkeypatch.setenv("KANFARM_CHECKPOINT_SECONDS", bad)
        store.submit_grid("bad", {}, [(RunConfig(lr=0.05, **base), 1000, None), (RunConfig(lr=0.06, **base), 1000, None)])
        with pytest.raises(ConfigError, match="KANFARM_CHECKPOINT_SECONDS"):
            execute_pack(store, store.run_ids("bad"), "w")
        with pytest.raises(ConfigError, match="KANFARM_CHECKPOINT_SECONDS"):
            execute_run(store, store.run_ids("bad")[0], "w")
        assert {store.run(i).status for i in store.run_ids("bad")} == {"pending"}  # nothing claimed


def test_runs_held_by_dead_processes_of_this_host_are_released_at_once(sqlite_store):
    import os
    import socket
    import subprocess
    import sys

    from kanfarm.local import local_suffix, release_dead_holders

    store = sqlite_store
    ids = _grid(store, [RunConfig(dataset="digits", model="mlp", depth="shallow", lr=lr) for lr in (0.1, 0.2, 0.3, 0.4)])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = socket.gethostname()
    me = local_suffix()
    holders = [f"{host}:{dead.pid}{me}", f"{host}:{alive.pid}{me}", f"elsewhere:{dead.pid}{me}",
               f"{host}:{os.getpid()}{me}",
               f"{host}:{dead.pid}:celery",            # not a local worker: it waits for its lease
               f"{host}:{dead.pid}:local-0123456789"]  # another boot or pid namespace: its pids are not ours
    ids += _grid(store, [RunConfig(dataset="digits", model="mlp", depth="shallow", lr=lr) for lr in (0.5, 0.6)])[4:]
    try:
        for run_id, worker in zip(ids, holders):
            assert store.claim(run_id, worker, 600) is not None
        assert release_dead_holders(store, "g") == [ids[0]]
        assert store.stale_runs("g") == [ids[0]]
        assert store.claim(ids[0], "new", 600) is not None  # claimable now, not in 10 minutes
        assert [store.run(i).status for i in ids] == ["running"] * 6
    finally:
        alive.kill()
        alive.wait()


def test_a_run_resumed_from_another_folder_says_where_its_checkpoints_are(sqlite_store, tmp_path, monkeypatch,
                                                                           caplog):
    """The default folder is relative to where `run grid` starts: run again from elsewhere, the
    run found none and retrained from epoch 0 without a word."""
    import logging

    config = RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=3)
    (run_id,) = _grid(sqlite_store, [config])
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    monkeypatch.delenv("KANFARM_CHECKPOINT_DIR", raising=False)
    monkeypatch.chdir(first)
    stop = threading.Event()  # a warm shutdown after epoch 1: checkpointed and released
    assert execute_run(sqlite_store, run_id, "w1", shutdown=stop,
                       on_epoch=lambda _, record: record.epoch == 1 and stop.set()).status == "released"
    recorded = [c.path for c in sqlite_store.checkpoints(run_id)]
    assert recorded and all(Path(p).is_absolute() and Path(p).is_relative_to(first) for p in recorded)
    monkeypatch.chdir(second)
    with caplog.at_level(logging.WARNING, logger="kanfarm.runner"):
        assert execute_run(sqlite_store, run_id, "w2").status == "completed"
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"its checkpoints were written to {first / 'kanfarm-checkpoints' / config.config_hash()}" in said
    assert "starts again from epoch 0" in said


def test_an_empty_checkpoint_folder_variable_means_the_default(monkeypatch):
    """As every other variable: empty is unset, not the current folder."""
    from pathlib import Path

    from kanfarm.run_environment import checkpoint_root

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", "")
    assert checkpoint_root() == Path("kanfarm-checkpoints").absolute()
    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", "/somewhere/else")
    assert checkpoint_root() == Path("/somewhere/else")


def test_runs_and_packs_set_up_host_memory_before_claiming(sqlite_store, tmp_path, monkeypatch):
    """``KANFARM_KEEP_FREED_MEMORY`` applies to the processes that execute runs, single or packed
    (the allocator settings themselves: tests/test_host_memory.py)."""
    import kanfarm.runner as runner

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    calls = []
    monkeypatch.setattr(runner, "keep_freed_memory", lambda: calls.append([sqlite_store.run(i).status for i in ids]))
    base = dict(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=1, optimizer="sgd")
    ids = _grid(sqlite_store, [RunConfig(lr=lr, **base) for lr in (0.01, 0.02, 0.03)])
    assert execute_run(sqlite_store, ids[0], "w1").status == "completed"
    assert runner.execute_pack(sqlite_store, ids[1:], "w1")[0].status == "completed"
    assert calls == [["pending"] * 3, ["completed", "pending", "pending"]]  # each time before its claim


@pytest.mark.parametrize("packed", [False, True])
def test_a_full_checkpoint_disk_hands_the_runs_back_instead_of_failing_them(sqlite_store, tmp_path, monkeypatch,
                                                                             packed):
    """A full (or read-only) checkpoint folder is the machine's fault, not the runs': they were
    marked failed, each with a traceback, and the same command did not resume them. Now they
    are handed back, the worker stops on one ConfigError naming the folder, and once there is
    room the runs finish."""
    import errno

    from kanfarm.runner import execute_pack
    from kanfarm.training.checkpoint import CheckpointManager

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("KANFARM_CHECKPOINT_SECONDS", "0")
    store = sqlite_store
    base = dict(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=3)
    ids = _grid(store, [RunConfig(lr=lr, **base) for lr in (0.01, 0.02)][:2 if packed else 1])
    save = CheckpointManager.save

    def full_at_epoch_2(self, epoch, state):
        if epoch == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / "epoch-2.pt.tmp"))
        return save(self, epoch, state)

    monkeypatch.setattr(CheckpointManager, "save", full_at_epoch_2)
    with pytest.raises(ConfigError, match="KANFARM_CHECKPOINT_DIR: .*No space left on device.*handed back"):
        execute_pack(store, ids, "w1") if packed else execute_run(store, ids[0], "w1")
    for run_id in ids:  # the attempt counts: a run that fills the disk itself ends after max_attempts
        assert (store.run(run_id).status, store.run(run_id).attempts) == ("queued", 1)
        assert "No space left on device" in store.run(run_id).error  # what it would end failed with
    monkeypatch.setattr(CheckpointManager, "save", save)  # room again
    outcomes = execute_pack(store, ids, "w1") if packed else [execute_run(store, ids[0], "w1")]
    assert {o.status for o in outcomes} == {"completed"}
    assert all([r["epoch"] for r in store.epoch_metrics(i)] == [0, 1, 2, 3] for i in ids)


def test_a_permission_error_in_one_runs_folder_fails_that_run_not_the_worker(sqlite_store, tmp_path, monkeypatch):
    """Unlike a full disk, a folder this worker may not write can be one run's (chmod on it):
    stopping the worker and handing the run back would stop every worker that takes it in turn."""
    import errno

    from kanfarm.training.checkpoint import CheckpointManager

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    store = sqlite_store
    (run_id,) = _grid(store, [RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=1)])

    def forbidden(self, epoch, state):
        raise PermissionError(errno.EACCES, "Permission denied", str(self.directory / "epoch-000000.pt"))

    monkeypatch.setattr(CheckpointManager, "save", forbidden)
    assert execute_run(store, run_id, "w1").status == "failed"
    assert "Permission denied" in store.run(run_id).error


def test_a_full_disk_while_wiring_a_run_hands_it_back(sqlite_store, tmp_path, monkeypatch):
    """Its checkpoint folder could not be made (a full disk): the claimed run waited for its
    lease to expire."""
    import errno

    from kanfarm import runner

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    store = sqlite_store
    (run_id,) = _grid(store, [RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=1)])

    def no_room(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt" / "x"))

    monkeypatch.setattr(runner._ClaimedRun, "_say_where_checkpoints_went", no_room)
    with pytest.raises(ConfigError, match="KANFARM_CHECKPOINT_DIR"):
        execute_run(store, run_id, "w1")
    assert (store.run(run_id).status, store.run(run_id).attempts) == ("queued", 1)


@pytest.mark.parametrize("packed", [False, True])
def test_a_run_whose_wiring_fails_on_its_own_error_fails_alone(sqlite_store, tmp_path, monkeypatch, packed):
    """Its checkpoint folder unreadable, say: handed back with its attempt refunded, it was taken
    again at once, for ever (and under Celery left queued with no message). It fails, as an
    error in training would; the other members of its pack train on."""
    from kanfarm import runner
    from kanfarm.runner import execute_pack

    store, ids = sqlite_store, _three_one_epoch_runs(sqlite_store, monkeypatch, tmp_path)
    bad = ids[1] if packed else ids[0]
    original = runner._ClaimedRun._say_where_checkpoints_went

    def unreadable(self):
        if self.run.id == bad:
            raise PermissionError(13, "Permission denied", str(self.checkpoints.directory))
        return original(self)

    monkeypatch.setattr(runner._ClaimedRun, "_say_where_checkpoints_went", unreadable)
    outcomes = execute_pack(store, ids, "w1", max_attempts=3) if packed else [execute_run(store, bad, "w1")]
    assert {o.run_id: o.status for o in outcomes} == ({i: "failed" if i == bad else "completed" for i in ids}
                                                      if packed else {bad: "failed"})
    assert (store.run(bad).status, store.run(bad).attempts) == ("failed", 1)
    assert "Permission denied" in store.run(bad).error


@pytest.mark.parametrize("packed", [False, True])
def test_a_wiring_error_of_the_worker_hands_every_run_back_and_stops(sqlite_store, tmp_path, monkeypatch, packed):
    """No thread to be had for a heartbeat (or a bug): failing the run alone would fail every run
    the work loop claims next, the whole grid. Every claimed run goes back, attempts refunded,
    no heartbeat is left beating, and the error ends the work."""
    from kanfarm import runner
    from kanfarm.runner import execute_pack

    store, ids = sqlite_store, _three_one_epoch_runs(sqlite_store, monkeypatch, tmp_path)
    started = []
    original = runner._Heartbeat.start

    def no_thread(self):
        if len(started) == (1 if packed else 0):
            raise RuntimeError("can't start new thread")
        started.append(self)
        original(self)

    monkeypatch.setattr(runner._Heartbeat, "start", no_thread)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        execute_pack(store, ids, "w1", lease_s=0.6) if packed else execute_run(store, ids[0], "w1")
    for run_id in ids if packed else ids[:1]:
        assert (store.run(run_id).status, store.run(run_id).attempts) == ("queued", 0)
    for beat in started:
        beat.join(timeout=5)
        assert not beat.is_alive()


def test_a_store_gone_while_a_member_fails_alone_leaves_no_run_held(sqlite_store, tmp_path, monkeypatch):
    """Failing the member whose folder is unreadable met a database outage: the members wired
    before it went on beating (held for the life of the worker), the rest waited for leases."""
    from kanfarm import runner
    from kanfarm.runner import execute_pack

    store, ids = sqlite_store, _three_one_epoch_runs(sqlite_store, monkeypatch, tmp_path)
    original = runner._ClaimedRun._say_where_checkpoints_went

    def unreadable(self):
        if self.run.id == ids[1]:
            raise PermissionError(13, "Permission denied", str(self.checkpoints.directory))
        return original(self)

    def outage(*args, **kwargs):
        raise sa.exc.OperationalError("UPDATE", {}, Exception("server closed the connection"))

    monkeypatch.setattr(runner._ClaimedRun, "_say_where_checkpoints_went", unreadable)
    monkeypatch.setattr(store, "finish", outage)
    with pytest.raises(sa.exc.OperationalError):
        execute_pack(store, ids, "w1", lease_s=0.6)
    for run_id in ids:
        assert (store.run(run_id).status, store.run(run_id).attempts) == ("queued", 0)
    beats = [t for t in threading.enumerate() if t.name.startswith("heartbeat-")]
    for beat in beats:
        beat.join(timeout=5)
    assert not any(beat.is_alive() for beat in beats)


def test_a_store_error_that_looks_like_a_runs_own_while_failing_a_member_still_ends_the_pack(
        sqlite_store, tmp_path, monkeypatch):
    """Failing a member whose folder is unreadable, the store raised a PermissionError (its own
    folder unreadable): taken for the member's own error again, it was swallowed, and the pack
    trained runs it had already handed back, returning an outcome for one of three."""
    from kanfarm import runner
    from kanfarm.runner import execute_pack

    store, ids = sqlite_store, _three_one_epoch_runs(sqlite_store, monkeypatch, tmp_path)
    original, finish, calls = runner._ClaimedRun._say_where_checkpoints_went, store.finish, []

    def unreadable(self):
        if self.run.id == ids[1]:
            raise PermissionError(13, "Permission denied", str(self.checkpoints.directory))
        return original(self)

    def database_folder_unreadable_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied", "/data/k.db")
        return finish(*args, **kwargs)

    monkeypatch.setattr(runner._ClaimedRun, "_say_where_checkpoints_went", unreadable)
    monkeypatch.setattr(store, "finish", database_folder_unreadable_once)
    with pytest.raises(PermissionError, match="/data/k.db"):
        execute_pack(store, ids, "w1", lease_s=0.6)
    assert len(calls) == 1
    for run_id in ids:
        assert (store.run(run_id).status, store.run(run_id).attempts) == ("queued", 0)


def test_a_pack_of_repeated_ids_has_one_outcome_per_run(sqlite_store, tmp_path, monkeypatch):
    from kanfarm.runner import execute_pack

    store, ids = sqlite_store, _three_one_epoch_runs(sqlite_store, monkeypatch, tmp_path)
    outcomes = execute_pack(store, [ids[0], ids[1], ids[1], 999, 999], "w1")
    assert sorted((o.run_id, o.status) for o in outcomes) == [(ids[0], "completed"), (ids[1], "completed"),
                                                               (999, "not-claimed")]


def test_a_cycle_of_causes_is_no_disk_fault():
    from kanfarm.run_environment import environment_fault

    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert environment_fault(a) is None


def test_a_full_disk_is_found_behind_a_download_error_and_named_by_the_innermost_folder(tmp_path, monkeypatch):
    """A download that fills the disk is raised as DatasetUnavailable (its cause the OSError);
    with the checkpoint folder inside the data folder, a full checkpoint disk is the checkpoint
    folder's."""
    import errno

    from kanfarm.data import DatasetUnavailable
    from kanfarm.run_environment import environment_fault

    monkeypatch.setenv("KANFARM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "mnist" / "train.gz"))
    try:
        raise DatasetUnavailable("dataset 'mnist' is unavailable") from full
    except DatasetUnavailable as exc:
        assert environment_fault(exc).field == "KANFARM_DATA_DIR"
    assert environment_fault(OSError(errno.ENOSPC, "full", str(tmp_path / "ckpt" / "h" / "e.pt"))).field == \
        "KANFARM_CHECKPOINT_DIR"
    for code in (errno.EROFS, errno.EDQUOT):  # a read-only mount, a quota: the machine's too
        assert environment_fault(OSError(code, "read-only", str(tmp_path / "ckpt" / "e.pt"))).field == \
            "KANFARM_CHECKPOINT_DIR"
    assert environment_fault(OSError(errno.EACCES, "Permission denied", str(tmp_path / "x"))) is None
    assert environment_fault(RuntimeError("not a disk")) is None


def test_a_stall_limit_of_zero_means_never(monkeypatch):
    from kanfarm import runner
    from kanfarm.run_environment import stall_seconds

    monkeypatch.setenv("KANFARM_STALL_SECONDS", "0")
    assert stall_seconds() == 0 and runner._Progress(stall_seconds()).stalled() is None


def test_the_checkpoint_check_writes_a_real_payload(tmp_path, monkeypatch):
    """On a full disk an empty file can still be made: the check before a claim passed, and
    every run taken then failed at its first checkpoint."""
    import errno
    import tempfile

    from kanfarm import run_environment

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    real = tempfile.NamedTemporaryFile

    class FullDisk:
        def __init__(self, *args, **kwargs):
            self.file = real(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            if data:
                raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", FullDisk)
    with pytest.raises(ConfigError, match="KANFARM_CHECKPOINT_DIR: .*No space left on device"):
        run_environment.check_checkpoints_writable()
