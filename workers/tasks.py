"""The Celery tasks: "try run N" and "try these runs as a pack", delegated to
:func:`kanfarm.runner.execute_run` and :func:`kanfarm.runner.execute_pack`.

Everything that makes a run crash-safe lives in the runner and the store (atomic claim, lease
heartbeat, checkpoint resume, idempotent epoch rows). This module only adds what a Celery worker
needs around it: settings from the environment, one Store per process, turning Celery's warm
shutdown into the runner's ``shutdown`` event, and re-publishing a run it released so the
release never strands it in ``queued`` without a message.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Iterable

from celery import Task, signals
from celery.exceptions import InvalidTaskError
from celery.utils.log import get_task_logger

from kanfarm.settings import env_number
from kanfarm.store import DatabaseFileReplaced, database_errors
from workers.celery_app import DEFAULT_QUEUE, QUEUES, TASK_NAME, app

log = get_task_logger(__name__)


def malformed_messages_rejected(task, celery_app, consumer, **kwargs):
    """Celery's default task strategy, except that a message body it cannot even take apart (JSON
    that is not ``[args, kwargs, embed]``) is an InvalidTaskError, which the worker logs and drops.
    Celery unpacks the body before our task runs and let the ValueError end the worker, which
    then met the same redelivered message at every restart: one bad message stopped the farm."""
    from celery.worker.strategy import default

    handle = default(task, celery_app, consumer, **kwargs)

    def guarded(message, body, *args, **more):
        try:
            return handle(message, body, *args, **more)
        except (ValueError, TypeError, AttributeError) as exc:
            raise InvalidTaskError(f"malformed {task.name} message: {exc}") from exc
    return guarded


class GuardedTask(Task):
    Strategy = "workers.tasks:malformed_messages_rejected"


DEVICE_ENV = "KANFARM_DEVICE"
LEASE_ENV = "KANFARM_LEASE_SECONDS"
ATTEMPTS_ENV = "KANFARM_MAX_ATTEMPTS"
DEFAULT_MAX_ATTEMPTS = 3

#: set from Celery's warm shutdown; the running run checkpoints at its next epoch and is released.
SHUTDOWN = threading.Event()
_store = None
_store_lock = threading.Lock()


def lease_seconds() -> float:
    from kanfarm.runner import DEFAULT_LEASE_S

    return env_number(LEASE_ENV, DEFAULT_LEASE_S, unit="seconds")


def max_attempts() -> int:
    return env_number(ATTEMPTS_ENV, DEFAULT_MAX_ATTEMPTS, kind=int)


def device() -> str:
    """``cuda`` when the launcher pinned this process to one GPU, else ``cpu``. A cuda device that
    CUDA does not find is refused before a claim: every run taken would fail on it."""
    from kanfarm.config import ConfigError

    value = os.environ.get(DEVICE_ENV, "cpu").strip() or "cpu"
    if value not in ("cpu", "cuda"):  # not cuda:N: the random states of runs and packs are those
        raise ConfigError(DEVICE_ENV, f"{value!r} is not cpu or cuda (choose the GPU with "  # of device 0
                                      f"CUDA_VISIBLE_DEVICES, as `kanfarm worker --gpus` does)")
    if value == "cuda":
        import torch

        if torch.cuda.device_count() == 0:  # asks NVML: no CUDA context is created
            raise ConfigError(DEVICE_ENV, f"cuda, but CUDA finds 0 device(s) "
                                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r})")
    return value


def store():
    """This process's Store (from ``KANFARM_DATABASE_URL``), created on first use."""
    global _store
    with _store_lock:
        if _store is None:
            from kanfarm.store import Store

            _store = Store()
        return _store


@signals.worker_process_init.connect
def _forked_child(**_kwargs) -> None:
    """prefork pool: never reuse the parent's pooled database connections in a child."""
    global _store
    if _store is not None:
        _store.dispose()
    _store = None


