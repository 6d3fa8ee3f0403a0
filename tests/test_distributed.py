"""Distributed execution against the real services: Redis (a dedicated DB number, flushed only
there), PostgreSQL (a database of its own) and real ``celery worker`` subprocesses.

No broker, database or Celery piece is faked: runs are enqueued through the CLI (one by one or
as packs), executed by two worker processes, killed with SIGKILL or stopped with SIGTERM, and
checked against a local run of the same configs on a separate SQLite database.

Unreachable Redis or PostgreSQL: skipped, or failed when ``CI=true``.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from conftest import stored_grids_and_runs

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("KANFARM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
LEASE_S = 4  # short, so a killed worker's run is reclaimable within the test
WAIT_S = 150  # bound on any single wait; nothing here should come near it


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: service tests must run)", pytrace=False)
    pytest.skip(message)


# --- no services needed -------------------------------------------------------------------------

def test_celery_settings_are_crash_safe_and_json_only(monkeypatch):
    from workers.celery_app import make_app

    monkeypatch.setenv("KANFARM_VISIBILITY_TIMEOUT", "7200")
    conf = make_app("redis://127.0.0.1:6379/15").conf
    assert conf.task_serializer == conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.task_ignore_result
    assert conf.result_backend is None
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_pool == "solo"
    assert conf.broker_transport_options["visibility_timeout"] == 7200
    assert {q.name for q in conf.task_queues} == {"gpu", "cpu"}
    monkeypatch.delenv("KANFARM_VISIBILITY_TIMEOUT")
    assert make_app().conf.broker_transport_options["visibility_timeout"] == 12 * 3600


def test_launcher_pins_one_process_per_gpu():
    from workers.launcher import parse_gpus, parse_queues, plan

    specs = plan(parse_gpus("0,1"), parse_queues(None, "gpu"), host="h")
    assert [s.name for s in specs] == ["gpu0-0@h", "gpu1-0@h"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0", "1"]
    assert all(s.env["KANFARM_DEVICE"] == "cuda" and s.queues == ("gpu",) for s in specs)
    argv = specs[0].argv()
    assert argv[argv.index("--pool") + 1] == "solo" and argv[argv.index("--concurrency") + 1] == "1"
    cpu = plan([], parse_queues("cpu,gpu", "cpu"), concurrency=2, host="h")
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in cpu] == ["", ""]  # CPU workers never see a GPU
    assert all(s.env["KANFARM_DEVICE"] == "cpu" and s.queues == ("cpu", "gpu") for s in cpu)
    with pytest.raises(ValueError):
        parse_gpus("0,0")
    with pytest.raises(ValueError):
        parse_queues("tpu", "cpu")


def test_workers_split_the_cores_this_container_may_use(monkeypatch, tmp_path):
    """Not the host's count: four compose CPU workers each with every host core, or GPU workers
    with no cap at all, oversubscribe the machine."""
    import kanfarm.local as local
    from workers.launcher import plan

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(local, "usable_cpus", lambda: 16)
    assert [s.env["OMP_NUM_THREADS"] for s in plan([], ("cpu",), concurrency=4, host="h")] == ["4"] * 4
    assert [s.env["OMP_NUM_THREADS"] for s in plan(["0", "1"], ("gpu",), concurrency=2, host="h")] == ["4"] * 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins
    assert {s.env["OMP_NUM_THREADS"] for s in plan(["0"], ("gpu",), host="h")} == {"3"}
    monkeypatch.undo()
    # A 16-CPU affinity mask, whatever this host has: a quota of 2.5 CPUs is 3 (rounded up) on any host.
    monkeypatch.setattr(local.os, "sched_getaffinity", lambda pid: set(range(16)))
    cpu_max = tmp_path / "cpu.max"
    for text, want in (("250000 100000\n", 3), ("50000 100000", 1), ("max 100000", 16), ("junk", 16),
                       ("4000000 100000", 16)):  # a quota above the mask: the mask
        cpu_max.write_text(text)
        assert local.usable_cpus(cpu_max) == want, text
    assert local.usable_cpus(tmp_path / "absent") == 16


def test_pack_task_claims_no_further_chunk_after_warm_shutdown(sqlite_store, monkeypatch):
    """A GPU worker splits a pack message into chunks that fit its memory. A warm shutdown during
    one chunk must not claim the next ones (each claim costs an attempt, only to release the run
    after its epoch 0): they are re-published, unclaimed, with the released runs."""
    import kanfarm.packing
    import kanfarm.runner
    from kanfarm.grids import parse_spec
    from kanfarm.runner import Outcome
    from kanfarm.submission import submit
    from workers import tasks

    submit(sqlite_store, parse_spec(spec("split", lrs=(0.01, 0.005, 0.002, 0.001, 0.0005), epochs=2)))
    ids = sqlite_store.run_ids("split")
    chunks: list[list[int]] = []
    published: list[tuple[list[list[int]], str]] = []

    def execute_pack(store, run_ids, worker, **kwargs):
        chunks.append(list(run_ids))
        assert kwargs["shutdown"] is tasks.SHUTDOWN
        tasks.SHUTDOWN.set()  # Celery's warm shutdown arrives while this chunk trains
        return [Outcome(run_ids[0], "completed", 2)] + [Outcome(i, "released", 1) for i in run_ids[1:]]

    monkeypatch.setattr(tasks, "store", lambda: sqlite_store)
    monkeypatch.setattr(tasks, "device", lambda: "cuda")
    monkeypatch.setattr(kanfarm.packing, "auto_pack_size", lambda *args, **kwargs: 2)
    monkeypatch.setattr(kanfarm.runner, "execute_pack", execute_pack)
    monkeypatch.setattr(tasks, "publish_packs", lambda packs, queue, app=None, fit=False: published.append(
        ([list(p) for p in packs], queue)) or sum(map(len, packs)))
    try:
        assert tasks.execute_pack_task.run(ids) == "done"
    finally:
        tasks.SHUTDOWN.clear()
    assert chunks == [ids[:2]]  # the chunks that do not fit were never claimed here
    # they went back to the queue before training (packs of the size that fits), and the run
    # released by the shutdown after it
    assert published == [([ids[2:4], ids[4:]], "cpu"), ([ids[1:2]], "cpu")]


def test_pack_task_trained_in_turn_republishes_the_unstarted_chunks_after_warm_shutdown(sqlite_store, monkeypatch):
    """The broker refused the split, so the worker trains the chunks itself; a warm shutdown during
    the first one must re-publish every run not yet started with the released one (a slice that
    skipped the next chunk left its runs queued with no message)."""
    import kanfarm.packing
    import kanfarm.runner
    from kanfarm.grids import parse_spec
    from kanfarm.runner import Outcome
    from kanfarm.submission import submit
    from workers import tasks

    submit(sqlite_store, parse_spec(spec("split-in-turn", lrs=(0.01, 0.005, 0.002, 0.001, 0.0005), epochs=2)))
    ids = sqlite_store.run_ids("split-in-turn")
    chunks: list[list[int]] = []
    published: list[tuple[list[list[int]], str]] = []

    def execute_pack(store, run_ids, worker, **kwargs):
        chunks.append(list(run_ids))
        tasks.SHUTDOWN.set()  # Celery's warm shutdown arrives while this chunk trains
        return [Outcome(run_ids[0], "completed", 2)] + [Outcome(i, "released", 1) for i in run_ids[1:]]

    def refuse_the_split_then_publish(packs, queue, app=None, fit=False):
        if not published and not chunks:  # the split, before any chunk trained: the broker refuses
            raise ConnectionError("broker down")
        published.append(([list(p) for p in packs], queue))
        return sum(map(len, packs))

    monkeypatch.setattr(tasks, "store", lambda: sqlite_store)
    monkeypatch.setattr(tasks, "device", lambda: "cuda")
    monkeypatch.setattr(kanfarm.packing, "auto_pack_size", lambda *args, **kwargs: 2)
    monkeypatch.setattr(kanfarm.runner, "execute_pack", execute_pack)
    monkeypatch.setattr(tasks, "publish_packs", refuse_the_split_then_publish)
    try:
        assert tasks.execute_pack_task.run(ids) == "done"
    finally:
        tasks.SHUTDOWN.clear()
    assert chunks == [ids[:2]]  # no further chunk claimed once stopping
    # the run released by the shutdown, then both chunks never started (ids[2:4] and ids[4:])
    assert published == [([[ids[1], *ids[2:]]], "cpu")]


@pytest.mark.parametrize("why", ["folder", "replaced"])
@pytest.mark.parametrize("packed", [False, True])
def test_a_worker_whose_checkpoint_folder_goes_bad_hands_the_message_back_and_stops(sqlite_store, monkeypatch,
                                                                                  packed, why):
    """Read-only or unmounted after the worker started: it used to take and drop every message of
    the queue (the runs stayed queued with none), or before that fail every run. The same when
    its SQLite file was replaced: every write of its store fails for good (taken for a passing
    outage, the task waited for the database for ever)."""
    import kanfarm.runner
    from kanfarm.grids import parse_spec
    from kanfarm.store import DatabaseFileReplaced
    from kanfarm.submission import submit
    from workers import tasks

    submit(sqlite_store, parse_spec(spec("unfit", lrs=(0.01, 0.005), epochs=2)))
    ids = sqlite_store.run_ids("unfit")
    published, killed = [], []
    if why == "folder":
        monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", "/proc/kanfarm-checkpoints")
    else:
        def replaced(*args, **kwargs):
            raise DatabaseFileReplaced("/data/k.db", deleted=False)
        monkeypatch.setattr(kanfarm.runner, "execute_pack" if packed else "execute_run", replaced)
    monkeypatch.setattr(tasks, "store", lambda: sqlite_store)
    monkeypatch.setattr(tasks, "publish_packs", lambda packs, queue, app=None, fit=False: published.append(
        ([list(p) for p in packs], queue)) or sum(map(len, packs)))
    monkeypatch.setattr(tasks.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    try:
        outcome = tasks.execute_pack_task.run(ids) if packed else tasks.execute_run_task.run(ids[0])
        assert outcome == "worker-unfit" and tasks.SHUTDOWN.is_set()
    finally:
        tasks.SHUTDOWN.clear()
    assert published == [([ids if packed else ids[:1]], "cpu")] and killed == [(os.getpid(), signal.SIGTERM)]
    assert [(sqlite_store.run(i).status, sqlite_store.run(i).attempts) for i in ids] == [("pending", 0)] * 2


def test_a_file_replaced_during_an_outage_wait_hands_the_message_back_and_stops(sqlite_store, monkeypatch):
    """Waiting for the database after an outage, the worker found its SQLite file replaced: the
    task failed (its message acked), leaving the run queued with no message."""
    from kanfarm.store import DatabaseFileReplaced
    from workers import tasks

    published, killed = [], []

    def replaced(run_ids):
        raise DatabaseFileReplaced("/data/k.db", deleted=True)

    monkeypatch.setattr(tasks, "publish_packs", lambda packs, queue, app=None, fit=False: published.append(
        ([list(p) for p in packs], queue)) or sum(map(len, packs)))
    monkeypatch.setattr(tasks, "_hand_back", replaced)
    monkeypatch.setattr(tasks.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    try:
        outcome = tasks._ride_out_outage(tasks.execute_run_task, [7], False, RuntimeError("outage"))
        assert outcome == "worker-unfit" and tasks.SHUTDOWN.is_set()
    finally:
        tasks.SHUTDOWN.clear()
    assert published == [([[7]], "cpu"), ([[7]], "cpu")]  # the copy, then the hand-back's
    assert killed == [(os.getpid(), signal.SIGTERM)]


@pytest.mark.parametrize("task_name,args", [("execute_run_task", (True,)), ("execute_run_task", ("1",)),
                                             ("execute_pack_task", ([1, True],)), ("execute_pack_task", ("1,2",))])
def test_a_malformed_message_is_ignored_and_claims_nothing(sqlite_store, monkeypatch, task_name, args):
    """JSON can carry a bool or a string where a run id belongs (True would be run 1)."""
    from kanfarm.grids import parse_spec
    from kanfarm.submission import submit
    from workers import tasks

    submit(sqlite_store, parse_spec(spec("bad", lrs=(0.01, 0.005), epochs=2)))
    monkeypatch.setattr(tasks, "store", lambda: sqlite_store)
    assert getattr(tasks, task_name).run(*args) == "bad-message"
    assert {sqlite_store.run(i).status for i in sqlite_store.run_ids("bad")} == {"pending"}


def test_a_message_for_a_run_that_does_not_exist_is_done(sqlite_store, monkeypatch):
    from workers import tasks

    monkeypatch.setattr(tasks, "store", lambda: sqlite_store)
    assert tasks.execute_run_task.run(987654) == "not-claimed"
    assert tasks._hand_back([987654]) == []


@pytest.mark.parametrize("task_name,args", [("execute_run_task", (1,)), ("execute_pack_task", ([1, 2],))])
def test_a_released_run_the_broker_refuses_is_named_with_the_remedy(sqlite_store, monkeypatch, caplog,
                                                                     task_name, args):
    """Warm shutdown with Redis down: the released runs are ``queued`` with no message. The worker
    says which and that ``kanfarm requeue`` publishes them, instead of failing with a traceback."""
    import kanfarm.runner
    from kanfarm.runner import Outcome
    from workers import tasks

    def broker_down(*args, **kwargs):
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(tasks, "store", lambda: sqlite_store)
    monkeypatch.setattr(kanfarm.runner, "execute_run", lambda store, run_id, worker, **kw: Outcome(run_id, "released", 1))
    monkeypatch.setattr(kanfarm.runner, "execute_pack",
                        lambda store, ids, worker, **kw: [Outcome(i, "released", 1) for i in ids])
    monkeypatch.setattr(sqlite_store, "run", lambda run_id: type("R", (), {"config": None})())
    monkeypatch.setattr(tasks, "publish_packs", broker_down)
    with caplog.at_level("ERROR", logger=tasks.log.name):
        assert getattr(tasks, task_name).run(*args) in ("released", "done")
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert str(list(args[0]) if isinstance(args[0], list) else [args[0]]) in record.getMessage()
    assert "kanfarm requeue" in record.getMessage()


def _outage(calls: int, error: str = "OperationalError"):
    """A stand-in for a store method that raises a database error ``calls`` times, then works:
    a lost connection, or (``InternalError``) a write on a read-only standby after a failover."""
    from sqlalchemy import exc

    def fail_then(method):
        left = [calls]

        def wrapped(*args, **kwargs):
            if left[0] > 0:
                left[0] -= 1
                raise getattr(exc, error)("UPDATE runs ...", {}, Exception("connection refused"))
            return method(*args, **kwargs)
        return wrapped
    return fail_then


@pytest.mark.parametrize("error", ["OperationalError", "InternalError"])
def test_a_worker_without_its_database_gives_the_message_back_and_waits(sqlite_store, monkeypatch, error):
    """A retry with a countdown is an ETA message that the worker taking it keeps beyond the
    prefetch limit: a worker cut off from its database would gather every message while the others
    idle. It publishes a copy at once, takes nothing more until its database answers (solo pool),
    then hands back the run whose hand-back failed (attempt refunded) and publishes it again."""
    from kanfarm.grids import parse_spec
    from kanfarm.runner import celery_worker_name
    from kanfarm.submission import submit
    from workers import tasks

    submit(sqlite_store, parse_spec(spec("outage", lrs=(0.01, 0.005), epochs=2)))
    mine, other = sqlite_store.run_ids("outage")
    sqlite_store.claim(mine, celery_worker_name(), 600)  # an attempt whose hand-back failed
    events: list = []

    class Retried(Exception):
        pass

    monkeypatch.setattr(tasks, "store", lambda: sqlite_store)
    monkeypatch.setattr(sqlite_store, "claim", _outage(1, error)(sqlite_store.claim))
    monkeypatch.setattr(sqlite_store, "release", _outage(2, error)(sqlite_store.release))
    monkeypatch.setattr(tasks, "publish_packs", lambda packs, queue, app=None, fit=False: events.append(
        ("copy", [list(p) for p in packs], queue, fit)))
    monkeypatch.setattr(tasks.SHUTDOWN, "wait", lambda seconds: events.append(("wait", seconds)))
    monkeypatch.setattr(tasks.execute_run_task, "retry", lambda **kw: events.append(("retry", kw["countdown"]))
                        or Retried())
    with pytest.raises(Retried):
        tasks.execute_run_task.run(mine)
    assert events == [("copy", [[mine]], "cpu", False), ("wait", 5.0), ("wait", 10.0), ("retry", 0)]
    row = sqlite_store.run(mine)
    assert (row.status, row.attempts) == ("queued", 0)

    # Nothing held (the claim itself failed): the copy is all the queue needs; the message is done.
    events.clear()
    monkeypatch.setattr(sqlite_store, "claim", _outage(1)(sqlite_store.claim))
    monkeypatch.setattr(sqlite_store, "run", _outage(1)(sqlite_store.run))
    monkeypatch.setattr(tasks.execute_pack_task, "retry", lambda **kw: events.append(("retry", kw)) or Retried())
    assert tasks.execute_pack_task.run([other, mine], True) == "database-unavailable"
    assert events == [("copy", [[other, mine]], "cpu", True)]
    assert sqlite_store.run(other).status == "pending"  # never claimed


def test_a_worker_stopping_during_an_outage_leaves_a_message(sqlite_store, monkeypatch):
    """Warm shutdown while the database is down: stop waiting; when the copy could not be
    published either (broker trouble), Celery's retry publishes the message instead."""
    from workers import tasks

    class Retried(Exception):
        pass

    def broker_down(*args, **kwargs):
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(tasks, "store", lambda: sqlite_store)
    monkeypatch.setattr(sqlite_store, "claim", _outage(1)(sqlite_store.claim))
    monkeypatch.setattr(sqlite_store, "release", _outage(1)(sqlite_store.release))
    monkeypatch.setattr(tasks, "publish_packs", broker_down)
    monkeypatch.setattr(tasks.SHUTDOWN, "wait", lambda seconds: tasks.SHUTDOWN.set())
    retries = []
    monkeypatch.setattr(tasks.execute_run_task, "retry", lambda **kw: retries.append(kw) or Retried())
    try:
        with pytest.raises(Retried):
            tasks.execute_run_task.run(1)
    finally:
        tasks.SHUTDOWN.clear()
    assert [r["countdown"] for r in retries] == [0]


