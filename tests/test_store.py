"""The store on SQLite and PostgreSQL: submission, the claim/lease state machine, epoch rows, the
run_summary view (against an independent Python calculation) and concurrent workers."""
from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from kanfarm.config import ConfigError, RunConfig
from kanfarm.reports import efficiency_table, gap_table, overfit_onset
from kanfarm.store import LeaseLost, RunNotFound, Store
from kanfarm.training.records import EpochRecord


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def store(request) -> Store:
    return request.getfixturevalue(f"{request.param}_store")


def cells(n: int, dataset: str = "mnist", n_params: int = 5000, intrinsic_dim: int | None = 750,
          **fields):
    return [(RunConfig(dataset=dataset, seed=seed, **fields), n_params, intrinsic_dim)
            for seed in range(n)]


def record(epoch: int, train_acc: float | None, test_acc: float | None, **fields) -> EpochRecord:
    loss = None if test_acc is None else 1.0 - test_acc
    values = dict(epoch=epoch, train_loss=loss, train_acc=train_acc, test_loss=loss,
                  test_acc=test_acc, seconds=0.25)
    values.update(fields)
    return EpochRecord(**values)


# -- submission ---------------------------------------------------------------------------------

def test_submit_is_idempotent_and_extends(store):
    first = store.submit_grid("g", {"seeds": 3}, cells(3))
    assert (first.added, first.existing) == (3, 0)
    ids = store.run_ids(grid="g")
    again = store.submit_grid("g", {"seeds": 3}, cells(3))
    assert (again.grid_id, again.added, again.existing) == (first.grid_id, 0, 3)
    assert store.run_ids(grid="g") == ids

    extended = store.submit_grid("g", {"seeds": 5}, cells(5))
    assert (extended.added, extended.existing) == (2, 3)
    assert store.grid("g").spec == {"seeds": 5}
    assert store.run_ids(grid="g")[:3] == ids and len(store.run_ids(grid="g")) == 5

    # a second grid sharing two cells links them; the run keeps the grid that first added it
    other = store.submit_grid("h", {}, cells(2))
    assert (other.added, other.existing) == (0, 2)
    assert store.run_ids(grid="h") == ids[:2]
    assert store.run(ids[0]).grid_id == first.grid_id
    assert [g.name for g in store.grids()] == ["g", "h"]
    # resubmissions use up no grid id (a conflicting insert would on PostgreSQL): same ids on both
    assert other.grid_id == first.grid_id + 1
    assert store.submit_grid("i", {}, cells(1)).grid_id == other.grid_id + 1
    assert store.grid("nope") is None and store.run_ids(grid="nope") == []


def test_equivalent_configs_are_one_run_and_round_trip(store):
    explicit = RunConfig(dataset="mnist", depth="medium", activation="gelu", lr=1e-3)
    implicit = RunConfig(dataset="mnist", depth="medium", activation=None, lr=0.001)
    result = store.submit_grid("g", {}, [(explicit, 100, None), (implicit, 100, None)])
    assert result.added == 1
    run = store.run(store.run_ids()[0])
    assert run.config == explicit.normalised()
    assert run.config_hash == explicit.config_hash()
    assert run.hidden_widths == "64,32" and run.activation == "gelu"
    assert (run.status, run.attempts, run.intrinsic_dim) == ("pending", 0, None)
    assert run.created_at.tzinfo is not None
    assert abs(run.created_at - datetime.now(timezone.utc)) < timedelta(minutes=1)
    with pytest.raises(RunNotFound):
        store.run(10_000)


def test_a_later_grid_restates_intrinsic_dim_and_an_unstated_one_keeps_it(store):
    store.submit_grid("a", {}, cells(2, intrinsic_dim=750))
    store.submit_grid("b", {}, cells(2, intrinsic_dim=750))       # the known default, not stated: kept
    assert {store.run(i).intrinsic_dim for i in store.run_ids()} == {750}
    store.submit_grid("c", {}, cells(1, intrinsic_dim=40), {"mnist": 40})  # restated for the run it shares
    assert [store.run(i).intrinsic_dim for i in store.run_ids()] == [40, 750]
    store.submit_grid("b", {}, cells(2, intrinsic_dim=750))       # b again, still stating nothing
    assert [store.run(i).intrinsic_dim for i in store.run_ids()] == [40, 750]
    (row,) = store.query("SELECT intrinsic_dim FROM run_summary WHERE run_id = :i", {"i": store.run_ids()[0]})
    assert row["intrinsic_dim"] == 40


def test_a_bad_cell_writes_nothing(store):
    bad = cells(2) + [(RunConfig(dataset="mnist", optimizer="lbfgs"), 10, None)]
    with pytest.raises(ConfigError):
        store.submit_grid("g", {}, bad)
    assert store.grids() == [] and store.run_ids() == []


# -- claims and leases --------------------------------------------------------------------------

def test_only_one_of_two_claims_succeeds(store):
    store.submit_grid("g", {}, cells(1))
    run_id = store.run_ids()[0]
    won = store.claim(run_id, "w1", 60)
    assert won is not None and (won.status, won.attempts, won.worker) == ("running", 1, "w1")
    assert won.lease_expires_at > datetime.now(timezone.utc) + timedelta(seconds=50)
    assert store.claim(run_id, "w2", 60) is None
    assert store.run(run_id).worker == "w1"


def test_racing_threads_claim_each_run_once(store):
    store.submit_grid("g", {}, cells(6))
    for run_id in store.run_ids():
        barrier = threading.Barrier(2)

        def attempt(worker):
            barrier.wait()
            return store.claim(run_id, worker, 60)

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(attempt, ["a", "b"]))
        assert sum(r is not None for r in results) == 1


