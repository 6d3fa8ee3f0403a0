"""Runs a grid on this machine with N local workers: the embedded default, no broker needed.

Workers are separate processes (spawned, so no CUDA context or database connection crosses a
fork) that claim runs from the database exactly as Celery workers do; with one worker a thread
is enough. The parent only watches the database and forwards Ctrl-C as a warm shutdown.
"""
from __future__ import annotations

import functools
import hashlib
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kanfarm.config import ConfigError
from kanfarm.runner import DEFAULT_LEASE_S, work_loop, work_units, worker_name
from kanfarm.status import ENDED
from kanfarm.store import DatabaseFileReplaced, Store, database_errors
from kanfarm.training.host_memory import keep_freed_memory

ACTIVE_SQL = """
SELECT r.id AS run_id, r.dataset, r.model, r.depth, r.max_epochs, MAX(e.epoch) AS epoch
FROM runs r JOIN grid_runs g ON g.run_id = r.id JOIN grids gr ON gr.id = g.grid_id
LEFT JOIN epoch_metrics e ON e.run_id = r.id
WHERE r.status = 'running' AND gr.name = :grid
GROUP BY r.id, r.dataset, r.model, r.depth, r.max_epochs
ORDER BY r.id
"""


class RunsAbandoned(KeyboardInterrupt):
    """A second Ctrl-C: the process stops without waiting for its workers to checkpoint and hand
    their runs back. Those runs stay ``running`` until the next ``run grid`` of this host takes
    them over (``release_dead_holders``) or their lease expires."""


class WorkerCrashed(RuntimeError):
    """A local worker process ended with an error instead of running out of work."""


@dataclass
class Snapshot:
    """What the grid looks like now: counts per status and the epoch of each active run."""

    counts: dict[str, int]
    active: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        return sum(self.counts.get(s, 0) for s in ENDED)


def snapshot(store: Store, grid: str) -> Snapshot:
    return Snapshot(store.status_counts(grid), store.query(ACTIVE_SQL, {"grid": grid}))


@functools.lru_cache(maxsize=1)
def local_suffix() -> str:
    """The suffix of local workers' names: ``:local-`` and a token of this machine's boot and pid
    namespace, so that a pid in a holder's name is known to be one of *this* pid space. Two hosts
    sharing a hostname, or a container with the host's hostname but its own pids, differ in it."""
    parts = []
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(Path(path).read_text().strip() if "boot_id" in path else str(os.stat(path).st_ino))
        except OSError:
            parts.append("")
    return ":local-" + hashlib.sha256("/".join(parts).encode()).hexdigest()[:10]


def _dead_here(worker: str) -> bool:
    """True when ``worker`` names a local worker (``host:pid`` + ``local_suffix()``) of this host,
    boot and pid namespace whose process no longer exists. Anything else (a live process, a
    Celery worker, another machine's or container's worker, a pid reused by another process)
    counts as alive: the run then waits for its lease, as before."""
    host, _, rest = worker.partition(":")
    pid, _, suffix = rest.partition(":")
    if (host != socket.gethostname() or f":{suffix}" != local_suffix() or not pid.isdigit()
            or int(pid) == os.getpid()):
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def release_dead_holders(store: Store, grid: str) -> list[int]:
    """Make the grid's runs held by dead local workers of this machine (a `run grid` killed with
    kill -9) claimable now, instead of when their lease runs out (5 minutes by default). The claim
    that takes them costs an attempt, as any crash does. Runs of an earlier boot, of Celery workers
    or of other machines wait for their lease (``_dead_here``)."""
    return [run_id for run_id, worker in store.holders(grid)
            if worker and _dead_here(worker) and store.expire_lease(run_id, worker)]


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity mask, and a container's CPU quota (cgroup v2
    ``cpu.max``: "quota period", or "max"), not the host's count, which ``os.cpu_count`` gives:
    4 containers each taking every host core would oversubscribe it 4 times."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):  # no cgroup v2 file, or not in this form: no quota known
        pass
    return max(1, cpus)