@signals.worker_init.connect
def _warm_up(**_kwargs) -> None:
    """Import torch and the trainer before the worker says ready, not inside the first run, and
    say early when the database is unreachable or not migrated. Never initialises CUDA."""
    import kanfarm.runner  # noqa: F401
    import kanfarm.training.loop  # noqa: F401
    from kanfarm.run_environment import check_run_environment

    try:  # `kanfarm worker` refuses to start on these, and so does a worker started by `celery`:
        check_run_environment()  # it would take every message and run none
        lease_seconds(), max_attempts(), device()
    except ValueError as exc:
        _say_at_start(f"bad setting: {exc}; not starting")
        raise SystemExit(2) from None  # not an Exception: Celery's signal dispatch lets it through
    _watch_launcher()
    try:
        store().check_schema()
    except Exception as exc:  # the worker still starts: it waits out an outage in its tasks
        from kanfarm.store import SchemaOutOfDate
        from kanfarm.store.engine import database_url, masked

        # a driver's message can quote the URL, password included: only the type and the masked URL
        why = str(exc) if isinstance(exc, SchemaOutOfDate) else f"{type(exc).__name__} at {masked(database_url())}"
        _say_at_start(f"database not ready: {why}")


def _watch_launcher() -> None:
    """Started by ``kanfarm worker``: a warm shutdown (SIGTERM to itself, as the launcher would
    send) once the launcher is gone, killed or its terminal closed."""
    from kanfarm.local import watch_parent
    from workers.launcher import LAUNCHER_PID_ENV

    parent = os.environ.get(LAUNCHER_PID_ENV, "")
    if parent.isascii() and parent.isdigit():
        watch_parent(int(parent), SHUTDOWN, on_death=lambda: os.kill(os.getpid(), signal.SIGTERM))


def _say_at_start(message: str) -> None:
    """Log and print to stderr: at worker_init Celery has not set up its logging yet, and its
    loggers would swallow the line."""
    log.error(message)
    print(f"kanfarm worker: error: {message}", file=sys.stderr, flush=True)


@signals.worker_shutting_down.connect
def _warm_shutdown(**_kwargs) -> None:
    SHUTDOWN.set()


def publish(run_ids: Iterable[int], queue: str = DEFAULT_QUEUE, celery_app=None) -> int:
    """One message per run id on ``queue``, over one broker connection. Returns the count."""
    return publish_packs([[run_id] for run_id in run_ids], queue, celery_app)


#: the pack task: "try runs [a, b, ...] together" (``kanfarm.runner.execute_pack``).
PACK_TASK_NAME = "kanfarm.execute_pack"


def publish_packs(packs: Iterable[list[int]], queue: str = DEFAULT_QUEUE, celery_app=None, fit: bool = False) -> int:
    """One message per pack (a pack of one is a plain run message). Returns the runs published.

    ``fit`` (``--pack-size auto``): the worker splits the pack to what suits its device, on a CPU
    too; without it a CPU worker trains the pack as published (a GPU one never exceeds its memory)."""
    if queue not in QUEUES:
        raise ValueError(f"queue {queue!r} is not one of {', '.join(QUEUES)}")
    celery_app = celery_app or app
    count = 0
    with celery_app.producer_or_acquire() as producer:
        for pack in packs:
            ids = [int(i) for i in pack]
            name, args = (TASK_NAME, [ids[0]]) if len(ids) == 1 else (PACK_TASK_NAME, [ids, True] if fit else [ids])
            celery_app.send_task(name, args=args, queue=queue, routing_key=queue, producer=producer,
                                 ignore_result=True)
            count += len(ids)
    return count


def _hand_back(run_ids: list[int]) -> list[int]:
    """Release (attempt refunded) the runs of ``run_ids`` still ``running`` under this process's
    name, and return them: a database error kept an earlier try of this task from handing them
    back. With the solo pool no run of this process is live while a task runs, so such a run is a
    leftover, and without this it would wait out its lease."""
    from kanfarm.runner import celery_worker_name

    me = celery_worker_name()
    return [run_id for run_id in run_ids if store().release(run_id, me, refund=True)]


def _queue_of(task) -> str:
    """The queue this task's message came from (the default when Celery does not say)."""
    queue = (task.request.delivery_info or {}).get("routing_key") or DEFAULT_QUEUE
    return queue if queue in QUEUES else DEFAULT_QUEUE