def test_expired_lease_is_reclaimed_and_the_old_worker_is_told(store):
    store.submit_grid("g", {}, cells(2))
    run_id = store.run_ids()[0]
    started = store.claim(run_id, "w1", -1).started_at  # lease already expired: w1 "died"
    assert store.stale_runs() == [run_id] and store.stale_runs(grid="other") == []
    taken = store.claim(run_id, "w2", 60)
    assert (taken.worker, taken.attempts, taken.started_at) == ("w2", 2, started)
    assert store.stale_runs() == []
    assert store.heartbeat(run_id, "w1", 60) is False
    assert store.finish(run_id, "w1", "completed") is False
    with pytest.raises(LeaseLost):
        store.write_epoch(run_id, record(0, 0.1, 0.1), worker="w1")
    assert store.heartbeat(run_id, "w2", 60) is True
    assert store.finish(run_id, "w2", "completed") is True
    finished = store.run(run_id)
    assert finished.status == "completed" and finished.lease_expires_at is None
    assert finished.finished_at >= finished.started_at
    assert store.claim(run_id, "w3", 60) is None  # finished runs are never claimed again


def test_finish_by_a_worker_that_lost_the_run_deletes_no_rows(store):
    """Only the holder's finish may trim rows past last_epoch: they are now the new holder's rows."""
    store.submit_grid("g", {}, cells(1))
    (run_id,) = store.run_ids()
    store.claim(run_id, "w1", -1)  # w1's lease has lapsed
    for epoch in range(6):
        store.write_epoch(run_id, record(epoch, 0.5, 0.5), worker="w1")
    store.claim(run_id, "w2", 60)
    for epoch in range(6):
        store.write_epoch(run_id, record(epoch, 0.6, 0.6), worker="w2")
    assert store.finish(run_id, "w1", "completed", last_epoch=2) is False
    assert [r["epoch"] for r in store.epoch_metrics(run_id)] == list(range(6))
    run = store.run(run_id)
    assert (run.status, run.worker) == ("running", "w2")


def test_heartbeat_extends_the_holders_lease(store):
    """A heartbeat renews the lease, so a live worker's run is not stale nor claimable by others."""
    store.submit_grid("g", {}, cells(1))
    (run_id,) = store.run_ids()
    store.claim(run_id, "w1", -1)
    assert store.stale_runs() == [run_id]
    assert store.heartbeat(run_id, "w2", 60) is False  # not its run
    assert store.heartbeat(run_id, "w1", 60) is True
    assert store.stale_runs() == []
    assert store.run(run_id).lease_expires_at > datetime.now(timezone.utc) + timedelta(seconds=50)
    assert store.claim(run_id, "w2", 60) is None


def test_cancel_stops_running_and_waiting_runs(store):
    store.submit_grid("g", {}, cells(3))
    running = store.claim_next("w1", 60, grid="g").id
    assert store.cancel("g") == (2, 1)
    assert store.heartbeat(running, "w1", 60) is False
    assert store.status_counts("g")["cancelled"] == 3
    assert store.claim_next("w2", 60) is None
    assert store.mark_queued(store.run_ids(grid="g")) == 3
    requeued = store.run(running)
    assert (requeued.status, requeued.attempts, requeued.finished_at) == ("queued", 0, None)


def test_cancel_catches_a_run_handed_back_while_it_runs(postgres_store):
    """PostgreSQL: a hand-back (running -> queued) committing while cancel works must not slip
    between its checks (two UPDATEs by status once missed it: queued in neither's snapshot)."""
    import threading
    import time

    store = postgres_store
    store.submit_grid("g", {}, cells(1))
    run_id = store.claim_next("w1", 60, grid="g").id
    holding, results = threading.Event(), []

    def slow_release():
        with store.engine.begin() as conn:  # Store.release's statement, its commit held back
            conn.exec_driver_sql("UPDATE runs SET status = 'queued', lease_expires_at = NULL "
                                 "WHERE id = %(id)s AND status = 'running' AND worker = 'w1'", {"id": run_id})
            holding.set()
            time.sleep(1.0)

    releaser = threading.Thread(target=slow_release)
    releaser.start()
    holding.wait(10)
    canceller = threading.Thread(target=lambda: results.append(store.cancel("g")))
    canceller.start()
    releaser.join()
    canceller.join(10)
    assert results == [(1, 0)]  # seen as the waiting run it had become
    assert store.run(run_id).status == "cancelled"


def test_release_requeues_and_max_attempts_fails_the_run(store, caplog):
    store.submit_grid("g", {}, cells(1))
    run_id = store.run_ids()[0]
    store.claim(run_id, "w1", 60, max_attempts=2)
    assert store.release(run_id, "w1", error="worker shut down") is True
    assert store.release(run_id, "w1") is False  # no longer running
    assert store.run(run_id).status == "queued"
    store.claim(run_id, "w2", -1, max_attempts=2)  # second attempt, then the lease lapses
    assert store.claim(run_id, "w3", 60, max_attempts=2) is None
    # to its caller one more run not claimed: the log says the claim failed it
    assert f"run {run_id} marked failed at a claim by w3: it has used all its attempts (KANFARM_MAX_ATTEMPTS=2)" \
        in caplog.text
    failed = store.run(run_id)
    assert (failed.status, failed.attempts, failed.error) == ("failed", 2, "worker shut down")
    assert store.mark_queued([run_id]) == 1
    assert store.claim(run_id, "w4", 60, max_attempts=2).attempts == 1


def test_each_claim_path_logs_a_run_it_fails_for_its_attempts_once(store, caplog):
    """claim_next moves on past a run out of attempts to the next; claim_many takes a pack: each
    run failed on the way is logged once, the run claimed not at all."""
    store.submit_grid("g", {}, cells(4))
    ids = store.run_ids()
    for run_id in ids:
        store.claim(run_id, "w0", -1)  # an attempt each, its lease already lapsed
    assert store.claim_next("w1", 60, max_attempts=1) is None  # all four are out of attempts
    assert [caplog.text.count(f"run {i} marked failed at a claim by w1") for i in ids] == [1, 1, 1, 1]
    caplog.clear()
    assert store.mark_queued(ids[2:3]) == 1  # a fresh attempt budget for this one
    assert store.mark_queued(ids[:2], fresh_attempts=False) == 2
    assert [r.id for r in store.claim_many(ids[:3], "w2", 60, max_attempts=1)] == [ids[2]]
    assert [caplog.text.count(f"run {i} marked failed at a claim by w2") for i in ids] == [1, 1, 0, 0]