@pytest.mark.parametrize("task_name", ["execute_run_task", "execute_pack_task"])
def test_a_message_retried_many_times_is_never_dropped(task_name, monkeypatch):
    """Celery reads retry(max_retries=None) as "the task's limit": the tasks themselves must have
    none, or after 5 retries (outages, shutdowns) the message would be acked and its runs left
    queued with nothing to run them."""
    from celery.exceptions import Retry

    from workers import tasks

    task = getattr(tasks, task_name)
    sent = []

    class Signature:
        def apply_async(self):
            sent.append(1)

    monkeypatch.setattr(task, "signature_from_request", lambda *args, **kwargs: Signature())
    task.push_request(retries=100, called_directly=False, is_eager=False)
    try:
        with pytest.raises(Retry):
            task.retry(countdown=0)
    finally:
        task.pop_request()
    assert sent == [1]


def test_a_run_this_worker_could_not_hand_back_is_handed_back_and_retried(sqlite_store, monkeypatch):
    """A database error left the run ``running`` under this process's name (the release failed
    too). With the solo pool no run of this process is live while a task runs, so the next task
    for it hands it back (attempt refunded) and retries at once instead of leaving it to wait out
    its lease; a run held by another worker is that worker's business."""
    from celery.exceptions import Retry

    from kanfarm.grids import parse_spec
    from kanfarm.runner import celery_worker_name
    from kanfarm.submission import submit
    from workers import tasks

    submit(sqlite_store, parse_spec(spec("held", lrs=(0.01, 0.005), epochs=2)))
    mine, theirs = sqlite_store.run_ids("held")
    monkeypatch.setattr(tasks, "store", lambda: sqlite_store)
    monkeypatch.setenv(tasks.LEASE_ENV, "600")
    for task, args in ((tasks.execute_run_task, (mine,)), (tasks.execute_pack_task, ([theirs, mine],))):
        sqlite_store.claim(mine, celery_worker_name(), 600)
        sqlite_store.claim(theirs, "other-host:1:celery", 600)
        countdowns = []
        monkeypatch.setattr(task, "retry", lambda **kw: countdowns.append(kw["countdown"]) or Retry())
        with pytest.raises(Retry):
            task.run(*args)
        assert countdowns == [0]
        assert [sqlite_store.run(i).status for i in (mine, theirs)] == ["queued", "running"]
        assert sqlite_store.run(mine).attempts == 0
        sqlite_store.release(theirs, "other-host:1:celery", refund=True)
    sqlite_store.claim(theirs, "other-host:1:celery", 600)
    assert tasks.execute_run_task.run(theirs) == "not-claimed"
    assert tasks.execute_pack_task.run([theirs]) == "done"
    assert sqlite_store.run(theirs).status == "running"