def _ride_out_outage(task, run_ids: list[int], fit: bool, exc: Exception) -> str:
    """This worker lost its database (others may still reach theirs).

    A retry with a countdown would go back as an ETA message, which Celery keeps in the memory of
    whichever worker takes it, beyond the prefetch limit: a worker without its database would
    gather every message and sit on them while healthy workers idle. Instead a copy goes back to
    the queue at once, for any worker, and this one waits here (solo pool: it takes no message
    while a task runs) until its database answers. Then it hands back the runs it still holds
    (their hand-back failed during the outage) and publishes them again. A duplicate message is
    harmless: its claim fails."""
    log.warning("runs %s: database unavailable (%s); a copy of the message goes back to the queue and "
                "this worker waits for its database", run_ids, type(exc).__name__)
    try:
        publish_packs([run_ids], _queue_of(task), task.app, fit=fit)
        copied = True
    except Exception as publish_error:  # the broker too: Celery's own retry publishes below
        log.warning("could not publish a copy (%s)", type(publish_error).__name__)
        copied = False
    try:
        handed_back = _hand_back_when_reachable(run_ids)
    except DatabaseFileReplaced as replaced:  # no outage to wait out: this worker's store is gone for good
        return _unfit(task, run_ids, fit, replaced)
    if not copied or handed_back:
        raise task.retry(countdown=0, exc=exc)
    return "database-unavailable"


def _unfit(task, run_ids: list[int], fit: bool, exc: Exception) -> str:
    """A setting of this worker went bad (its checkpoint folder cannot be written any more, its
    disk is full, its GPU is gone, its SQLite file was replaced): neither the runs nor the other
    workers are at fault. The message goes back to the queue and this worker stops (warm), rather
    than taking and dropping every message of the queue while the runs wait ``queued`` with none."""
    log.error("runs %s: this worker cannot run them (%s); their message goes back to the queue and the "
              "worker stops", run_ids, exc)
    _publish_released(task, run_ids, fit)
    SHUTDOWN.set()
    os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown: it takes no further message
    return "worker-unfit"


def _publish_released(task, run_ids: list[int], fit: bool) -> None:
    """Publish again the runs this task released (warm shutdown) or left unclaimed, so another
    worker resumes them. With the broker down too, they stay ``queued`` in the database with no
    message: say so, naming them and the remedy, rather than failing the task with a traceback."""
    queue = _queue_of(task)
    try:
        publish_packs([run_ids], queue, task.app, fit=fit)
    except Exception as exc:
        log.error("runs %s are queued but could not be re-published to %s (%s): run `kanfarm requeue` "
                  "once the broker answers", run_ids, queue, type(exc).__name__)
        return
    log.info("runs %s released or left unclaimed, re-published to %s", run_ids, queue)


def _hand_back_when_reachable(run_ids: list[int]) -> list[int]:
    """Wait until the database answers (probing every 5 s, doubling to a minute), then release
    the runs of ``run_ids`` that this process still holds, attempt refunded; returns those. On a
    warm shutdown it stops waiting and returns none (their leases expire; see docs/distributed.md)."""
    delay, waited = 5.0, 0.0
    while not SHUTDOWN.is_set():
        try:
            return _hand_back(run_ids)
        except database_errors() as exc:
            log.warning("database still unavailable after %.0f s (%s); this worker takes no message until "
                        "it answers", waited, type(exc).__name__)
        SHUTDOWN.wait(delay)
        waited, delay = waited + delay, min(2 * delay, 60.0)
    return []