def test_requeue_can_keep_the_attempt_count(store):
    store.submit_grid("g", {}, cells(2))
    kept, fresh = store.run_ids()
    for run_id in (kept, fresh):
        store.claim(run_id, "w1", 60)
        store.finish(run_id, "w1", "failed", error="boom")
    assert store.mark_queued([kept], fresh_attempts=False) == 1 and store.mark_queued([fresh]) == 1
    assert (store.run(kept).attempts, store.run(fresh).attempts) == (1, 0)
    assert store.claim(kept, "w2", 60, max_attempts=2).attempts == 2
    store.finish(kept, "w2", "failed")
    store.mark_queued([kept], fresh_attempts=False)
    assert store.claim(kept, "w3", 60, max_attempts=2) is None and store.run(kept).status == "failed"


def test_a_claim_waits_for_the_holders_write_in_flight(store):
    """The holder check of a write locks the run until the write commits: a claim by another
    worker (the lease has lapsed) waits, so no row lands for a worker that no longer holds it."""
    store.submit_grid("g", {}, cells(1))
    run_id = store.run_ids()[0]
    store.claim(run_id, "w1", -1)  # w1's lease has lapsed: the run is claimable
    checked, claiming, committed, claims = threading.Event(), threading.Event(), threading.Event(), []

    def claim_during_the_write():
        checked.wait(10)
        claiming.set()
        claims.append((store.claim(run_id, "w2", 60), committed.is_set()))

    thief = threading.Thread(target=claim_during_the_write)
    thief.start()
    with store._write() as conn:  # what write_epoch(worker="w1") does, held open in the middle
        store._require_holder(conn, run_id, "w1")
        checked.set()
        assert claiming.wait(10)  # the thief is in its claim (not merely slow to start) ...
        thief.join(1.0)  # ... and stays there while w1's write is open
        assert thief.is_alive(), "the claim went through between w1's check and its write"
        committed.set()  # (set just before the commit: a claim that returns before it is wrong)
    thief.join(30)
    claim, after_commit = claims[0]
    assert claim.worker == "w2" and after_commit
    with pytest.raises(LeaseLost):
        store.write_epoch(run_id, record(0, 0.1, 0.1), worker="w1")
    with pytest.raises(LeaseLost):
        store.record_checkpoint(run_id, 0, "/ck/0.pt", "a" * 64, worker="w1")
    assert store.checkpoints(run_id) == [] and store.epoch_metrics(run_id) == []


def test_claim_next_takes_lowest_id_of_the_grid(store):
    store.submit_grid("a", {}, cells(2))
    store.submit_grid("b", {}, cells(2, dataset="digits", intrinsic_dim=None))
    a_ids, b_ids = store.run_ids(grid="a"), store.run_ids(grid="b")
    assert store.claim_next("w", 60, grid="b").id == b_ids[0]
    assert store.claim_next("w", 60).id == a_ids[0]
    assert [store.claim_next("w", 60, grid="b").id, store.claim_next("w", 60, grid="b")] == [b_ids[1], None]
    assert store.status_counts("b") == {**dict.fromkeys(store.status_counts(), 0), "running": 2}
    assert store.run_ids(statuses=["pending"]) == a_ids[1:]
    with pytest.raises(ValueError):
        store.run_ids(statuses=["bogus"])
    with pytest.raises(ValueError):
        store.finish(a_ids[0], "w", "pending")


# -- epochs and checkpoints ---------------------------------------------------------------------

@pytest.mark.parametrize("bad", [dict(test_acc=1.5), dict(train_acc=-0.1), dict(test_acc=math.nan),
                                 dict(train_loss=math.inf), dict(extra={"lr": math.nan})])
def test_write_epoch_refuses_bad_values(store, bad):
    store.submit_grid("g", {}, cells(1))
    run_id = store.run_ids()[0]
    with pytest.raises(ValueError):
        store.write_epoch(run_id, dataclasses.replace(record(3, 0.5, 0.5), **bad))
    assert store.epoch_metrics(run_id) == []


def test_acc_check_constraints_guard_direct_sql(store):
    store.submit_grid("g", {}, cells(1))
    run_id = store.run_ids()[0]
    with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO epoch_metrics (run_id, epoch, test_acc, seconds, diverged, extra)"
                             " VALUES (:r, 0, 1.5, 0, :d, :e)"), {"r": run_id, "d": False, "e": "{}"})


def test_write_epochs_writes_the_held_runs_rows_in_one_go(store):
    """A pack's epoch: the rows of runs the worker holds are written (a repeat replaces), those of
    runs it does not hold are not, and are named; a bad record refuses the whole batch first."""
    store.submit_grid("g", {}, cells(3))
    mine, also_mine, taken = store.run_ids()
    store.claim(mine, "w", 60)
    store.claim(also_mine, "w", 60)
    store.claim(taken, "other", 60)
    store.write_epoch(mine, record(0, 0.1, 0.1), worker="w")
    lost = store.write_epochs([(mine, record(0, 0.2, 0.25)), (also_mine, record(0, 0.3, 0.35)),
                               (taken, record(0, 0.4, 0.45))], "w")
    assert lost == ({taken}, set())
    rows = store.epoch_metrics(grid="g")
    assert [(r["run_id"], r["epoch"], r["test_acc"]) for r in rows] == [(mine, 0, 0.25), (also_mine, 0, 0.35)]
    with pytest.raises(ValueError, match="outside"):
        store.write_epochs([(mine, record(1, 0.5, 0.5)), (also_mine, record(1, 0.5, 1.5))], "w")
    assert len(store.epoch_metrics(grid="g")) == 2
    assert store.write_epochs([], "w") == (set(), set())
    store.cancel("g")  # cancelled while running: still written, and said so
    assert store.write_epochs([(mine, record(1, 0.5, 0.5)), (taken, record(1, 0.5, 0.5))], "w") == ({taken}, {mine})
    assert store.write_epoch(also_mine, record(1, 0.5, 0.5), worker="w") is True