@pytest.mark.parametrize("fit,expected,published", [(True, [2], [[2, 1]]), (False, [5], [])])
def test_cpu_worker_splits_only_packs_published_to_fit(sqlite_store, monkeypatch, fit, expected, published):
    """``--pack-size auto`` publishes the largest packs for workers to split: a CPU worker trains
    its size and publishes the rest again at once, as packs of that size for idle workers, but
    trains an explicitly sized pack as it came. With the broker down it trains them all in turn."""
    import kanfarm.packing
    import kanfarm.runner
    from kanfarm.grids import parse_spec
    from kanfarm.runner import Outcome
    from kanfarm.submission import submit
    from workers import tasks

    submit(sqlite_store, parse_spec(spec("fit", lrs=(0.01, 0.005, 0.002, 0.001, 0.0005), epochs=2)))
    ids = sqlite_store.run_ids("fit")
    chunks: list[list[int]] = []
    monkeypatch.setattr(tasks, "store", lambda: sqlite_store)
    monkeypatch.setattr(tasks, "device", lambda: "cpu")
    monkeypatch.setattr(kanfarm.packing, "auto_pack_size", lambda *args, **kwargs: 2)
    monkeypatch.setattr(kanfarm.runner, "execute_pack", lambda store, run_ids, worker, **kw: chunks.append(
        list(run_ids)) or [Outcome(i, "completed", 2) for i in run_ids])
    sent: list = []
    monkeypatch.setattr(tasks, "publish_packs", lambda packs, queue, app=None, fit=False: sent.append(
        ([list(p) for p in packs], queue, fit)))
    assert tasks.execute_pack_task.run(ids, fit) == "done"
    assert [len(c) for c in chunks] == expected
    assert [[len(p) for p in packs] for packs, _, _ in sent] == published
    assert sum(chunks, []) + sum((sum(packs, []) for packs, _, _ in sent), []) == ids
    assert all(queue == "cpu" and sent_fit is True for _, queue, sent_fit in sent)

    if fit:  # the broker refuses: every chunk is trained here, one after another
        chunks.clear()
        for run_id in ids:
            sqlite_store.mark_queued([run_id])

        def refuse(*args, **kwargs):
            raise ConnectionError("broker down")
        monkeypatch.setattr(tasks, "publish_packs", refuse)
        assert tasks.execute_pack_task.run(ids, fit) == "done"
        assert [len(c) for c in chunks] == [2, 2, 1] and sum(chunks, []) == ids


def test_auto_packs_are_published_for_workers_to_fit(monkeypatch):
    from workers import tasks

    sent: list[tuple[str, list]] = []

    class FakeApp:
        def producer_or_acquire(self):
            import contextlib
            return contextlib.nullcontext(None)

        def send_task(self, name, args, **kwargs):
            sent.append((name, args))

    assert tasks.publish_packs([[1, 2, 3], [4]], "cpu", FakeApp(), fit=True) == 4
    assert tasks.publish_packs([[5, 6]], "cpu", FakeApp()) == 2
    assert sent == [(tasks.PACK_TASK_NAME, [[1, 2, 3], True]), (tasks.TASK_NAME, [4]),
                    (tasks.PACK_TASK_NAME, [[5, 6]])]


def _kanfarm(monkeypatch, database_url: str, *args: str) -> dict:
    """``kanfarm ARGS --json`` in this process on ``database_url``, where a test fakes publishing."""
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setenv("KANFARM_DATABASE_URL", database_url)
    monkeypatch.setenv("KANFARM_BROKER_URL", REDIS_URL)  # only pinged, or passed over when down
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_enqueue_takes_cancelled_runs_back(sqlite_url, sqlite_store, monkeypatch, tmp_path):
    """``enqueue grid`` after ``cancel``: the cancelled runs go back to queued and are published
    (the dry run counts them too), not left cancelled with the grid reported as enqueued."""
    from kanfarm.grids import parse_spec
    from kanfarm.submission import submit
    from workers import tasks

    data = spec("again", lrs=(0.01, 0.005), epochs=2)
    submit(sqlite_store, parse_spec(data))
    ids = sqlite_store.run_ids("again")
    assert sqlite_store.cancel("again") == (2, 0)
    published: list = []
    monkeypatch.setattr(tasks, "publish_packs", lambda packs, queue, app=None, fit=False: published.append(
        ([list(p) for p in packs], queue)) or sum(map(len, packs)))
    path = spec_file(tmp_path, data)
    assert _kanfarm(monkeypatch, sqlite_url, "enqueue", "grid", path, "--queue", "gpu", "--dry-run")["published"] == 2
    out = _kanfarm(monkeypatch, sqlite_url, "enqueue", "grid", path, "--queue", "gpu")
    assert (out["added"], out["skipped"], out["published"]) == (0, 2, 2)
    assert published == [([[i] for i in ids], "gpu")]
    assert [(sqlite_store.run(i).status, sqlite_store.run(i).queue) for i in ids] == [("queued", "gpu")] * 2


def test_requeue_in_packs_publishes_to_each_queue_only_its_own_runs(sqlite_url, sqlite_store, monkeypatch):
    """``requeue --pack-size 2`` with runs enqueued on gpu and on cpu: each queue gets packs of its
    own runs only, not of every claimable run of the grid (a gpu run reaching a cpu worker, and a
    duplicate message for each run)."""
    from kanfarm.grids import parse_spec
    from kanfarm.submission import submit
    from workers import tasks

    submit(sqlite_store, parse_spec(spec("two-queues", lrs=(0.01, 0.005, 0.002, 0.001), epochs=2)))
    ids = sqlite_store.run_ids("two-queues")
    sqlite_store.mark_queued(ids)
    sqlite_store.assign_queue(ids[:2], "gpu")
    sqlite_store.assign_queue(ids[2:], "cpu")
    published: dict[str, list[list[int]]] = {}
    monkeypatch.setattr(tasks, "publish_packs", lambda packs, queue, app=None, fit=False: published.setdefault(
        queue, []).extend(list(p) for p in packs) or sum(map(len, packs)))
    out = _kanfarm(monkeypatch, sqlite_url, "requeue", "--grid", "two-queues", "--pack-size", "2")
    assert out["published_by_queue"] == {"gpu": 2, "cpu": 2}
    assert published == {"gpu": [ids[:2]], "cpu": [ids[2:]]}