def watch_parent(parent: int, shutdown: Any, on_death: Callable[[], None] | None = None,
                 poll_s: float = 0.25) -> None:
    """Warm-shut the workers down (``shutdown`` set, then ``on_death``) when the parent (pid
    ``parent``, passed in: it may have died before this child started) dies. kill -9 leaves no one
    to press Ctrl-C: the workers checkpoint, hand their runs back and exit instead of training on
    as orphans. The watch ends when ``shutdown`` is set otherwise."""

    def watch() -> None:
        while not shutdown.is_set():
            if os.getppid() != parent:
                shutdown.set()
                if on_death is not None:
                    on_death()
                return
            time.sleep(poll_s)

    threading.Thread(target=watch, name="kanfarm-parent-watch", daemon=True).start()


def _child(url: str, grid: str, device: str, lease_s: float, shutdown: Any, threads: int,
           max_attempts: int | None, pack_size: int | str = 1, parent: int | None = None,
           reports: Any = None) -> None:
    """A worker process. The errors the parent words as one line (a setting gone bad, the
    database gone) go to ``reports`` as ``(kind, field, text)`` instead of a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into a warm shutdown
    watch_parent(os.getppid() if parent is None else parent, shutdown)
    # a warning (a dataset cache it could not write) as one line, as the parent shows its own
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):  # the user's choice, as with one worker and under Celery
        torch.set_num_threads(threads)
    store = Store(url)
    try:
        work_loop(store, worker_name(local_suffix()), grid=grid, device=device, lease_s=lease_s, shutdown=shutdown,
                  max_attempts=max_attempts, pack_size=pack_size)
    except ConfigError as exc:
        if reports is None:
            raise
        reports.put(("config", exc.field, str(exc)[len(exc.field) + 2:]))
        sys.exit(2)
    except DatabaseFileReplaced as exc:
        if reports is None:
            raise
        reports.put(("replaced", "", str(exc)))
        sys.exit(3)
    except database_errors() as exc:
        if reports is None:
            raise
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]  # the driver's words: no password
        reports.put(("database", "", f"{type(exc).__name__}: {first}"))
        sys.exit(3)
    finally:
        store.dispose()


class _ThreadWorker:
    """The one-worker case: a thread whose end is signalled by an Event.

    ``Thread.join`` is not used because an interrupted join (Ctrl-C) marks the thread as stopped
    on Python < 3.13 while it still runs; the process would then exit mid-epoch."""

    def __init__(self, target: Callable[[], None]):
        self._finished = threading.Event()

        def run() -> None:
            try:
                target()
            finally:
                self._finished.set()

        self._thread = threading.Thread(target=run, name="kanfarm-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.ident is not None and not self._finished.is_set()

    def join(self, timeout: float | None = None) -> None:
        self._finished.wait(timeout)


def _how_it_ended(name: str, code: int) -> str:
    """A worker process's end in words: an error (its traceback is printed above) or a signal
    (SIGKILL prints nothing: the kernel's out-of-memory killer, most often)."""
    if code < 0:
        try:
            signame = signal.Signals(-code).name
        except ValueError:
            signame = f"signal {-code}"
        why = " (out of memory? the kernel's OOM killer sends it)" if signame == "SIGKILL" else ""
        return f"{name} killed by {signame}{why}"
    return f"{name} exited with code {code}, its error printed above"


def _raise_reported(reports: Any) -> None:
    """The first error a worker process reported (``_child``), raised here as one line: a
    setting as the ConfigError it was, the database (gone, or its file replaced) as a
    WorkerCrashed saying so."""
    reported = []
    while not reports.empty():
        reported.append(reports.get())
    for kind, setting, text in reported:
        if kind == "config":
            raise ConfigError(setting, text)
    for kind, _, text in reported:
        if kind == "replaced":
            raise WorkerCrashed(text)
    for _, _, text in reported:
        raise WorkerCrashed(f"database unavailable in a worker process ({text}); run this command again once "
                            "it answers: it takes the runs back")


def run_grid_locally(store: Store, grid: str, *, workers: int = 1, device: str = "cpu",
                     lease_s: float = DEFAULT_LEASE_S, max_attempts: int | None = None,
                     on_poll: Callable[[Snapshot], None] | None = None, poll_s: float = 0.5,
                     pack_size: int | str = 1, on_interrupt: Callable[[], None] | None = None) -> Snapshot:
    """Execute every claimable run of ``grid``; returns the final snapshot. ``pack_size`` > 1 or
    ``"auto"``: compatible runs train together as packs (``kanfarm.packing``). ``on_poll`` sees
    progress (skipped while the database is unreachable: the workers ride that out themselves).

    Ctrl-C (KeyboardInterrupt) sets the shutdown flag and calls ``on_interrupt``: each worker
    checkpoints at its next epoch boundary and puts its run back to ``queued``, then the interrupt
    is re-raised. A second Ctrl-C while waiting raises ``RunsAbandoned`` at once. Running the same
    grid again finishes it, also after a kill -9: runs held by dead processes of this host are
    taken over at once (``release_dead_holders``); runs held elsewhere wait for their lease.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    release_dead_holders(store, grid)
    # a worker with nothing to do still imports torch, and takes its share of the CPU threads
    workers = min(workers, max(1, work_units(store.claimable_runs(grid), pack_size, device)))
    errors: list[BaseException] = []
    if workers == 1:
        shutdown: Any = threading.Event()
        if not os.environ.get("OMP_NUM_THREADS"):  # torch would take every core of the host
            import torch

            torch.set_num_threads(usable_cpus())

        def target() -> None:
            try:
                work_loop(store, worker_name(local_suffix()), grid=grid, device=device, lease_s=lease_s,
                          shutdown=shutdown, max_attempts=max_attempts, pack_size=pack_size)
            except BaseException as exc:  # surfaced in the parent thread below
                errors.append(exc)

        keep_freed_memory()  # before the training thread exists: it must share the main heap
        pool: list[Any] = [_ThreadWorker(target)]
    else:
        ctx = mp.get_context("spawn")
        shutdown = ctx.Event()
        reports = ctx.SimpleQueue()
        threads = max(1, usable_cpus() // workers)
        pool = [ctx.Process(target=_child, args=(store.url_string, grid, device, lease_s, shutdown, threads,
                                                 max_attempts, pack_size, os.getpid(), reports),
                            name=f"kanfarm-worker-{i}")
                for i in range(workers)]
    replaced: DatabaseFileReplaced | None = None
    try:
        for p in pool:
            p.start()
        while any(p.is_alive() for p in pool):
            try:
                store.check_file()
                if on_poll is not None:
                    on_poll(snapshot(store, grid))
            except DatabaseFileReplaced as exc:  # nothing the workers write is kept: stop them now
                replaced = replaced or exc
                shutdown.set()
            except database_errors():  # progress only; the workers pause and carry on
                pass
            for p in pool:
                p.join(timeout=poll_s / len(pool))
    except KeyboardInterrupt:
        try:  # a second Ctrl-C anywhere in here, even before the message is out, abandons the wait
            shutdown.set()
            if on_interrupt is not None:
                on_interrupt()
            for p in pool:
                if p.is_alive():
                    p.join()
        except KeyboardInterrupt:
            shutdown.set()
            raise RunsAbandoned() from None
        raise
    if replaced is not None:
        raise replaced
    if errors:
        raise errors[0]
    if workers > 1:
        _raise_reported(reports)
    crashed = [p for p in pool if isinstance(p, mp.process.BaseProcess) and p.exitcode != 0]
    if crashed:  # an error's traceback went to stderr; its run, if any, waits for its lease
        raise WorkerCrashed("worker processes crashed: " + ", ".join(_how_it_ended(p.name, p.exitcode) for p in crashed)
                            + "; running this command again takes their runs back")
    final = snapshot(store, grid)
    if on_poll is not None:
        on_poll(final)
    return final