def test_write_epoch_is_idempotent_and_a_rewrite_replaces(store):
    store.submit_grid("g", {}, cells(1))
    run_id = store.run_ids()[0]
    store.claim(run_id, "w", 60)
    store.write_epoch(run_id, record(0, 0.1, 0.1, extra={"lr": 0.001}), worker="w")
    store.write_epoch(run_id, record(0, 0.1, 0.1, extra={"lr": 0.001}), worker="w")
    rows = store.epoch_metrics(run_id)
    assert len(rows) == 1 and rows[0]["extra"] == {"lr": 0.001} and rows[0]["diverged"] is False
    store.write_epoch(run_id, record(0, 0.2, 0.3))
    store.write_epoch(run_id, record(1, None, None, diverged=True))
    rows = store.epoch_metrics(grid="g")
    assert [(r["epoch"], r["test_acc"], r["diverged"]) for r in rows] == [(0, 0.3, False), (1, None, True)]


def test_checkpoint_rewrite_replaces(store):
    store.submit_grid("g", {}, cells(1))
    run_id = store.run_ids()[0]
    store.record_checkpoint(run_id, 2, "/ck/2.pt", "a" * 64)
    store.record_checkpoint(run_id, 2, "/ck/2b.pt", "b" * 64)
    store.record_checkpoint(run_id, 1, "/ck/1.pt", "c" * 64)
    assert [(c.epoch, c.path, c.sha256) for c in store.checkpoints(run_id)] == [
        (1, "/ck/1.pt", "c" * 64), (2, "/ck/2b.pt", "b" * 64)]


def test_query_is_parameterised_and_read_only(store):
    store.submit_grid("g", {}, cells(3))
    assert store.query("SELECT COUNT(*) AS n FROM runs WHERE seed >= :s", {"s": 1}) == [{"n": 2}]
    with pytest.raises(ValueError, match="a statement that reads, beginning with SELECT"):
        store.query("DELETE FROM runs")
    with pytest.raises(sa.exc.DBAPIError):  # reads first, then writes: the transaction refuses it
        store.query("WITH doomed AS (SELECT id FROM runs) DELETE FROM runs WHERE id IN (SELECT id FROM doomed)")
    assert len(store.run_ids()) == 3
    store.write_epoch(store.run_ids()[0], record(0, 0.1, 0.1))  # the connection is writable again
    # a second statement could turn the transaction back to read-write (PostgreSQL runs them all)
    for sql in ("SET TRANSACTION READ WRITE; DELETE FROM grid_runs; COMMIT; SELECT 1 AS x",
                "SELECT 1 AS x; DELETE FROM runs", "SELECT ';' AS x; DELETE FROM runs -- ;",
                # quoting that fooled a parser of SQL: an E-string's \' and a $1$ that is no dollar quote
                "SELECT E'\\'' ; COMMIT; DELETE FROM grid_runs; -- '",
                "SELECT 1 AS x, '$1$'; DELETE FROM grid_runs; SELECT '$1$'"):
        with pytest.raises((ValueError, sa.exc.DBAPIError)):  # SQLite cannot even parse SET TRANSACTION
            store.query(sql)
    with pytest.raises(ValueError, match="one SQL statement"):
        store.query("SELECT 1 AS x; DELETE FROM runs")
    assert len(store.run_ids("g")) == 3
    assert store.query("SELECT ';' AS x, 1 AS \"a;b\" /* ; */ ; -- ;") == [{"x": ";", "a;b": 1}]


def test_query_refuses_statements_that_act_without_writing_rows(store, tmp_path):
    """A read-only transaction still lets SQLite's ATTACH create a file and its PRAGMAs stay with
    the pooled connection (busy_timeout 0: every later write fails at once when another holds the
    lock), and lets PostgreSQL's COPY write files; a session's advisory lock outlived the query."""
    store.submit_grid("g", {}, cells(1))
    attached = tmp_path / "attached.db"
    for sql in (f"ATTACH DATABASE '{attached}' AS e", "PRAGMA busy_timeout = 0", "/* SELECT */ PRAGMA busy_timeout = 0",
                f"COPY (SELECT 1) TO '{tmp_path / 'copied.csv'}'", "LOCK TABLE runs", "EXPLAIN SELECT 1", "-- SELECT",
                # PostgreSQL ends a "--" comment at a carriage return: this is its COPY, SQLite's SELECT
                f"--x\rCOPY (SELECT 1) TO '{tmp_path / 'copied.csv'}' /*\nSELECT */"):
        with pytest.raises(ValueError, match="a statement that reads"):
            store.query(sql)
    assert not attached.exists() and not (tmp_path / "copied.csv").exists()
    assert store.query("-- the study's runs\n  SELECT COUNT(*) AS n FROM runs") == [{"n": 1}]
    assert store.query("-- written on Windows\r\nSELECT COUNT(*) AS n FROM runs") == [{"n": 1}]
    assert store.query("VALUES (1)") and store.query("with x as (select 1 as y) select y from x") == [{"y": 1}]
    if store.engine.dialect.name == "postgresql":
        store.query("SELECT pg_advisory_lock(4242) IS NULL AS locked")
        assert store.query("SELECT COUNT(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242") == [
            {"n": 0}]


# -- run_summary --------------------------------------------------------------------------------

def expected_summary(rows: list[EpochRecord], n_params: int, intrinsic_dim: int | None) -> dict:
    """Straight from FACTS.md, independent of the view's SQL."""
    scored = [r for r in rows if r.test_acc is not None]
    best = max(r.test_acc for r in scored)
    at_best = min((r for r in scored if r.test_acc == best), key=lambda r: r.epoch)
    gaps = [r.train_acc - r.test_acc for r in rows if r.train_acc is not None and r.test_acc is not None]
    eff = None
    if intrinsic_dim is not None and n_params > intrinsic_dim:
        eff = best / (at_best.epoch + 1) / math.log(1 + n_params - intrinsic_dim)
    return {"best_test_acc": best, "best_epoch": at_best.epoch, "train_acc_at_best": at_best.train_acc,
            "gap_at_best": at_best.train_acc - at_best.test_acc, "mean_gap": sum(gaps) / len(gaps),
            "max_gap": max(gaps), "epochs_run": max(r.epoch for r in rows), "efficiency": eff}