# --- services -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis_db():
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3, socket_timeout=10)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        _unavailable(f"Redis at {REDIS_URL} is unreachable: {type(exc).__name__}")
    client.flushdb()  # this test DB only
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def pg_url(postgres_url):
    """The session's PostgreSQL database, emptied and migrated for this module."""
    from kanfarm.store import Store

    engine = sa.create_engine(postgres_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()
    store = Store(postgres_url)
    store.upgrade()
    store.dispose(close=True)
    return postgres_url


@pytest.fixture(scope="module")
def env(redis_db, pg_url, tmp_path_factory):
    """Environment for workers and CLI calls: test broker, test database, shared checkpoints."""
    base = tmp_path_factory.mktemp("distributed")
    return {**os.environ, "KANFARM_BROKER_URL": REDIS_URL, "KANFARM_DATABASE_URL": pg_url,
            "KANFARM_CHECKPOINT_DIR": str(base / "checkpoints"), "KANFARM_LEASE_SECONDS": str(LEASE_S),
            "KANFARM_MAX_ATTEMPTS": "3", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "KANFARM_TEST_LOGS": str(base)}


@pytest.fixture(scope="module")
def store(pg_url):
    from kanfarm.store import Store

    s = Store(pg_url)
    yield s
    s.dispose(close=True)


class Fleet:
    """Real ``celery worker`` subprocesses (solo pool, queue cpu), with their logs."""

    def __init__(self, env: dict):
        self.env, self.procs, self.logs = env, {}, {}

    def start(self, name: str, queues: str = "cpu") -> subprocess.Popen:
        log = Path(self.env["KANFARM_TEST_LOGS"]) / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "--pool", "solo",
                 "--concurrency", "1", "-Q", queues, "-n", f"{name}@%h", "--loglevel", "INFO",
                 "--without-gossip", "--without-mingle"],
                cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.procs[name], self.logs[name] = proc, log
        return proc

    def wait_ready(self, timeout: float = 90) -> None:
        wait_for(lambda: all(" ready." in self.logs[n].read_text(errors="replace") for n in self.procs),
                 timeout, "workers ready", self)

    def by_pid(self, pid: int) -> str:
        return next(name for name, p in self.procs.items() if p.pid == pid)

    def tail(self) -> str:
        return "\n".join(f"--- {n}\n" + log.read_text(errors="replace")[-3000:] for n, log in self.logs.items())

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def fleet(env):
    workers = Fleet(env)
    workers.start("w1")
    workers.start("w2")
    try:
        workers.wait_ready()
        yield workers
    finally:
        workers.stop()


def wait_for(predicate, timeout: float, what: str, fleet: Fleet | None = None, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{fleet.tail() if fleet else ''}")


def cli(env: dict, *args: str, timeout: float = 120):
    """``python -m cli.main ARGS``; returns parsed JSON when ``--json`` is among them."""
    proc = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"kanfarm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
    return json.loads(proc.stdout) if "--json" in args else proc.stdout


def spec(name: str, lrs=(0.01,), seeds=(0,), epochs: int = 4, batch_size: int = 128) -> dict:
    return {"name": name, "datasets": ["digits"], "models": ["mlp"], "depths": ["shallow"],
            "inits": ["kaiming_normal"], "optimizers": ["adam"], "learning_rates": list(lrs),
            "seeds": list(seeds), "epochs": epochs, "batch_size": batch_size}


def spec_file(tmp_path: Path, data: dict) -> str:
    lines = []
    for key, value in data.items():
        lines.append(f"{key} = {json.dumps(value)}")  # JSON scalars and lists are valid TOML here
    path = tmp_path / f"{data['name']}.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def local_reference(tmp_path: Path, data: dict, monkeypatch, pack_size: int | str = 1) -> dict[str, list[tuple]]:
    """The same grid run by the local runner (packed when ``pack_size`` is not 1) on its own
    SQLite file and checkpoint dir."""
    from kanfarm.grids import parse_spec
    from kanfarm.local import run_grid_locally
    from kanfarm.store import Store
    from kanfarm.submission import submit

    base = tmp_path / f"local-pack-{pack_size}"
    base.mkdir()
    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(base / "checkpoints"))
    local = Store(f"sqlite:///{base / 'local.db'}")
    local.upgrade()
    try:
        submit(local, parse_spec(data))
        with one_torch_thread():
            final = run_grid_locally(local, data["name"], pack_size=pack_size)
        assert final.counts["completed"] == final.total
        return metrics_by_hash(local, data["name"])
    finally:
        local.dispose(close=True)