# max_retries=None: no retry limit (retry(max_retries=None) would mean the task's own limit); a
# limit would drop the message and leave its runs queued with nothing to run them.
@app.task(name=PACK_TASK_NAME, base=GuardedTask, bind=True, ignore_result=True, acks_late=True, max_retries=None)
def execute_pack_task(self, run_ids: list[int], fit: bool = False) -> str:
    """Claim the claimable runs of ``run_ids`` and train them as a pack sized for this worker's
    device: on a GPU at most what fits its free memory, on a CPU its ``auto`` size (at most 8) when
    ``fit`` (published by ``--pack-size auto``); taken or finished runs are skipped. What does not
    fit goes back to the queue at once as packs of that size, for idle workers (it used to wait
    here, chunk after chunk); only if the broker refuses them are they trained here in turn."""
    from kanfarm.config import ConfigError
    from kanfarm.runner import celery_worker_name, execute_pack, fitting_pack_size

    if not isinstance(run_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in run_ids):
        log.error("ignoring pack message %r: not a list of run ids", run_ids)
        return "bad-message"
    if SHUTDOWN.is_set():
        self.retry(countdown=0)
    released: list[int] = []
    skipped: list[int] = []
    try:
        config = store().run(run_ids[0]).config
        size = len(run_ids)  # as enqueued; on a GPU at most what fits in its free memory
        if fit is True or device() != "cpu":
            size = min(size, fitting_pack_size(config, device()))
        if size < len(run_ids):
            rest = [run_ids[i:i + size] for i in range(size, len(run_ids), size)]
            try:
                publish_packs(rest, _queue_of(self), self.app, fit=fit is True)
                log.info("pack: runs %s do not fit here; published again as %d packs", run_ids[size:], len(rest))
                run_ids = run_ids[:size]
            except Exception as publish_error:
                log.warning("pack: could not publish the runs that do not fit (%s); training them here in turn",
                            type(publish_error).__name__)
        for start in range(0, len(run_ids), size):
            if SHUTDOWN.is_set():  # stopping: claim no further chunk (a claim costs an attempt);
                released += run_ids[start:]  # its runs stay unclaimed and are re-published below
                break
            outcomes = execute_pack(store(), run_ids[start:start + size], celery_worker_name(), device=device(),
                                    lease_s=lease_seconds(), shutdown=SHUTDOWN, max_attempts=max_attempts())
            released += [o.run_id for o in outcomes if o.status == "released"]
            skipped += [o.run_id for o in outcomes if o.status == "not-claimed"]
        if skipped and _hand_back(skipped):
            raise self.retry(countdown=0)
    except database_errors() as exc:
        return _ride_out_outage(self, run_ids, fit is True, exc)
    except (ConfigError, DatabaseFileReplaced) as exc:  # a setting (before a claim, or a full disk: the
        # runs it held went back), or the SQLite file replaced: all go back to the queue, the worker stops
        return _unfit(self, run_ids, fit is True, exc)
    if released:
        _publish_released(self, released, fit is True)
    return "done"


@app.task(name=TASK_NAME, base=GuardedTask, bind=True, ignore_result=True, acks_late=True, max_retries=None)
def execute_run_task(self, run_id: int) -> str:
    """Claim and train run ``run_id``; a failed claim (taken, finished, cancelled) is a no-op."""
    from kanfarm.config import ConfigError
    from kanfarm.runner import celery_worker_name, execute_run

    if isinstance(run_id, bool) or not isinstance(run_id, int):
        log.error("ignoring message with run id %r: not an integer", run_id)
        return "bad-message"
    if SHUTDOWN.is_set():  # delivered while stopping: leave it to the next worker
        self.retry(countdown=0)
    try:
        outcome = execute_run(store(), run_id, celery_worker_name(), device=device(),
                              lease_s=lease_seconds(), shutdown=SHUTDOWN, max_attempts=max_attempts())
        if outcome.status == "not-claimed" and _hand_back([run_id]):
            raise self.retry(countdown=0)
    except database_errors() as exc:
        return _ride_out_outage(self, [run_id], False, exc)
    except (ConfigError, DatabaseFileReplaced) as exc:  # before the claim, or a full disk (the run went
        # back to queued), or the SQLite file replaced: the message goes back, the worker stops
        return _unfit(self, [run_id], False, exc)
    if outcome.status == "released":
        _publish_released(self, [run_id], False)
    else:
        log.info("run %s: %s after %s epochs", run_id, outcome.status, outcome.epochs_run)
    return outcome.status