def test_run_summary_matches_an_independent_calculation(store):
    rng = random.Random(7)
    specs = [(5000, 750), (254_080, 9000), (700, 750), (5000, None), (2000, 0)]
    hand_built = [  # ties at the maximum: best_epoch is the first of them
        [record(0, 0.10, 0.10), record(1, 0.65, 0.60), record(2, 0.90, 0.80), record(3, 0.95, 0.80),
         record(4, 0.99, 0.70)],
        [record(0, 0.50, 0.90), record(1, 0.20, 0.30)],  # best before training: t = 0
    ]
    runs = hand_built + [[record(e, round(rng.random(), 2), round(rng.choice([0.5, 0.6, rng.random()]), 2))
                          for e in range(rng.randint(2, 8))] for _ in specs[2:]]
    for i, ((n_params, intrinsic_dim), _rows) in enumerate(zip(specs, runs)):
        store.submit_grid("g", {}, [(RunConfig(dataset="mnist", seed=i), n_params, intrinsic_dim)])
    store.submit_grid("g", {}, [(RunConfig(dataset="mnist", seed=99), 5000, 750)])  # no epochs
    ids = store.run_ids(grid="g")
    for run_id, rows in zip(ids, runs):
        for r in rows:
            store.write_epoch(run_id, r)
    store.write_epoch(ids[0], record(5, None, None, diverged=True))  # no accs: ignored but counted
    store.claim(ids[0], "w", 60)
    store.finish(ids[0], "w", "diverged")

    summary = {row["run_id"]: row for row in store.summary(grid="g")}
    assert sorted(summary) == ids
    for run_id, rows, (n_params, intrinsic_dim) in zip(ids, runs, specs):
        want = expected_summary(rows, n_params, intrinsic_dim)
        if run_id == ids[0]:
            want["epochs_run"] = 5
        got = summary[run_id]
        for key, value in want.items():
            if value is None:
                assert got[key] is None, key
            else:
                assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (run_id, key)
        assert (got["n_params"], got["intrinsic_dim"], got["dataset"], got["hidden_widths"]) == (
            n_params, intrinsic_dim, "mnist", "32")
    assert summary[ids[0]]["best_epoch"] == 2 and summary[ids[1]]["best_epoch"] == 0
    assert [summary[i]["diverged"] for i in ids[:2]] == [1, 0]
    empty = summary[ids[-1]]
    assert empty["best_test_acc"] is None and empty["epochs_run"] is None and empty["efficiency"] is None
    assert empty["status"] == "pending" and store.summary(grid="other") == []


def test_overfitting_onset_from_sql_matches_the_curves(store):
    """The gap report's onset comes from one aggregate query; the same from the curves in Python."""
    curves = [
        [0.10, 0.80, 0.90, 0.85, 0.90],  # falls after its first peak, recovers: onset 2
        [0.10, 0.80, 0.90],              # peak last: none
        [0.10, 0.90, 0.895],             # falls by 0.005: onset 1 at tolerance 0, none at 0.01
        [0.70],                          # one epoch: none
        [0.10, 0.90, 0.90, None],        # a tie, then an unscored (diverged) epoch: none
        [0.90, 0.20, 0.30],              # best before training: onset 0
    ]
    configs = [(RunConfig(dataset="mnist", seed=i), 1000, None) for i in range(len(curves))]
    store.submit_grid("g", {}, configs)
    store.submit_grid("other", {}, [(RunConfig(dataset="mnist", seed=99), 1000, None)])
    ids = store.run_ids(grid="g")
    for run_id, curve in zip(ids, curves):
        for epoch, acc in enumerate(curve):
            store.write_epoch(run_id, record(epoch, None if acc is None else 0.95, acc, diverged=acc is None))
        store.claim(run_id, "w", 60)
        store.finish(run_id, "w", "completed")
    other = store.run_ids(grid="other")[0]
    for epoch, acc in enumerate([0.9, 0.1]):
        store.write_epoch(other, record(epoch, 0.95, acc))

    lowest = store.lowest_test_acc_after_best(grid="g")
    assert lowest == pytest.approx({ids[0]: 0.85, ids[2]: 0.895, ids[4]: 0.90, ids[5]: 0.20})
    assert store.lowest_test_acc_after_best()[other] == pytest.approx(0.1)
    for tolerance in (0.0, 0.01):
        onset = {r["run_id"]: r["overfit_onset_epoch"] for r in gap_table(store, "g", tolerance)}
        want = {run_id: overfit_onset([(e, a) for e, a in enumerate(curve) if a is not None], tolerance)
                for run_id, curve in zip(ids, curves)}
        assert onset == want
    assert [onset[i] for i in ids] == [2, None, None, None, None, 0]  # tolerance 0.01


def test_efficiency_table_by_decreasing_efficiency_undefined_last(store):
    """n_params <= the intrinsic dimension (750 for MNIST) leaves efficiency undefined: last."""
    cells = [(0.5, 2000), (0.9, 700), (0.9, 2000), (0.7, 1000), (0.9, 2000), (0.8, 100_000)]
    store.submit_grid("g", {}, [(RunConfig(dataset="mnist", seed=i), n, None) for i, (_, n) in enumerate(cells)])
    ids = store.run_ids(grid="g")
    for run_id, (acc, _) in zip(ids, cells):
        store.write_epoch(run_id, record(0, acc, acc))
        store.claim(run_id, "w", 60)
        store.finish(run_id, "w", "completed")
    table = efficiency_table(store, "g")
    # a stable sort of the ids: a tie (ids[2] and ids[4]) keeps id order
    want = sorted(ids[:1] + ids[2:], key=lambda i: -cells[ids.index(i)][0] / math.log(1 + cells[ids.index(i)][1] - 750))
    assert [r["run_id"] for r in table] == want + [ids[1]] and table[-1]["efficiency"] is None
    assert want.index(ids[4]) == want.index(ids[2]) + 1


# -- concurrency --------------------------------------------------------------------------------

def drain(url: str, worker: str, start=None) -> list[int]:
    """A worker's life: claim, beat, write an epoch, finish, until nothing is left."""
    store = Store(url)
    if start is not None:
        start.wait()
    claimed = []
    try:
        while (run := store.claim_next(worker, 60)) is not None:
            claimed.append(run.id)
            assert store.heartbeat(run.id, worker, 60)
            store.write_epoch(run.id, record(0, 0.5, 0.5), worker=worker)
            assert store.finish(run.id, worker, "completed")
    finally:
        store.dispose(close=True)
    return claimed