@contextlib.contextmanager
def one_torch_thread():
    """Train in this process with one torch thread, like the workers: on these tiny models many
    threads only add overhead."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def metrics_by_hash(store, grid: str) -> dict[str, list[tuple]]:
    hashes = {row["id"]: row["config_hash"] for row in store.query("SELECT id, config_hash FROM runs")}
    out: dict[str, list[tuple]] = {}
    for row in store.epoch_metrics(grid=grid):
        out.setdefault(hashes[row["run_id"]], []).append((row["epoch"], row["test_acc"], row["test_loss"]))
    return out


def assert_same_metrics(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for h in want:
        assert [(e, acc) for e, acc, _ in got[h]] == [(e, acc) for e, acc, _ in want[h]], h
        for (_, _, a), (_, _, b) in zip(got[h], want[h]):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-7)


def assert_close_metrics(got: dict, want: dict, tol: float = 1e-5) -> None:
    """Equal epochs, accuracy and loss within ``tol``: a packed run against its solo run."""
    assert got.keys() == want.keys()
    for h in want:
        assert [e for e, _, _ in got[h]] == [e for e, _, _ in want[h]], h
        for (e, acc_a, loss_a), (_, acc_b, loss_b) in zip(got[h], want[h]):
            assert abs(acc_a - acc_b) <= tol and abs(loss_a - loss_b) <= tol, (h, e, acc_a, acc_b, loss_a, loss_b)


def parked_messages(redis_db, queue: str) -> list[tuple[str, list]]:
    """(task name, args) of the messages waiting on ``queue`` (kombu's Redis layout), oldest first."""
    out = []
    for raw in reversed(redis_db.lrange(queue, 0, -1)):  # LPUSH to publish, BRPOP to consume
        message = json.loads(raw)
        assert message["properties"]["body_encoding"] == "base64"
        out.append((message["headers"]["task"], json.loads(base64.b64decode(message["body"]))[0]))
    return out


def deliver(redis_db, source: str, target: str) -> int:
    """Move every waiting message from queue ``source`` to ``target`` unchanged (a late delivery)."""
    moved = 0
    while redis_db.rpoplpush(source, target) is not None:
        moved += 1
    return moved


def finished(store, grid: str, n: int) -> bool:
    counts = store.status_counts(grid)
    return counts["completed"] + counts["diverged"] + counts["failed"] == n


def assert_contiguous_epochs(store, run_id: int, max_epochs: int) -> None:
    epochs = [row["epoch"] for row in store.epoch_metrics(run_id=run_id)]
    assert epochs == list(range(max_epochs + 1))  # unique (primary key) and no gap


@pytest.mark.services
def test_flushed_broker_is_recovered_by_requeue(env, store, fleet, redis_db, tmp_path):
    """Runs queued in the database lose their messages (FLUSHDB): requeue republishes them all.
    They are enqueued on the gpu queue, which no test worker consumes, so they are surely still
    waiting when the broker is flushed."""
    data = spec("flush", lrs=(0.01, 0.001), epochs=3)
    out = cli(env, "enqueue", "grid", spec_file(tmp_path, data), "--queue", "gpu", "--json")
    assert (out["added"], out["published"]) == (2, 2)
    assert redis_db.llen("gpu") == 2
    redis_db.flushdb()
    assert redis_db.llen("gpu") == 0 and store.status_counts("flush")["queued"] == 2
    out = cli(env, "requeue", "--grid", "flush", "--queue", "cpu", "--json")
    assert out["published"] == 2
    wait_for(lambda: finished(store, "flush", 2), WAIT_S, "flushed grid to finish", fleet)
    assert store.status_counts("flush")["completed"] == 2


@pytest.mark.services
def test_a_broker_that_refuses_the_url_stops_enqueue_before_anything_is_written(redis_db, tmp_path):
    """Redis answers, but has no database 99: exit 2 naming the variable, not "broker unreachable"
    after the runs were stored as queued."""
    from kanfarm.store import Store

    db = tmp_path / "k.db"
    environment = {**os.environ, "KANFARM_DATABASE_URL": f"sqlite:///{db}", "PYTHONPATH": str(ROOT),
                   "KANFARM_BROKER_URL": REDIS_URL.rsplit("/", 1)[0] + "/99"}
    Store(environment["KANFARM_DATABASE_URL"]).upgrade()
    for args in (["enqueue", "grid", spec_file(tmp_path, spec("refused"))], ["requeue"], ["worker"]):
        proc = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=environment,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "KANFARM_BROKER_URL: the broker refused the URL: DB index is out of range" in proc.stderr
    assert stored_grids_and_runs(db) == (0, 0)


@pytest.mark.services
def test_enqueue_of_a_changed_spec_warns_and_its_dry_run_counts_what_it_publishes(env, store, redis_db, tmp_path):
    """The grid keeps the cells of its earlier spec, and enqueue publishes them too: the dry run
    must say so, and the real command must warn as grid submit and run grid do."""
    cli(env, "grid", "submit", spec_file(tmp_path, spec("changed", lrs=(0.0211, 0.0212), epochs=2)))
    path = spec_file(tmp_path, spec("changed", lrs=(0.0211,), epochs=2))
    dry = cli(env, "enqueue", "grid", path, "--queue", "gpu", "--dry-run", "--json")
    proc = subprocess.run([sys.executable, "-m", "cli.main", "enqueue", "grid", path, "--queue", "gpu", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert dry["published"] == json.loads(proc.stdout)["published"] == 2
    assert "1 runs that are not cells of this spec" in " ".join(proc.stderr.split())
    redis_db.delete("gpu")


@pytest.mark.services
def test_sweep_publishes_each_stale_run_once_and_leaves_the_others_alone(env, store, redis_db, tmp_path):
    """Runs whose worker died (lease expired, past the grace) go back to their queue once: marked
    queued, they are not stale at the next sweep. Queued runs (they have messages), live ones,
    ones expired only just (a worker cut off briefly hands its run back itself) and ones a local
    `run grid` holds (never enqueued) are left alone."""
    from datetime import timedelta

    from kanfarm.store.schema import utcnow

    cli(env, "enqueue", "grid", spec_file(tmp_path, spec("swept", lrs=(0.0141, 0.0142, 0.0143, 0.0144, 0.0145),
                                                          epochs=2)), "--queue", "gpu", "--json")
    cli(env, "grid", "submit", spec_file(tmp_path, spec("swept-local", lrs=(0.0146,), epochs=2)))
    redis_db.delete("gpu")
    dead_a, dead_b, alive, waiting, just = store.run_ids("swept")
    [local] = store.run_ids("swept-local")
    for run_id, worker in ((dead_a, "dead"), (dead_b, "dead"), (alive, "alive"), (just, "cut-off"), (local, "laptop")):
        assert store.claim(run_id, worker, 600) is not None
    with store.engine.begin() as conn:
        for run_id, ago in ((dead_a, 3600), (dead_b, 3600), (just, 10), (local, 3600)):
            conn.execute(sa.text("UPDATE runs SET lease_expires_at = :t WHERE id = :i"),
                         {"t": utcnow() - timedelta(seconds=ago), "i": run_id})
    out = cli(env, "sweep", "--json")
    assert (out["stale"], out["local"], out["published_by_queue"], out["requeued"]) == (3, 1, {"gpu": 2}, 2)
    assert parked_messages(redis_db, "gpu") == [("kanfarm.execute_run", [dead_a]), ("kanfarm.execute_run", [dead_b])]
    runs = {i: store.run(i) for i in (dead_a, dead_b, alive, waiting, just, local)}
    assert [(runs[i].status, runs[i].attempts) for i in (dead_a, dead_b, alive, waiting, just, local)] == [
        ("queued", 1), ("queued", 1), ("running", 1), ("queued", 0), ("running", 1), ("running", 1)]
    assert cli(env, "sweep", "--grid", "swept", "--json")["published"] == 0 and redis_db.llen("gpu") == 2
    redis_db.delete("gpu")
    with store.engine.begin() as conn:  # the live worker dies too: two stale runs that can share a pack
        conn.execute(sa.text("UPDATE runs SET lease_expires_at = :t WHERE id = :i"),
                     {"t": utcnow() - timedelta(seconds=10), "i": alive})
    out = cli(env, "sweep", "--grid", "swept", "--grace", "0", "--pack-size", "auto", "--json")
    assert out["published_by_queue"] == {"gpu": 2}
    assert parked_messages(redis_db, "gpu") == [("kanfarm.execute_pack", [[alive, just], True])]
    redis_db.delete("gpu")


def test_requeue_stale_leaves_a_run_claimed_meanwhile(sqlite_store):
    from datetime import timedelta

    from kanfarm.config import RunConfig
    from kanfarm.store.schema import utcnow

    sqlite_store.submit_grid("g", {}, [(RunConfig(seed=s), 100, None) for s in (0, 1)])
    first, second = sqlite_store.run_ids("g")
    for run_id in (first, second):
        sqlite_store.claim(run_id, "dead", 600)
    with sqlite_store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE runs SET lease_expires_at = :t"), {"t": utcnow() - timedelta(seconds=5)})
    stale = sqlite_store.stale_runs("g")
    assert stale == [first, second]
    assert sqlite_store.claim(second, "w2", 600) is not None  # a worker took it after the sweep looked
    assert sqlite_store.requeue_stale(stale) == [first]
    assert sqlite_store.run(second).status == "running" and sqlite_store.run(second).worker == "w2"
    assert sqlite_store.stale_runs("g") == [] and sqlite_store.requeue_stale(stale) == []


@pytest.mark.services
def test_requeue_keeps_packs_when_asked(env, store, redis_db, tmp_path):
    """After a flush, requeue --pack-size re-publishes a packed grid as packs, not one run each."""
    path = spec_file(tmp_path, spec("repack", lrs=(0.0311, 0.0312, 0.0313), epochs=2))
    out = cli(env, "enqueue", "grid", path, "--queue", "gpu", "--pack-size", "3", "--json")
    ids = store.run_ids("repack")
    assert out["published"] == 3 and parked_messages(redis_db, "gpu") == [("kanfarm.execute_pack", [ids])]
    redis_db.delete("gpu")
    out = cli(env, "requeue", "--grid", "repack", "--pack-size", "3", "--json")
    assert out["published"] == 3 and parked_messages(redis_db, "gpu") == [("kanfarm.execute_pack", [ids])]
    redis_db.delete("gpu")


@pytest.mark.services
def test_requeue_sends_runs_back_to_the_queue_they_were_enqueued_on(env, store, redis_db, tmp_path):
    """A stale gpu run re-published to cpu would train on a CPU (or wait forever with no cpu worker)."""
    out = cli(env, "enqueue", "grid", spec_file(tmp_path, spec("homes", lrs=(0.0123, 0.0456), epochs=2)),
              "--queue", "gpu", "--json")  # cells of their own: the database is shared by the module
    assert out["published"] == 2 and {store.run(i).queue for i in store.run_ids("homes")} == {"gpu"}
    redis_db.flushdb()
    out = cli(env, "requeue", "--grid", "homes", "--json")
    assert out["published_by_queue"] == {"gpu": 2} and (redis_db.llen("gpu"), redis_db.llen("cpu")) == (2, 0)
    out = cli(env, "requeue", "--grid", "homes", "--queue", "cpu", "--json")  # moved on purpose
    assert out["published_by_queue"] == {"cpu": 2} and {store.run(i).queue for i in store.run_ids("homes")} == {"cpu"}
    redis_db.flushdb()


@pytest.mark.services
def test_two_workers_finish_grid_like_local_run(env, store, fleet, tmp_path, monkeypatch):
    data = spec("e2e", lrs=(0.01, 0.001), seeds=(0, 1), epochs=4)
    path = spec_file(tmp_path, data)
    dry = cli(env, "enqueue", "grid", path, "--dry-run", "--json")
    assert (dry["added"], dry["published"]) == (4, 4) and store.grid("e2e") is None
    out = cli(env, "enqueue", "grid", path, "--json")
    assert (out["added"], out["skipped"], out["published"]) == (4, 0, 4)
    want = local_reference(tmp_path, data, monkeypatch)  # runs while the workers train
    wait_for(lambda: finished(store, "e2e", 4), WAIT_S, "grid e2e to finish", fleet)
    assert store.status_counts("e2e")["completed"] == 4
    assert_same_metrics(metrics_by_hash(store, "e2e"), want)
    runs = [store.run(i) for i in store.run_ids("e2e")]
    assert all(r.attempts == 1 for r in runs)
    assert len({r.worker for r in runs}) == 2  # both workers took part
    for r in runs:
        assert_contiguous_epochs(store, r.id, 4)
    again = cli(env, "enqueue", "grid", path, "--json")  # idempotent: nothing new, nothing to run
    assert (again["added"], again["skipped"], again["published"]) == (0, 4, 0)


@pytest.mark.services
def test_message_delivered_twice_runs_once(env, store, fleet, redis_db):
    from kanfarm.grids import parse_spec
    from kanfarm.submission import submit
    from workers.celery_app import make_app
    from workers.tasks import publish

    submit(store, parse_spec(spec("dup", lrs=(0.003,), epochs=3)))
    [run_id] = store.run_ids("dup")
    store.mark_queued([run_id])
    app = make_app(REDIS_URL)
    assert publish([run_id, run_id], "cpu", celery_app=app) == 2  # both workers get a copy
    wait_for(lambda: finished(store, "dup", 1), WAIT_S, "duplicated run to finish", fleet)
    publish([run_id], "cpu", celery_app=app)  # and a late third copy
    wait_for(lambda: redis_db.llen("cpu") == 0 and redis_db.hlen("unacked") == 0, 60,
             "every copy consumed", fleet)
    run = store.run(run_id)
    assert (run.status, run.attempts) == ("completed", 1)
    assert_contiguous_epochs(store, run_id, 3)


def test_a_malformed_message_is_dropped_and_the_workers_go_on(env, store, fleet, redis_db):
    """JSON that is not [args, kwargs, embed] made Celery's unpacking raise before the task ran:
    the worker died, and died again on the redelivered message at every restart."""
    import uuid

    from kombu import Connection, Producer, Queue

    from kanfarm.grids import parse_spec
    from kanfarm.submission import submit
    from workers.celery_app import make_app
    from workers.tasks import PACK_TASK_NAME, TASK_NAME, publish

    with Connection(REDIS_URL) as conn:
        producer = Producer(conn.channel(), routing_key="cpu")
        for task, body in ((TASK_NAME, "just a string"), (TASK_NAME, [1, 2]), (TASK_NAME, {"a": 1}),
                           (PACK_TASK_NAME, [[1], {}, {}, 4])):
            producer.publish(json.dumps(body), routing_key="cpu", serializer=None, content_type="application/json",
                             content_encoding="utf-8", declare=[Queue("cpu", routing_key="cpu")],
                             headers={"lang": "py", "task": task, "id": str(uuid.uuid4()), "retries": 0})
    submit(store, parse_spec(spec("after-bad", lrs=(0.002,), epochs=2)))
    [run_id] = store.run_ids("after-bad")
    store.mark_queued([run_id])
    publish([run_id], "cpu", celery_app=make_app(REDIS_URL))
    wait_for(lambda: finished(store, "after-bad", 1), WAIT_S, "the run after the bad messages", fleet)
    assert all(proc.poll() is None for proc in fleet.procs.values()), fleet.tail()
    assert "malformed kanfarm.execute_run message" in fleet.tail()


def pack_tasks_done(fleet: Fleet) -> int:
    """Pack tasks the fleet's workers have finished without an error, from their logs."""
    return sum(line.count("kanfarm.execute_pack[") for log in fleet.logs.values()
               for line in log.read_text(errors="replace").splitlines() if " succeeded in " in line)


#: members of a pack may differ in init, optimiser and learning rate (not in seed or shapes)
PACKABLE = {"inits": ["kaiming_normal", "orthogonal"], "optimizers": ["adam", "sgd_momentum"]}


@pytest.mark.services
@pytest.mark.parametrize("pack_size, lrs, sizes, vs_solo", [(3, (0.02, 0.006), [3, 3, 2], True),
                                                       ("auto", (0.03, 0.008), [8], False)])
def test_packed_grid_on_workers_matches_local_runs(env, store, fleet, redis_db, tmp_path, monkeypatch,
                                                   pack_size, lrs, sizes, vs_solo):
    """``enqueue grid --pack-size``: the CLI publishes pack messages (parked on gpu, which no test
    worker consumes, to read them, then delivered to cpu); each pack trains on one worker, every
    run completes once with one row per epoch, equal to the local packed run of the same grid and
    (once: it costs the most) within 1e-5 to the local solo runs. ``auto``: one message for the
    whole grid, marked for workers to split to their size (a CPU worker's 8: one chunk here)."""
    name = f"pack-{pack_size}"
    data = {**spec(name, lrs=lrs, epochs=5), **PACKABLE}  # 8 runs of one pack key
    assert redis_db.llen("gpu") == 0
    out = cli(env, "enqueue", "grid", spec_file(tmp_path, data), "--queue", "gpu", "--pack-size", str(pack_size),
              "--json")
    assert (out["added"], out["skipped"], out["published"]) == (8, 0, 8)
    ids = store.run_ids(name)
    messages = parked_messages(redis_db, "gpu")
    assert [task for task, _ in messages] == ["kanfarm.execute_pack"] * len(sizes)
    packs = [args[0] for _, args in messages]
    assert [len(pack) for pack in packs] == sizes and sorted(sum(packs, [])) == ids
    assert [args[1:] for _, args in messages] == [[True] if pack_size == "auto" else []] * len(sizes)
    assert deliver(redis_db, "gpu", "cpu") == len(sizes)
    packed = local_reference(tmp_path, data, monkeypatch, pack_size=pack_size)  # while the workers train
    solo = local_reference(tmp_path, data, monkeypatch) if vs_solo else None
    wait_for(lambda: finished(store, name, 8), WAIT_S, f"grid {name} to finish", fleet)
    runs = {i: store.run(i) for i in ids}
    assert [(r.status, r.attempts) for r in runs.values()] == [("completed", 1)] * 8
    for pack in packs:
        assert len({runs[i].worker for i in pack}) == 1  # trained together
    for run_id in ids:
        assert_contiguous_epochs(store, run_id, 5)
    got = metrics_by_hash(store, name)
    assert_same_metrics(got, packed)
    if solo is not None:
        assert_close_metrics(got, solo)
    assert redis_db.llen("cpu") == 0


@pytest.mark.services
def test_pack_message_delivered_twice_trains_each_member_once(env, store, fleet, redis_db):
    """Two copies of one pack message reach both idle workers at once: Store.claim_many gives the
    whole pack to one of them, the other claims nothing; a late third copy is a no-op too."""
    from kanfarm.grids import parse_spec
    from kanfarm.submission import submit
    from workers.celery_app import make_app
    from workers.tasks import publish_packs

    submit(store, parse_spec({**spec("dup-pack", lrs=(0.015, 0.007, 0.0035), epochs=3), **PACKABLE}))
    ids = store.run_ids("dup-pack")
    assert len(ids) == 12
    store.mark_queued(ids)
    app = make_app(REDIS_URL)
    done_before = pack_tasks_done(fleet)
    assert publish_packs([ids, ids], "cpu", celery_app=app) == 24
    wait_for(lambda: finished(store, "dup-pack", 12), WAIT_S, "duplicated pack to finish", fleet)
    publish_packs([ids], "cpu", celery_app=app)  # and a late third copy
    wait_for(lambda: pack_tasks_done(fleet) == done_before + 3, 60, "every copy consumed", fleet)
    wait_for(lambda: redis_db.llen("cpu") == 0 and redis_db.hlen("unacked") == 0, 60, "acks", fleet)
    runs = [store.run(i) for i in ids]
    assert [(r.status, r.attempts) for r in runs] == [("completed", 1)] * 12
    assert len({r.worker for r in runs}) == 1  # one claim took the whole pack
    for run_id in ids:
        assert_contiguous_epochs(store, run_id, 3)
        assert [c.epoch for c in store.checkpoints(run_id)][-1] == 3


@pytest.mark.services
def test_pack_with_finished_members_trains_only_the_rest(env, store, fleet, redis_db, tmp_path, monkeypatch):
    """A pack message (from ``enqueue grid --pack-size``) arrives late: meanwhile a local worker
    completed one member and trained another to epoch 2, where it was released (checkpointed).
    The worker trains only the two untouched members and resumes the released one; the finished
    member is left as it was. All equal the solo runs within 1e-5."""
    from kanfarm.runner import execute_run

    data = spec("partial-pack", lrs=(0.025, 0.012, 0.009, 0.004), epochs=4)
    out = cli(env, "enqueue", "grid", spec_file(tmp_path, data), "--queue", "gpu", "--pack-size", "4", "--json")
    assert (out["added"], out["published"]) == (4, 4)
    ids = store.run_ids("partial-pack")
    assert parked_messages(redis_db, "gpu") == [("kanfarm.execute_pack", [ids])]
    done, released, *fresh = ids

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", env["KANFARM_CHECKPOINT_DIR"])  # where the workers look
    stop = threading.Event()
    with one_torch_thread():
        assert execute_run(store, done, "test:local", lease_s=60).status == "completed"
        outcome = execute_run(store, released, "test:local", lease_s=60, shutdown=stop,
                              on_epoch=lambda _, record: record.epoch >= 2 and stop.set())
    assert (outcome.status, outcome.epochs_run) == ("released", 2)
    assert store.run(released).status == "queued"
    done_before, done_rows = store.run(done), store.epoch_metrics(run_id=done)
    released_rows = store.epoch_metrics(run_id=released)
    assert [row["epoch"] for row in released_rows] == [0, 1, 2]

    tasks_before = pack_tasks_done(fleet)
    assert deliver(redis_db, "gpu", "cpu") == 1
    want = local_reference(tmp_path, data, monkeypatch)  # solo runs, while the workers train
    wait_for(lambda: finished(store, "partial-pack", 4), WAIT_S, "the rest of the pack to finish", fleet)
    wait_for(lambda: pack_tasks_done(fleet) == tasks_before + 1, 60, "the pack task to end", fleet)

    assert store.run(done) == done_before and store.epoch_metrics(run_id=done) == done_rows  # untouched
    trained = [store.run(i) for i in [released, *fresh]]
    assert [(r.status, r.attempts) for r in trained] == [("completed", 1)] * 3  # the release gave its attempt back
    assert len({r.worker for r in trained}) == 1 and trained[0].worker != "test:local"
    for run_id in ids:
        assert_contiguous_epochs(store, run_id, 4)
    assert store.epoch_metrics(run_id=released)[:3] == released_rows  # resumed, not restarted
    assert_close_metrics(metrics_by_hash(store, "partial-pack"), want)


@pytest.mark.services
def test_eight_concurrent_workers_claim_each_run_once(pg_url, store, tmp_path, monkeypatch):
    """Eight workers (threads, each with its own engine) are all handed every run id."""
    import random

    import torch

    from kanfarm.grids import parse_spec
    from kanfarm.runner import execute_run
    from kanfarm.store import Store
    from kanfarm.submission import submit

    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "race-checkpoints"))
    submit(store, parse_spec(spec("race", lrs=(0.01, 0.003, 0.001), seeds=(0, 1), epochs=2)))
    ids = store.run_ids("race")
    store.mark_queued(ids)
    outcomes: list[tuple[int, str]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        own = Store(pg_url)
        try:
            order = ids[:]
            random.Random(i).shuffle(order)
            start.wait(timeout=30)
            for run_id in order:
                outcomes.append((run_id, execute_run(own, run_id, f"race-{i}", lease_s=60, max_attempts=3).status))
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            own.dispose(close=True)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pool = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(timeout=WAIT_S)
    finally:
        torch.set_num_threads(threads_before)
    assert not errors and not any(t.is_alive() for t in pool)
    assert len(outcomes) == 8 * len(ids)
    for run_id in ids:
        ran = [status for rid, status in outcomes if rid == run_id and status != "not-claimed"]
        assert ran == ["completed"], run_id  # executed exactly once, by one worker
        assert store.run(run_id).attempts == 1
        assert_contiguous_epochs(store, run_id, 2)


@pytest.mark.services
def test_cancel_stops_queued_and_running_runs(env, store, fleet, redis_db, tmp_path):
    from workers.celery_app import make_app
    from workers.tasks import publish

    data = spec("cancel", lrs=(0.004,), seeds=(0, 1), epochs=400, batch_size=32)
    cli(env, "enqueue", "grid", spec_file(tmp_path, data), "--queue", "gpu", "--json")  # nobody consumes gpu
    first, second = store.run_ids("cancel")
    redis_db.delete("gpu")
    publish([first], "cpu", celery_app=make_app(REDIS_URL))
    wait_for(lambda: len(store.epoch_metrics(run_id=first)) >= 2, WAIT_S, "the first run to train", fleet)
    assert "1 waiting runs cancelled, 1 running" in cli(env, "cancel", "--grid", "cancel")
    assert store.status_counts("cancel")["cancelled"] == 2
    time.sleep(LEASE_S)  # a few heartbeats: the running worker sees the cancel and stops
    publish([second], "cpu", celery_app=make_app(REDIS_URL))  # a message for a cancelled run: no-op
    wait_for(lambda: redis_db.llen("cpu") == 0 and redis_db.hlen("unacked") == 0, 60, "messages consumed", fleet)
    n_first = len(store.epoch_metrics(run_id=first))
    time.sleep(1.0)
    assert len(store.epoch_metrics(run_id=first)) == n_first < 401  # stopped training
    assert store.epoch_metrics(run_id=second) == []
    assert store.status_counts("cancel")["cancelled"] == 2


@pytest.mark.services
def test_requeue_failed_respects_attempts(env, store, fleet):
    from kanfarm.grids import parse_spec
    from kanfarm.submission import submit

    submit(store, parse_spec(spec("failed", lrs=(0.02, 0.03), epochs=2)))
    retry, spent = store.run_ids("failed")
    store.claim(retry, "crashed", 60)
    store.finish(retry, "crashed", "failed", error="boom")
    for _ in range(2):
        store.claim(spent, "crashed", 60)
        store.release(spent, "crashed")
    store.claim(spent, "crashed", 60)
    store.finish(spent, "crashed", "failed", error="out of memory")
    out = cli(env, "requeue", "--grid", "failed", "--failed", "--json")
    assert (out["failed_retried"], out["failed_exhausted"], out["published"]) == (1, 1, 1)
    assert (store.run(retry).queue, store.run(spent).queue) == ("cpu", None)  # noted where it was published
    wait_for(lambda: store.run(retry).status == "completed", WAIT_S, "the retried run", fleet)
    assert store.run(retry).attempts == 2  # the failed attempt still counts towards the bound
    run = store.run(spent)
    assert (run.status, run.attempts, run.error) == ("failed", 3, "out of memory")
    # A larger bound here retries it, but the workers keep theirs (3): said, not only done
    out = cli(env, "requeue", "--grid", "failed", "--failed", "--max-attempts", "5", "--json")
    assert (out["failed_retried"], out["failed_beyond_worker_attempts"]) == (1, 1)


@pytest.mark.services
def test_warm_shutdown_checkpoints_releases_and_republishes(env, store, fleet, redis_db, tmp_path):
    """``kanfarm worker`` gets SIGTERM mid-run: its run is checkpointed, released to queued and
    its message re-published (on gpu, which only that worker consumed); requeue moves it to the
    cpu workers, which resume it."""
    data = spec("warm", lrs=(0.002,), epochs=12, batch_size=8)  # slow epochs: time to stop mid-run
    log = Path(env["KANFARM_TEST_LOGS"]) / "launcher.log"
    with open(log, "wb") as out:
        launcher = subprocess.Popen([sys.executable, "-m", "cli.main", "worker", "--queues", "gpu"],
                                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: " ready." in log.read_text(errors="replace"), 90, "kanfarm worker ready")
        cli(env, "enqueue", "grid", spec_file(tmp_path, data), "--queue", "gpu", "--json")
        [run_id] = store.run_ids("warm")
        wait_for(lambda: len(store.epoch_metrics(run_id=run_id)) >= 2, WAIT_S, "an epoch on the launcher's worker",
                 poll=0.02)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=10)
    run = store.run(run_id)
    assert run.status == "queued", log.read_text(errors="replace")[-3000:]
    stopped_at = max(c.epoch for c in store.checkpoints(run_id))
    assert 1 <= stopped_at < 12
    assert redis_db.llen("gpu") == 1  # the release re-published its run id
    cli(env, "requeue", "--grid", "warm", "--queue", "cpu", "--json")  # moved: it was enqueued on gpu
    wait_for(lambda: finished(store, "warm", 1), WAIT_S, "released run to finish", fleet)
    run = store.run(run_id)
    assert (run.status, run.attempts) == ("completed", 1)  # the warm shutdown gave its attempt back
    assert_contiguous_epochs(store, run_id, 12)
    redis_db.delete("gpu")


@pytest.mark.services
def test_killed_worker_run_resumes_on_other_worker(env, store, fleet, tmp_path, monkeypatch):
    """SIGKILL the worker training a run: once its lease expires, requeue --stale republishes it
    and the other worker resumes from the checkpoint; the result equals an uninterrupted run."""
    epochs = 20  # slow epochs (batch 8) and many: the kill lands mid-run even on a loaded machine
    data = spec("kill", lrs=(0.005,), epochs=epochs, batch_size=8)
    cli(env, "enqueue", "grid", spec_file(tmp_path, data), "--json")
    [run_id] = store.run_ids("kill")
    wait_for(lambda: len(store.epoch_metrics(run_id=run_id)) >= 2, WAIT_S, "a trained epoch", fleet, poll=0.02)
    holder = store.run(run_id).worker
    victim = fleet.by_pid(int(holder.split(":")[-2]))
    fleet.procs[victim].send_signal(signal.SIGKILL)
    fleet.procs[victim].wait(timeout=30)
    before = {row["epoch"]: row for row in store.epoch_metrics(run_id=run_id)}
    saved = max(c.epoch for c in store.checkpoints(run_id))
    assert store.run(run_id).status == "running" and saved < epochs

    wait_for(lambda: store.stale_runs("kill") == [run_id], LEASE_S * 10, "the lease to expire")
    out = cli(env, "requeue", "--grid", "kill", "--stale", "--json")
    assert (out["stale"], out["published"]) == (1, 1)
    wait_for(lambda: finished(store, "kill", 1), WAIT_S, "reclaimed run to finish", fleet)

    run = store.run(run_id)
    assert (run.status, run.attempts) == ("completed", 2) and run.worker != holder
    assert_contiguous_epochs(store, run_id, epochs)
    after = {row["epoch"]: row for row in store.epoch_metrics(run_id=run_id)}
    for epoch in range(saved + 1):  # resumed, not restarted: rows up to the checkpoint untouched
        assert after[epoch]["seconds"] == before[epoch]["seconds"], epoch
    assert_same_metrics(metrics_by_hash(store, "kill"), local_reference(tmp_path, data, monkeypatch))


def test_worker_refuses_gpus_this_machine_lacks(tmp_path, monkeypatch):
    """A cuda worker without its GPU would fail every run it took: refused before anything starts."""
    import torch
    from typer.testing import CliRunner

    import workers.launcher as launcher
    from cli.main import app
    from workers.launcher import check_gpus

    started = []
    monkeypatch.setattr(launcher, "launch", lambda *a, **k: started.append(a) or 0)
    monkeypatch.setenv("KANFARM_DATABASE_URL", f"sqlite:///{tmp_path / 'k.db'}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    result = CliRunner().invoke(app, ["worker", "--gpus", "0"])
    assert result.exit_code == 2 and "--gpus" in result.output and "0 CUDA devices" in result.output
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_gpus(["0", "1"])  # both exist: passes
    result = CliRunner().invoke(app, ["worker", "--gpus", "2"])
    assert result.exit_code == 2 and "no CUDA device 2" in result.output and "2 CUDA devices" in result.output
    assert started == []
    with pytest.raises(ValueError, match="--gpus"):
        check_gpus(["0"], count=0)
    # a shell narrowed to physical GPUs 2 and 3 (a batch scheduler): those ids are the valid ones
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    check_gpus(["2", "3"])
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=2,3"):
        check_gpus(["0"])
    # ... on a machine where CUDA finds none of them (no GPU, or ids that name nothing)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=2,3 names 2 devices, but CUDA finds 0"):
        check_gpus(["2"])


def test_a_celery_worker_with_a_bad_setting_does_not_start(tmp_path):
    """It would take every message and run none (a cuda worker on a machine where CUDA finds no
    device: each run failed); refused at start, exit 2, the messages left for healthy workers."""
    env = {**os.environ, "KANFARM_BROKER_URL": REDIS_URL, "KANFARM_DATABASE_URL": f"sqlite:///{tmp_path / 'k.db'}",
           "KANFARM_DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "--pool", "solo",
                           "-Q", "cpu", "--without-gossip", "--without-mingle"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "bad setting: KANFARM_DEVICE: cuda, but CUDA finds 0 device(s)" in done.stderr
    assert " ready." not in done.stderr + done.stdout


def test_a_worker_device_is_cpu_or_cuda_with_the_gpu_chosen_by_visibility(monkeypatch):
    """cuda:1 would train on device 1 while runs and packs save and restore device 0's random
    state; the launcher pins each worker to one visible GPU instead."""
    import torch

    import workers.tasks as tasks

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for value, ok in (("cpu", True), ("cuda", True), ("cuda:1", False), ("gpu", False)):
        monkeypatch.setenv("KANFARM_DEVICE", value)
        if ok:
            assert tasks.device() == value
        else:
            with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
                tasks.device()


def test_a_celery_workers_database_error_at_start_shows_no_password(monkeypatch, capsys):
    """A driver's message may quote the host part, where an unencoded '@' leaves part of the password."""
    import workers.tasks as tasks

    monkeypatch.setattr(tasks, "_store", None)
    monkeypatch.setenv("KANFARM_DATABASE_URL", "postgresql+psycopg://kanfarm:Sup3rS@cretPW@127.0.0.1:1/kanfarm")
    monkeypatch.setenv("KANFARM_DEVICE", "cpu")
    tasks._warm_up()
    said = capsys.readouterr().err
    assert "database not ready: OperationalError at postgresql+psycopg://kanfarm:***@***" in said
    assert "cretPW" not in said and "Sup3r" not in said
    tasks.store().dispose()


class _ScriptWorker:
    """A stand-in for a Celery worker process: ``python -c script`` with the spec's interface."""

    def __init__(self, name: str, script: str):
        self.name, self.script, self.env = name, script, {}

    def argv(self, loglevel: str = "INFO") -> list[str]:
        return [sys.executable, "-c", self.script]


_CHILD = """
import os, signal, sys, time
from pathlib import Path
log = Path({log!r})
starts = len(log.read_text().split()) if log.exists() else 0
with log.open("a") as f: f.write("start ")
if starts < {crashes}: sys.exit(3)
def on(sig, _):
    with log.open("a") as f: f.write(signal.Signals(sig).name + " ")
    if sig != {ignore}: sys.exit(0)
signal.signal(signal.SIGTERM, on); signal.signal(signal.SIGQUIT, on)
with log.open("a") as f: f.write("ready ")
while True: time.sleep(0.05)
"""


def _launch_and_signal(monkeypatch, tmp_path, crashes: int, signals: list, ignore: str = "None"):
    """Run ``launcher.launch`` on one scripted worker; once it logged ``ready``, send the launcher
    ``signals`` one after another. Returns (exit code, the worker's log)."""
    from workers import launcher

    log = tmp_path / "worker.log"
    monkeypatch.setattr(launcher, "RESTART_DELAY_S", 0.1)
    monkeypatch.setattr(launcher, "MAX_CRASHES", 4)

    def send():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "ready" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.05)
        for sig in signals:
            os.kill(os.getpid(), sig)
            time.sleep(0.5)

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    threading.Thread(target=send, daemon=True).start()
    script = _CHILD.format(log=str(log), crashes=crashes, ignore=ignore)
    code = launcher.launch([_ScriptWorker("w0", script)], poll_s=0.05)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored
    return code, log.read_text().split()


def test_launcher_restarts_a_crashed_worker_then_stops_it_warm(monkeypatch, tmp_path):
    code, log = _launch_and_signal(monkeypatch, tmp_path, crashes=2, signals=[signal.SIGTERM])
    assert (code, log) == (0, ["start", "start", "start", "ready", "SIGTERM"])


def test_a_closed_terminal_stops_the_workers_warm(monkeypatch, tmp_path):
    """SIGHUP (the terminal closed) is forwarded as SIGTERM: the workers, in sessions of their own,
    got no hangup and consumed on as orphans."""
    code, log = _launch_and_signal(monkeypatch, tmp_path, crashes=0, signals=[signal.SIGHUP])
    assert (code, log) == (0, ["start", "ready", "SIGTERM"])


def test_under_nohup_a_hangup_leaves_the_workers_running(monkeypatch, tmp_path):
    """SIGHUP ignored before the launch (nohup) stays ignored while the workers run: they are to
    outlive the terminal."""
    from workers import launcher

    log, seen = tmp_path / "worker.log", []

    def look_then_stop():
        wait_for(lambda: log.exists() and "ready" in log.read_text(), 30, "the worker")
        seen.append(signal.getsignal(signal.SIGHUP))
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        threading.Thread(target=look_then_stop, daemon=True).start()
        code = launcher.launch([_ScriptWorker("w0", _CHILD.format(log=str(log), crashes=0, ignore="None"))],
                               poll_s=0.05)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert code == 0 and seen == [signal.SIG_IGN]


def test_a_celery_worker_shuts_down_warm_when_its_launcher_is_gone(monkeypatch):
    """The launcher killed (SIGKILL forwards nothing): its workers see another parent and stop."""
    import workers.tasks as tasks
    from workers.launcher import LAUNCHER_PID_ENV

    sent, alive = [], threading.Event()
    monkeypatch.setattr(tasks, "SHUTDOWN", alive)
    monkeypatch.setattr(tasks.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setenv(LAUNCHER_PID_ENV, str(os.getppid()))  # alive: nothing happens
    tasks._watch_launcher()
    time.sleep(0.6)
    assert sent == [] and not alive.is_set()
    alive.set()  # ends that watch for good
    shutdown = threading.Event()
    monkeypatch.setattr(tasks, "SHUTDOWN", shutdown)
    monkeypatch.setenv(LAUNCHER_PID_ENV, str(os.getppid() + 1))  # not our parent: it died before we looked
    tasks._watch_launcher()
    wait_for(lambda: sent, 5, "the SIGTERM")
    assert sent == [(os.getpid(), signal.SIGTERM)] and shutdown.is_set()


def test_a_second_ctrl_c_kills_the_workers(monkeypatch, tmp_path):
    """The first Ctrl-C asks for a warm shutdown (SIGTERM), which this worker ignores (a run
    finishing its epoch); the second one kills it. Not SIGQUIT, Celery's cold shutdown: in the
    solo pool it raises NotImplementedError inside the running task, which would fail the run."""
    code, log = _launch_and_signal(monkeypatch, tmp_path, crashes=0, signals=[signal.SIGINT, signal.SIGINT],
                                   ignore="signal.SIGTERM")
    assert (code, log) == (signal.SIGKILL, ["start", "ready", "SIGTERM"])


def test_a_worker_in_a_crash_loop_stays_down(monkeypatch, tmp_path):
    code, log = _launch_and_signal(monkeypatch, tmp_path, crashes=99, signals=[])
    assert (code, log) == (3, ["start"] * 4)


def test_a_stop_signal_during_a_restart_reaches_the_new_worker(monkeypatch, tmp_path):
    """SIGTERM landing while a crashed worker is being started again found it missing from the
    launcher's list: nobody told it to stop, and the launcher waited for it forever."""
    import subprocess as sp

    from workers import launcher

    log = tmp_path / "worker.log"
    script = (f"import sys, time\nfrom pathlib import Path\nlog = Path({str(log)!r})\n"
              "starts = len(log.read_text().split()) if log.exists() else 0\n"
              "log.open('a').write('start ')\n"
              "if starts == 0: sys.exit(3)\n"
              "time.sleep(10)\nlog.open('a').write('ran-out ')\n")
    popen, started = sp.Popen, []

    def popen_during_a_signal(*args, **kwargs):
        started.append(1)
        if len(started) == 2:  # the restart: the stop signal arrives just before the process exists
            os.kill(os.getpid(), signal.SIGTERM)
        return popen(*args, **kwargs)

    monkeypatch.setattr(launcher, "RESTART_DELAY_S", 0.1)
    monkeypatch.setattr(launcher.subprocess, "Popen", popen_during_a_signal)
    code = launcher.launch([_ScriptWorker("w0", script)], poll_s=0.05)
    # killed by that SIGTERM before it could handle it: a clean stop, as it held no run
    assert "ran-out" not in log.read_text() and code == 0


def test_a_stop_signal_while_starting_starts_no_further_worker(monkeypatch, tmp_path):
    import subprocess as sp

    from workers import launcher

    def script(name: str) -> str:
        return (f"from pathlib import Path; import time\nPath({str(tmp_path / name)!r}).write_text('started')\n"
                "time.sleep(10)\n")

    popen = sp.Popen

    def popen_then_a_signal(*args, **kwargs):
        proc = popen(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # Ctrl-C right after the first worker started
        return proc

    monkeypatch.setattr(launcher.subprocess, "Popen", popen_then_a_signal)
    code = launcher.launch([_ScriptWorker("w0", script("w0")), _ScriptWorker("w1", script("w1"))], poll_s=0.05)
    assert code == 0 and not (tmp_path / "w1").exists()


def test_celery_worker_names_differ_between_process_starts():
    """A restarted container keeps its hostname and often its pids: without a token drawn at
    start, the new worker would take the dead one's run back as its own, no attempt counted."""
    import subprocess
    import sys

    from kanfarm.runner import PROCESS_TOKEN, celery_worker_name

    code = "from kanfarm.runner import PROCESS_TOKEN; print(PROCESS_TOKEN)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert len(other) == len(PROCESS_TOKEN) == 8 and other != PROCESS_TOKEN
    assert celery_worker_name().endswith(f":celery-{PROCESS_TOKEN}")