def _drain_process(url: str, worker: str, start, results) -> None:
    try:
        results.put((worker, drain(url, worker, start)))
    except BaseException as exc:  # reported to the parent, which fails the test
        results.put((worker, f"{type(exc).__name__}: {exc}"))


def assert_each_claimed_once(store: Store, claims: dict[str, list[int]]) -> None:
    errors = {w: c for w, c in claims.items() if isinstance(c, str)}
    assert errors == {}
    every = [run_id for ids in claims.values() for run_id in ids]
    assert sorted(every) == store.run_ids() and len(set(every)) == 40
    assert store.status_counts()["completed"] == 40
    assert all(store.run(i).attempts == 1 for i in every)


@pytest.mark.services
def test_eight_threads_on_postgres_claim_every_run_once(postgres_store):
    postgres_store.submit_grid("g", {}, cells(40))
    start = threading.Barrier(8)
    with ThreadPoolExecutor(8) as pool:
        futures = {f"t{i}": pool.submit(drain, postgres_store.url_string, f"t{i}", start) for i in range(8)}
        claims = {w: f.result(timeout=60) for w, f in futures.items()}
    assert_each_claimed_once(postgres_store, claims)


@pytest.mark.services
@pytest.mark.parametrize("writer", ["cancel", "mark_queued", "write_epochs", "restated_intrinsic_dim"])
def test_writes_to_many_runs_lock_them_in_id_order_and_never_deadlock_with_a_pack_claim(postgres_store, writer):
    """A pack's claim locks its runs in id order. The other writes to many runs locked them in the
    table's physical order, which updates shuffle: with the claim holding run 1 and the writer
    holding 2-4, each waited on the other and PostgreSQL aborted one (a cancel that failed, or a
    pack handed back as if the database were down)."""
    import time

    store = postgres_store
    store.submit_grid("g", {}, cells(4))
    ids = store.run_ids("g")
    held = {"cancel": "running", "write_epochs": "running"}.get(writer, "failed")
    with store.engine.begin() as conn:  # rewritten 3, then 1: the table now holds 2, 4, 3, 1
        for run_id in (ids[2], ids[0]):
            conn.execute(sa.text("UPDATE runs SET status = 'failed' WHERE id = :i"), {"i": run_id})
        conn.execute(sa.text("UPDATE runs SET status = :s, worker = 'w' WHERE id IN (:a, :b, :c, :d)"),
                     {"s": held, "a": ids[0], "b": ids[1], "c": ids[2], "d": ids[3]})
    write = {"cancel": lambda: store.cancel("g"),
             "mark_queued": lambda: store.mark_queued(ids),
             "write_epochs": lambda: store.write_epochs([(i, record(1, 0.5, 0.5)) for i in ids], "w"),
             "restated_intrinsic_dim": lambda: store.submit_grid("g", {}, cells(4), stated_intrinsic_dims={"mnist": 9})}
    errors: list[BaseException] = []

    def run_writer():
        try:
            write[writer]()
        except BaseException as exc:
            errors.append(exc)

    claim = store.engine.connect()
    watch = store.engine.connect()
    try:
        with claim.begin():
            claim.execute(sa.text("SELECT id FROM runs WHERE id = :i FOR UPDATE"), {"i": ids[0]})  # lowest id first
            thread = threading.Thread(target=run_writer)
            thread.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not watch.execute(sa.text(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()")).scalar():
                time.sleep(0.02)
            claim.execute(sa.text("SELECT id FROM runs WHERE id IN (:b, :c, :d) ORDER BY id FOR UPDATE"),
                          {"b": ids[1], "c": ids[2], "d": ids[3]})  # the claim takes the rest of its pack
        thread.join(timeout=20)
    finally:
        claim.close()
        watch.close()
    assert not thread.is_alive() and errors == []


def test_processes_on_one_sqlite_file_claim_every_run_once(sqlite_store):
    sqlite_store.submit_grid("g", {}, cells(40))
    sqlite_store.dispose(close=True)  # no open SQLite connection may cross a fork
    # fork: children start in milliseconds (spawn would re-import torch via kanfarm.training)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    start, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_drain_process, args=(sqlite_store.url_string, f"p{i}", start, results))
             for i in range(3)]
    for p in procs:
        p.start()
    claims = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=10)
    assert_each_claimed_once(sqlite_store, claims)


def test_claim_many_takes_each_claimable_run_once_in_the_given_order(store):
    store.submit_grid("g", {}, cells(5))
    ids = store.run_ids(grid="g")
    store.finish(store.claim(ids[1], "other", 60).id, "other", "completed")
    claimed = store.claim_many([ids[3], ids[0], ids[1], ids[3], ids[2]], "w1", 60)
    assert [r.id for r in claimed] == [ids[3], ids[0], ids[2]]  # finished run left out, duplicate once
    assert all(r.worker == "w1" and r.attempts == 1 for r in claimed)
    assert [r.id for r in store.claim_many(list(reversed(ids)), "w2", 60)] == [ids[4]]


def test_status_estimates_only_from_epochs_of_the_same_dataset(store):
    from kanfarm.status import grid_status
    from kanfarm.training import EpochRecord

    store.submit_grid("d", {}, [(RunConfig(dataset="digits", seed=s, max_epochs=10), 100, None) for s in (0, 1)])
    store.submit_grid("m", {}, [(RunConfig(dataset="mnist", seed=0, max_epochs=10), 100, None)])
    timed, waiting = store.run_ids("d")
    store.claim(timed, "w", 60)
    for epoch in range(3):
        store.write_epoch(timed, EpochRecord(epoch, 1.0, 0.5, 1.0, 0.5, 2.0), worker="w")
    digits = grid_status(store, "d")
    # epochs 1-2 timed at 2 s: the running run has 8 epochs left, the waiting one 10
    assert digits["eta_seconds"] == pytest.approx(2.0 * (8 + 10)) and digits["epochs_timed"] == 2
    assert grid_status(store, "m")["eta_seconds"] is None  # no mnist epoch timed: unknown, not digits' pace
    assert grid_status(store)["eta_seconds"] is None
    asked = []
    query = store.query
    store.query = lambda sql, params=None: asked.append(sql) or query(sql, params)
    store.cancel("m")  # nothing left to estimate: no epoch row is read for it
    assert grid_status(store, "m")["eta_seconds"] == 0 and not any("AVG(e.seconds)" in sql for sql in asked)
    assert grid_status(store, "d")["eta_seconds"] == pytest.approx(2.0 * (8 + 10))


def test_status_counts_every_ended_run_as_done_and_times_an_untimed_shape_by_its_dataset(store):
    from kanfarm.status import grid_status
    from kanfarm.training import EpochRecord

    # ended: completed, diverged, failed (grid "g"), cancelled (grid "c", shared into "g")
    store.submit_grid("g", {}, [(RunConfig(dataset="digits", seed=s, max_epochs=4), 100, None) for s in range(3)])
    store.submit_grid("c", {}, [(RunConfig(dataset="digits", seed=3, max_epochs=4), 100, None)])
    store.cancel("c")
    store.submit_grid("g", {}, [(RunConfig(dataset="digits", seed=s, max_epochs=4), 100, None) for s in range(4)]
                      + [(RunConfig(dataset="digits", grid_size=8, max_epochs=6), 100, None)])  # waits, untimed shape
    ids = store.run_ids("g")
    for run_id, status, seconds in zip(ids, ("completed", "diverged", "failed"), (1.0, 2.0, 6.0)):
        store.claim(run_id, "w", 60)
        for epoch in range(3):
            store.write_epoch(run_id, EpochRecord(epoch, 1.0, 0.5, 1.0, 0.5, seconds), worker="w")
        store.finish(run_id, "w", status)
    got = grid_status(store, "g")
    assert {k: n for k, n in got["counts"].items() if n} == {"completed": 1, "diverged": 1, "failed": 1,
                                                             "cancelled": 1, "pending": 1}
    assert (got["total"], got["done"], got["progress"]) == (5, 4, pytest.approx(0.8))
    # no grid_size-8 epoch timed: the mean over every timed digits epoch (1, 2 and 6 s, two each), 6 epochs
    assert got["eta_seconds"] == pytest.approx(3.0 * 6) and got["epochs_timed"] == 6
    assert got["stale"] == 0
    (waiting,) = store.run_ids("g", statuses=["pending"])
    store.mark_queued([waiting])
    store.claim(waiting, "w", 60)
    assert grid_status(store, "g")["stale"] == 0  # running, its lease alive
    store.expire_lease(waiting, "w")  # its worker died, or hung and gave it up
    assert grid_status(store, "g")["stale"] == 1 and grid_status(store, "c")["stale"] == 0


def test_status_times_grids_of_explicit_widths_by_their_own_widths_and_batch_size(store):
    """Grids that give widths store no depth: every such architecture was pooled into one mean
    (a 1024-wide KAN's 21 s epochs estimated from 8-wide ones: "about 2 s" left)."""
    from kanfarm.status import grid_status
    from kanfarm.training import EpochRecord

    def grid(name, widths, batch_size, seconds, epochs_done, seed=0, max_epochs=5, trainer="backprop"):
        store.submit_grid(name, {}, [(RunConfig(dataset="digits", depth=None, hidden_widths=widths, seed=seed,
                                                batch_size=batch_size, max_epochs=max_epochs, trainer=trainer),
                                      100, None)])
        (run_id,) = store.run_ids(name)
        store.claim(run_id, "w", 60)
        for epoch in range(epochs_done + 1):
            store.write_epoch(run_id, EpochRecord(epoch, 1.0, 0.5, 1.0, 0.5, seconds), worker="w")
        return run_id

    for i in range(20):
        store.finish(grid(f"small{i}", (8,), 64, 0.01, 5, seed=i), "w", "completed")
    grid("big", (1024, 1024), 64, 20.0, 1)
    assert grid_status(store, "big")["eta_seconds"] == pytest.approx(4 * 20.0)
    grid("small-batch", (8,), 4, 0.3, 1)  # same widths, a smaller batch: its own pace
    assert grid_status(store, "small-batch")["eta_seconds"] == pytest.approx(4 * 0.3)
    grid("hsic", (8,), 64, 0.5, 1, trainer="hsic")  # same network and batch, another trainer's pace
    assert grid_status(store, "hsic")["eta_seconds"] == pytest.approx(4 * 0.5)


def test_status_times_runs_of_other_dataset_options_apart(store):
    """imdb's vocabulary size is its input width (higgs's n_train the rows of an epoch): a
    20,000-word run was estimated from 30-word epochs, 100x too fast."""
    from kanfarm.status import grid_status
    from kanfarm.training import EpochRecord

    def imdb(name, vocab_size, seconds=None, seed=0):
        config = RunConfig(dataset="imdb", model="kan", depth=None, hidden_widths=(64,), max_epochs=5, seed=seed,
                           dataset_options={"vocab_size": vocab_size})
        store.submit_grid(name, {}, [(config, 100, None)])
        (run_id,) = store.run_ids(name)
        if seconds is not None:
            store.claim(run_id, "w", 60)
            for epoch in range(6):
                store.write_epoch(run_id, EpochRecord(epoch, 1.0, 0.5, 1.0, 0.5, seconds), worker="w")
            store.finish(run_id, "w", "completed")

    imdb("small", 30, seconds=0.01)
    imdb("large", 20000, seconds=0.5)
    imdb("large-again", 20000, seed=1)
    imdb("small-again", 30, seed=1)
    assert grid_status(store, "large-again")["eta_seconds"] == pytest.approx(5 * 0.5)
    assert grid_status(store, "small-again")["eta_seconds"] == pytest.approx(5 * 0.01)


def test_resubmitting_a_grid_that_states_no_intrinsic_dim_keeps_another_grids_value(store):
    from kanfarm.grids import parse_spec
    from kanfarm.submission import submit

    base = {"datasets": ["mnist"], "models": ["mlp"], "depths": ["shallow"], "inits": ["kaiming_normal"],
            "optimizers": ["adam"], "learning_rates": [0.01], "seeds": [0]}
    submit(store, parse_spec({**base, "name": "a"}))                     # mnist: the known 750
    submit(store, parse_spec({**base, "name": "c", "intrinsic_dim": {"mnist": 40}}))
    submit(store, parse_spec({**base, "name": "a"}))                     # run grid a again
    assert [store.run(i).intrinsic_dim for i in store.run_ids()] == [40]


def test_a_worker_taking_back_its_own_expired_run_spends_no_attempt(store):
    """Its hand-back failed in a database outage; after the lease it claims the run again."""
    store.submit_grid("g", {}, cells(1))
    (run_id,) = store.run_ids()
    assert store.claim(run_id, "w1", 60, max_attempts=1).attempts == 1
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE runs SET lease_expires_at = '2000-01-01 00:00:00' WHERE id = :i"), {"i": run_id})
    again = store.claim(run_id, "w1", 60, max_attempts=1)
    assert again is not None and again.attempts == 1 and again.status == "running"
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE runs SET lease_expires_at = '2000-01-01 00:00:00' WHERE id = :i"), {"i": run_id})
    assert store.claim(run_id, "w2", 60, max_attempts=1) is None  # another worker: an attempt, and none is left
    assert store.run(run_id).status == "failed"


def _readme_sql() -> list[str]:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return [block.split("```", 1)[0].strip() for block in text.split("```sql\n")[1:]]


def test_the_readmes_queries_run_on_both_backends(store):
    """The README's SQL is a promise to researchers: every query runs, and gives the same
    numbers with the same types, on SQLite and PostgreSQL (including its portability notes)."""
    queries = _readme_sql()
    assert len(queries) >= 4
    store.submit_grid("demo", {}, cells(4, dataset="digits", intrinsic_dim=0))
    ids = store.run_ids("demo")
    for n, run_id in enumerate(ids[:3]):
        store.claim(run_id, "w", 60)
        store.write_epoch(run_id, record(0, 0.1, 0.1), worker="w")
        if n == 2:
            store.write_epoch(run_id, record(1, None, None, diverged=True), worker="w")
            store.finish(run_id, "w", "diverged", last_epoch=1)
        else:
            store.write_epoch(run_id, record(1, 0.5 + n / 10, 0.4 + n / 10), worker="w")
            store.finish(run_id, "w", "completed", last_epoch=1)
    results = [store.query(sql) for sql in queries]
    assert all(results), [q for q, r in zip(queries, results) if not r]
    (rate,) = [r for q, r in zip(queries, results) if "divergence_rate" in q]
    assert [(type(row["divergence_rate"]), row["divergence_rate"]) for row in rate] == [(float, 1 / 3)]
    portable = store.query("SELECT run_id, CAST(config->>'dropout' AS DOUBLE PRECISION) AS dropout "
                           "FROM run_summary JOIN runs ON runs.id = run_summary.run_id "
                           "ORDER BY best_test_acc DESC NULLS LAST")
    assert [row["run_id"] for row in portable][:2] == [ids[1], ids[0]] and portable[0]["dropout"] == 0.2
    assert store.query("SELECT COUNT(*) AS n FROM epoch_metrics WHERE diverged") == [{"n": 1}]


def test_sqlite_without_math_functions_gets_ln_from_python():
    """The run_summary view's efficiency calls LN, which some Python builds' SQLite lack: the
    connection then gets a Python LN with SQLite's own results (NULL outside its domain)."""
    import sqlite3

    from kanfarm.store.engine import _ln, _provide_ln

    builtin = sqlite3.connect(":memory:")
    for x in (2.5, 1, 7, 0, -1.0, None, "abc", 10 ** 400 // 10 ** 390):
        got, want = builtin.execute("SELECT ln(?)", (x,)).fetchone()[0], _ln(x)
        assert (got is None and want is None) or got == pytest.approx(want), (x, got, want)

    registered = []

    class NoMath:
        def execute(self, sql):
            raise sqlite3.OperationalError("no such function: ln")

    class Connection:
        def create_function(self, name, n_args, function, deterministic):
            registered.append((name, n_args, function))

    _provide_ln(Connection(), NoMath())
    assert registered == [("ln", 1, _ln)]
    _provide_ln(Connection(), builtin.cursor())  # built in: left alone
    assert len(registered) == 1


def test_a_deleted_database_file_recreated_empty_by_another_connection_is_reported_deleted(tmp_path):
    """After the file is deleted, any process's next connection creates it anew, empty, before its
    own check refuses: that file is the deleted one's trace, not a database put in its place."""
    import sqlite3

    from kanfarm.store import DatabaseFileReplaced

    db = tmp_path / "k.db"
    store = Store(f"sqlite:///{db}")
    store.upgrade()
    store.status_counts()
    db.unlink()
    sqlite3.connect(db).close()  # another worker's connection
    assert db.stat().st_size == 0
    with pytest.raises(DatabaseFileReplaced, match="was deleted while"):
        store.status_counts()
    store.dispose()


@pytest.mark.parametrize("url, words", [
    ("mysql://root:topsecret@127.0.0.1/db", "unsupported database"),
    ("sqlite://", "in-memory"),
    ("sqlite:////no/such/folder/k.db", "no folder"),
    ("postgresql+psycopg://u:top@secret@127.0.0.1/db", "holds '@'"),
    ("sqlite:///k.db?bogus_option=1", "'bogus_option' are not accepted"),
    ("sqlite:///:memory:", "in-memory"),
    ("sqlite:///k.db?uri=1", "URI filenames"),
    ("postgresql+psycopg://u:topsecret@127.0.0.1:65536/db", "not a port number"),
])
def test_a_bad_database_url_is_a_config_error_naming_the_setting_and_no_password(url, words):
    from kanfarm.config import ConfigError
    from kanfarm.store.url import checked_database_url

    with pytest.raises(ConfigError) as caught:
        checked_database_url(url)
    assert caught.value.field == "KANFARM_DATABASE_URL" and words in str(caught.value)
    assert "topsecret" not in str(caught.value) and "secret@" not in str(caught.value)


def test_the_highest_port_is_a_port(tmp_path):
    from kanfarm.store.url import checked_database_url

    assert checked_database_url("postgresql+psycopg://u@127.0.0.1:65535/db").port == 65535
