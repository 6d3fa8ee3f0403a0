"""Executes stored runs: connects the trainer to its checkpoints and to the store.

``execute_run`` (one run) and ``execute_pack`` (runs trained as one stacked model) are the code
paths for runs, whether a local worker or a Celery task calls them: claim atomically (a lost
claim is a no-op), keep the lease alive from a heartbeat thread while training, resume from the
newest good checkpoint, write each epoch idempotently, finish. ``_ClaimedRun`` is what both share.
What a run needs of its machine, and which errors are the machine's: :mod:`kanfarm.run_environment`.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Callable, Iterator

from kanfarm.config import ConfigError, RunConfig
from kanfarm.data import DatasetFormatError, DatasetUnavailable, data_dir, load_dataset
from kanfarm.data.dataset import Dataset
from kanfarm.run_environment import (check_checkpoints_writable, checkpoint_interval, checkpoint_root,
                                     checkpoint_settings, environment_fault, stall_seconds)
from kanfarm.store import LeaseLost, Store
from kanfarm.store.errors import DatabaseFileReplaced, database_unavailable
from kanfarm.store.rows import RunRow
from kanfarm.training import CheckpointManager, EpochRecord, RunResult, train
from kanfarm.training.host_memory import keep_freed_memory

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 300.0
#: see ``run_environment.STALL_S`` and ``_Heartbeat``
STALL_FACTOR = 10.0
#: a heartbeat this much later than its time means the process stood still (see ``_Progress``)
LATE_S = 1.0


def worker_name(suffix: str = "") -> str:
    return f"{socket.gethostname()}:{os.getpid()}{suffix}"


#: drawn once per process start: a restarted container keeps its hostname and often its pids, and
#: a worker named as the dead one would take that one's run back as its own (no attempt counted)
PROCESS_TOKEN = os.urandom(4).hex()


def celery_worker_name() -> str:
    """``host:pid:celery-<token>``: unique to this process, also across container restarts."""
    return worker_name(f":celery-{PROCESS_TOKEN}")


def _dataset(config: RunConfig) -> Dataset:
    """Loaded once per process per (dataset, options, data folder): a worker runs many cells of
    the same dataset; runs with other dataset options (an imdb vocabulary size) get their own."""
    return _load(config.dataset, tuple(sorted(config.dataset_options.items())), str(data_dir()))


@functools.lru_cache(maxsize=4)
def _load(name: str, options: tuple[tuple[str, int], ...], folder: str) -> Dataset:
    return load_dataset(name, data_dir=folder, **dict(options))


class _Progress:
    """When training last moved: the time of the last epoch row written by a run, or by any
    member of its pack (a hang stops them all, and a member waiting for another part of its pack
    is not hung). The heartbeats of the run or pack ask it whether they should give up.

    Stalled: no row for ``stall_s`` seconds and for ``STALL_FACTOR`` times the longest gap
    between two rows of one run in this attempt; before such a gap is known (the first training
    epoch after epoch 0 or a resume), for ``STALL_FACTOR`` times ``stall_s``. The same generous
    limit holds before the first row, counted from the claim (loading or downloading a large
    dataset, reading a checkpoint, compiling), and again from when every run that wrote a row
    has ended (the next part of a pack, resumed elsewhere, starts). Time the whole process
    stood still (SIGSTOP, Ctrl-Z, a suspended VM) is not waiting: a heartbeat that wakes over
    ``LATE_S`` after its time reports how late it is, and the rows before move on by that much
    (a pause that began during a heartbeat's wait counts for what of it came before the wait's
    end: at most an interval, a third of the lease)."""

    def __init__(self, stall_s: float):
        self.stall_s = stall_s
        self._lock = threading.Lock()
        self._at = time.monotonic()  # the last row, of any run (or the start of the wait for one)
        self._last: dict[int, float] = {}  # each run's last row
        self._longest: float | None = None
        self._still_until = float("-inf")  # the end of the last standstill accounted for

    def written(self, run_id: int) -> None:
        with self._lock:
            now = time.monotonic()
            if run_id in self._last:
                self._longest = max(self._longest or 0.0, now - self._last[run_id])
            self._last[run_id] = self._at = now

    def ended(self, run_id: int) -> None:
        with self._lock:
            self._last.pop(run_id, None)
            if not self._last:  # whatever trains next starts afresh
                self._at, self._longest = time.monotonic(), None

    def stood_still(self, start: float, end: float) -> None:
        """The process did not run from ``start`` to ``end`` (monotonic seconds); told by each
        heartbeat that saw it, counted once."""
        with self._lock:
            start = max(start, self._still_until)
            if end <= start:
                return
            self._still_until = end
            lost = end - start
            if self._at <= start:
                self._at += lost
            self._last = {run_id: at + lost if at <= start else at for run_id, at in self._last.items()}

    def stalled(self) -> float | None:
        """Seconds since the last row when past the limit, else None."""
        with self._lock:
            if not self.stall_s:
                return None
            waited = time.monotonic() - self._at
            longest = self.stall_s if self._longest is None else self._longest
            return waited if waited > max(self.stall_s, STALL_FACTOR * longest) else None


class _Heartbeat(threading.Thread):
    """Extends the run's lease every ``interval`` seconds; notes when the run is cancelled (it
    stops at the epoch boundary, that epoch and a checkpoint written) or lost to another worker.

    A beat only says the process lives, not that its training moves: a worker hung in a CUDA
    call or on a dead file system would hold the run for good. So when its ``progress`` says
    training stalled, the heartbeat gives up: it ends the lease (the next claim or ``kanfarm
    sweep`` takes the run) and the run stops if it ever wakes up."""

    def __init__(self, store: Store, run_id: int, worker: str, lease_s: float, progress: _Progress):
        super().__init__(daemon=True, name=f"heartbeat-{run_id}")
        self.store, self.run_id, self.worker, self.lease_s = store, run_id, worker, lease_s
        self.interval = max(0.05, lease_s / 3)
        self.progress = progress
        self.lost = threading.Event()
        self.cancelled = threading.Event()
        self._done = threading.Event()

    def beat(self) -> bool:
        """Extend the lease; False (and ``cancelled`` or ``lost`` set) when the run no longer runs."""
        if self.store.heartbeat(self.run_id, self.worker, self.lease_s):
            return True
        (self.cancelled if self.store.cancelled_while_held(self.run_id, self.worker) else self.lost).set()
        return False

    def run(self) -> None:
        while True:
            asleep = time.monotonic()
            if self._done.wait(self.interval):
                return
            woke = time.monotonic()
            if woke - asleep - self.interval > LATE_S:
                self.progress.stood_still(asleep + self.interval, woke)
            try:
                if (waited := self.progress.stalled()) is not None:
                    self._give_up(waited)
                    return
                if not self.beat():
                    return
            except Exception as exc:  # a database hiccup is not a lost lease; the next beat retries
                log.warning("heartbeat for run %s failed: %s", self.run_id, exc)

    def _give_up(self, waited: float) -> None:
        self.lost.set()
        log.error("run %s: no epoch written for %.0f s (past KANFARM_STALL_SECONDS=%g and %gx its longest gap "
                  "between epochs, or that limit before a gap is known): taken for hung, its lease ended so that "
                  "another worker takes it; this process stops the run if it wakes up, but cannot interrupt a hung "
                  "call: restart it", self.run_id, waited, self.progress.stall_s, STALL_FACTOR)
        try:
            self.store.expire_lease(self.run_id, self.worker)
        except Exception as exc:  # no beat follows: the lease runs out by itself
            log.warning("run %s: lease not ended (%s); it expires within %.0f s", self.run_id, exc, self.lease_s)

    def stop(self) -> None:
        self._done.set()
        self.progress.ended(self.run_id)


@dataclass
class Outcome:
    run_id: int
    status: str  # completed, diverged, failed, stopped, released, not-claimed
    epochs_run: int = 0


class _ClaimedRun:
    """One claimed run's wiring to the store: lease heartbeat, epoch sink, checkpoints, and how
    it is settled at the end. Shared by single runs and pack members."""

    def __init__(self, store: Store, run: RunRow, worker: str, lease_s: float,
                 shutdown: threading.Event | None, on_epoch: Callable[[int, EpochRecord], None] | None,
                 checkpoint_interval_s: float, progress: _Progress | None = None):
        """``progress``: shared by the members of a pack; a run of its own gets its own."""
        self.store, self.run, self.worker = store, run, worker
        self.shutdown, self.on_epoch = shutdown, on_epoch
        self.rows: _EpochRows | None = None  # a pack member's: see sink
        #: the last epoch of this attempt's trajectory: its resume checkpoint, then each row it wrote
        self.reached: int | None = None
        every, keep = checkpoint_settings()
        self.beat = _Heartbeat(store, run.id, worker, lease_s, progress or _Progress(stall_seconds()))
        self.checkpoints = CheckpointManager(
            checkpoint_root() / run.config_hash, run.config_hash, min_interval_s=checkpoint_interval_s,
            every=every, keep=keep, on_save=self._record_checkpoint, allowed=self._still_held,
            usable=self._recorded)
        self._say_where_checkpoints_went()
        self.beat.start()

    def _say_where_checkpoints_went(self) -> None:
        """A run resumed from another folder (another working folder, another
        ``KANFARM_CHECKPOINT_DIR``) finds none of its checkpoints and starts again from epoch 0:
        say where the store recorded them, rather than retrain silently."""
        if self.checkpoints.paths():
            return
        here = os.path.abspath(self.checkpoints.directory)
        elsewhere = sorted({os.path.dirname(os.path.abspath(c.path)) for c in self.store.checkpoints(self.run.id)}
                           - {here})
        if elsewhere:
            log.warning("run %s: its checkpoints were written to %s, none is in %s: it starts again from epoch 0 "
                        "(stop it and set KANFARM_CHECKPOINT_DIR to resume from them)", self.run.id,
                        ", ".join(elsewhere), here)

    def _recorded(self, epoch: int, digest: str) -> bool:
        """A checkpoint resumes only if the store recorded it, with this digest, and holds the
        run's epoch rows 0..epoch. Checkpoint folders are named by config, so a new database (or
        another study sharing the folder) finds checkpoints whose rows it never got, and resuming
        would skip writing them; and a worker that lost the run between its lease check and its
        write leaves a file whose record the store refused (an epoch the new holder may never
        have trained, or trained otherwise)."""
        if not any(c.epoch == epoch and c.sha256 == digest for c in self.store.checkpoints(self.run.id)):
            return False
        written = {row["epoch"] for row in self.store.epoch_metrics(self.run.id)}
        return written >= set(range(epoch + 1))

    def _still_held(self) -> bool:
        """Asked before each checkpoint write: renew the lease, which fails once another worker
        has taken the run (its checkpoint folder is then theirs). A cancelled run still writes its
        stop checkpoint while it stays cancelled under this worker's name; taken back meanwhile
        (``enqueue grid``, ``run grid``), it may be another worker's already."""
        if self.beat.lost.is_set():
            return False
        if self.beat.cancelled.is_set():
            held = self.store.cancelled_while_held(self.run.id, self.worker)
        else:
            held = self.beat.beat() or self.beat.cancelled.is_set()
        if not held:
            self.beat.lost.set()
            log.warning("run %s: no longer held by this worker (taken back, or its lease lapsed and another "
                        "worker took it); no checkpoint written, stopping", self.run.id)
        return held

    def _record_checkpoint(self, epoch: int, path: Path, digest: str) -> bool:
        """Record the checkpoint under this worker's lease; False (and the run stops) when the
        run is another worker's: the file is then never resumed from, and removes none of theirs."""
        self._reach(epoch)
        try:
            self.store.record_checkpoint(self.run.id, epoch, str(path), digest, worker=self.worker,
                                         kept=self.checkpoints.retained(epoch))
        except LeaseLost:
            log.warning("run %s: lease lost, checkpoint of epoch %s not recorded; stopping", self.run.id, epoch)
            self.beat.lost.set()
            return False
        return True

    def sink(self, record: EpochRecord) -> None:
        """Write the row only while this worker holds the run: a worker whose lease lapsed (a long
        pause) and whose run another worker took over writes nothing and stops at the next epoch.
        A pack member's row waits in its pack's ``rows`` for the epoch's one transaction."""
        if self.rows is not None:
            self.rows.add(self.run.id, record)
            return
        try:
            if self.store.write_epoch(self.run.id, record, worker=self.worker):
                self.beat.cancelled.set()  # written; the run stops before its next epoch
        except LeaseLost as exc:
            self.lost(record.epoch, exc)
            return
        self.written(record)

    def epoch_end(self) -> None:
        """A pack member: write the pack's rows (the first member to get here), then settle its own."""
        self.rows.flush()
        if self.run.id in self.rows.errors:  # with the write's own traceback, not grown by each member
            exc, traceback_ = self.rows.errors.pop(self.run.id)
            raise exc.with_traceback(traceback_)
        if self.run.id in self.rows.done:
            record, lost, cancelled = self.rows.done.pop(self.run.id)
            if lost:
                self.lost(record.epoch)
            else:
                if cancelled:
                    self.beat.cancelled.set()
                self.written(record)

    def lost(self, epoch: int, why: Exception | None = None) -> None:
        """The run is no longer this worker's: cancelled, or taken over after its lease lapsed."""
        log.warning("run %s: %s; epoch %s not written, stopping", self.run.id,
                    why or "no longer held by this worker (cancelled, or its lease lapsed)", epoch)
        self.beat.lost.set()

    def _reach(self, epoch: int) -> None:
        self.reached = epoch if self.reached is None else max(self.reached, epoch)

    def written(self, record: EpochRecord) -> None:
        self._reach(record.epoch)
        self.beat.progress.written(self.run.id)
        if self.on_epoch is not None:
            self.on_epoch(self.run.id, record)

    def should_stop(self) -> bool:
        return (self.beat.lost.is_set() or self.beat.cancelled.is_set()
                or (self.shutdown is not None and self.shutdown.is_set()))

    def settle(self, result: RunResult) -> Outcome:
        """Finish the run, or release it after a warm shutdown; a lost lease touches nothing.

        A warm shutdown gives back the attempt its claim took: restarting workers is not the
        run's fault, and must not exhaust ``max_attempts``."""
        self.beat.stop()
        if result.status != "stopped":
            if self.store.finish(self.run.id, self.worker, result.status, last_epoch=result.epochs_run):
                return Outcome(self.run.id, result.status, result.epochs_run)
            return Outcome(self.run.id, "stopped", result.epochs_run)  # cancelled or taken over meanwhile
        if self.beat.lost.is_set() or self.beat.cancelled.is_set():
            return Outcome(self.run.id, "stopped", result.epochs_run)
        self.store.release(self.run.id, self.worker, refund=True)
        return Outcome(self.run.id, "released", result.epochs_run)

    def fail(self, error: str) -> Outcome:
        """Mark the run failed. Rows an earlier attempt wrote past where this one got go (as when a
        run finishes), so a report never shows epochs or accuracies the failed trajectory did not
        reach; a failure before this attempt resumed or wrote anything deletes nothing."""
        self.beat.stop()
        self.store.finish(self.run.id, self.worker, "failed", error=error, last_epoch=self.reached)
        return Outcome(self.run.id, "failed")

    def abandon(self, refund: bool = True, error: str | None = None) -> None:
        """After a database error: the run is not at fault, so hand it back to ``queued`` if the
        database lets us (else its lease runs out); its rows and checkpoints stay for the resume.
        After a full disk its attempt counts (``refund=False``; ``error`` says why): a run whose
        own checkpoint fills the disk every time then ends failed after ``KANFARM_MAX_ATTEMPTS``."""
        self.beat.stop()
        _release_claim(self.store, self.run.id, self.worker, refund, error)


def _release_claim(store: Store, run_id: int, worker: str, refund: bool = True,
                   error: str | None = None) -> None:
    """Release a claimed run to ``queued``, its attempt refunded unless not ``refund``; if the
    database refuses, its lease runs out instead."""
    try:
        store.release(run_id, worker, error=error, refund=refund)
    except Exception as exc:
        log.warning("run %s: could not be released (%s); its lease will expire", run_id, type(exc).__name__)


def _own_wiring_error(exc: BaseException) -> bool:
    """An error wiring one run that is that run's own (its checkpoint folder unreadable, a link
    planted there): it fails alone. Anything else (the database, a full disk, a setting, no
    thread to be had, a bug) is the worker's, and would fail every run it claimed in turn."""
    return (isinstance(exc, (OSError, ValueError)) and not isinstance(exc, ConfigError)
            and not _store_gone(exc) and environment_fault(exc) is None)


def _unwired(store: Store, run_id: int, worker: str, exc: Exception) -> Outcome:
    """A claimed run whose wiring (``_ClaimedRun``) failed: failed after an error of its own, as
    a training error would fail it; else handed back and the error re-raised (after a full disk,
    as its ConfigError), its attempt refunded but after a full disk."""
    if _own_wiring_error(exc):
        log.exception("run %s failed before training", run_id)
        try:
            held = store.finish(run_id, worker, "failed", error=_error_text(exc))
        except Exception:
            _release_claim(store, run_id, worker)  # the store went away meanwhile: not the run's doing
            raise
        return Outcome(run_id, "failed" if held else "stopped")
    fault = environment_fault(exc)
    _release_claim(store, run_id, worker, refund=fault is None, error=str(fault) if fault else None)
    if fault is not None:
        raise fault from exc
    raise exc


class _EpochRows:
    """A pack's epoch rows, written in one transaction once the pack has emitted the epoch's last
    (the first member's ``epoch_end``): one transaction per member's row took most of a small
    pack's epoch. Each member then settles its own row (``_ClaimedRun.epoch_end``)."""

    def __init__(self, store: Store, worker: str):
        self.store, self.worker = store, worker
        self.pending: list[tuple[int, EpochRecord]] = []
        self.done: dict[int, tuple[EpochRecord, bool, bool]] = {}  # run id -> (record, lost, cancelled)
        self.errors: dict[int, tuple[Exception, TracebackType | None]] = {}  # run id -> (the write's error, its traceback)

    def add(self, run_id: int, record: EpochRecord) -> None:
        record.validate()  # a bad record is its member's error, raised here
        self.pending.append((run_id, record))

    def flush(self) -> None:
        """Write the pending rows. Their outcome waits in ``done`` for each member, an error too: a
        failed write is every pending member's, each raising it in its own ``epoch_end``."""
        if self.pending:
            pending, self.pending = self.pending, []
            try:
                lost, cancelled = self.store.write_epochs(pending, self.worker)
            except Exception as exc:
                self.errors.update({run_id: (exc, exc.__traceback__) for run_id, _ in pending})
                return
            self.done.update({run_id: (record, run_id in lost, run_id in cancelled) for run_id, record in pending})


def _store_gone(exc: BaseException) -> bool:
    """The store cannot take what the run would record: unavailable (``database_unavailable``:
    the run is handed back, and a work loop retries), or its SQLite file deleted or replaced
    (nothing is retried: the command ends)."""
    return database_unavailable(exc) or isinstance(exc, DatabaseFileReplaced)


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"[-4000:]


def _settings_before_claim() -> float:
    """Read (and check) the settings a run needs, before each claim: a setting gone bad after the
    claim would leave the run held, its attempt spent, until its lease ran out. Sets up this
    process for training (``host_memory``). Returns the checkpoint interval in seconds."""
    from kanfarm.models.compiled_spline import cpu_compile_wanted

    checkpoint_settings()
    check_checkpoints_writable()
    cpu_compile_wanted()
    stall_seconds()
    keep_freed_memory()
    return checkpoint_interval()


def execute_run(store: Store, run_id: int, worker: str, *, device: str = "cpu",
                lease_s: float = DEFAULT_LEASE_S, claimed: bool = False,
                shutdown: threading.Event | None = None,
                on_epoch: Callable[[int, EpochRecord], None] | None = None,
                max_attempts: int | None = None) -> Outcome:
    """Claim (unless ``claimed``: then the caller read the settings with ``_settings_before_claim``
    before its claim) and train one run to its end.

    ``shutdown`` set (warm shutdown, Ctrl-C): the run checkpoints at the next epoch boundary and is
    released back to ``queued``. A lost lease or a cancel stops it without touching its state.
    """
    interval_s = checkpoint_interval() if claimed else _settings_before_claim()
    if not claimed and store.claim(run_id, worker, lease_s, max_attempts=max_attempts) is None:
        log.info("run %s not claimed by %s (taken, finished or cancelled)", run_id, worker)
        return Outcome(run_id, "not-claimed")
    try:
        attached = _ClaimedRun(store, store.run(run_id), worker, lease_s, shutdown, on_epoch, interval_s)
    except Exception as exc:  # held, the run would wait for its lease
        return _unwired(store, run_id, worker, exc)
    config = attached.run.config
    try:
        result = train(config, _dataset(config), attached.sink, checkpoints=attached.checkpoints,
                       device=device, should_stop=attached.should_stop)
    except Exception as exc:
        if _store_gone(exc):
            attached.abandon()
            raise
        if (fault := environment_fault(exc)) is not None:
            attached.abandon(refund=False, error=str(fault))
            raise fault from exc
        if isinstance(exc, (DatasetUnavailable, DatasetFormatError)):  # the message says it all
            log.error("run %s failed: %s", run_id, exc)
        else:
            log.exception("run %s failed", run_id)
        error = _error_text(exc)
        return _settled(attached, lambda: attached.fail(error))
    return _settled(attached, lambda: attached.settle(result))


def _settled(attached: _ClaimedRun, settle: Callable[[], Outcome]) -> Outcome:
    """``settle()``; when it hits a database error the run is handed back rather than left held."""
    try:
        return settle()
    except Exception as exc:
        if _store_gone(exc):
            attached.abandon()
        raise


def execute_pack(store: Store, run_ids: list[int], worker: str, *, device: str = "cpu",
                 lease_s: float = DEFAULT_LEASE_S, shutdown: threading.Event | None = None,
                 max_attempts: int | None = None,
                 on_epoch: Callable[[int, EpochRecord], None] | None = None) -> list[Outcome]:
    """Claim the claimable runs of ``run_ids`` at once and train them as one stacked pack
    (see ``kanfarm.packing``); runs already finished or held elsewhere are left out. Each member
    keeps its own lease, epoch rows, checkpoints and final status."""
    from kanfarm.packing import Member, train_pack

    run_ids = list(dict.fromkeys(run_ids))  # one outcome per run, as one claim per run
    interval_s = _settings_before_claim()
    claimed = store.claim_many(run_ids, worker, lease_s, max_attempts=max_attempts)
    outcomes = [Outcome(i, "not-claimed") for i in run_ids if i not in {r.id for r in claimed}]
    if len(claimed) <= 1:
        return outcomes + [execute_run(store, r.id, worker, device=device, lease_s=lease_s, claimed=True,
                                       shutdown=shutdown, on_epoch=on_epoch) for r in claimed]
    progress = _Progress(stall_seconds())
    members: list[_ClaimedRun] = []
    try:
        for r in claimed:
            try:
                members.append(_ClaimedRun(store, r, worker, lease_s, shutdown, on_epoch, interval_s, progress))
            except Exception as exc:
                if not _own_wiring_error(exc):
                    raise
                outcomes.append(_unwired(store, r.id, worker, exc))  # it fails alone
    except Exception:  # the members wired so far would beat on, held for good, and the others would wait for
        settled = {o.run_id for o in outcomes}  # their leases: all go back (attempts refunded), then
        for m in members:                       # the run that met the error, as _unwired hands it back
            m.abandon()
            settled.add(m.run.id)
        failing = next(r for r in claimed if r.id not in settled)
        for r in claimed:
            if r.id not in settled and r is not failing:
                _release_claim(store, r.id, worker)
        error = sys.exc_info()[1]
        if _own_wiring_error(error):  # raised by the store while _unwired failed that run: released there
            raise
        _unwired(store, failing.id, worker, error)  # raises
    if not members:  # every claimed run failed alone
        return outcomes
    rows = _EpochRows(store, worker)
    for m in members:
        m.rows = rows
    ended: dict[int, Outcome] = {}  # members are settled as they end, while the others train on

    def on_end(member: _ClaimedRun) -> Callable[[RunResult], None]:
        return lambda result: ended.__setitem__(member.run.id, member.settle(result))

    def on_error(member: _ClaimedRun) -> Callable[[BaseException], bool]:
        """A member's own error (its checkpoint folder, its resume) fails that member alone; a
        database error or a full or read-only disk is the pack's, and ends it (handed back below)."""
        def fail_alone(exc: BaseException) -> bool:
            if _store_gone(exc) or environment_fault(exc) is not None:
                return False
            log.exception("run %s failed in pack %s", member.run.id, [m.run.id for m in members])
            ended[member.run.id] = member.fail(_error_text(exc))
            return True
        return fail_alone

    try:
        train_pack([Member(m.run.config, m.sink, m.checkpoints, m.should_stop, on_end(m), on_error(m),
                           m.epoch_end) for m in members], _dataset(claimed[0].config), device=device)
    except Exception as exc:
        open_members = [m for m in members if m.run.id not in ended]
        for m in open_members:  # no lease of the pack is renewed from here on, whatever happens below
            m.beat.stop()
        fault = environment_fault(exc)
        if _store_gone(exc) or fault is not None:
            for m in open_members:
                m.abandon(refund=fault is None, error=str(fault) if fault else None)
            if fault is not None:
                raise fault from exc
            raise
        log.exception("pack %s failed", [m.run.id for m in open_members])
        error = _error_text(exc)
        for i, m in enumerate(open_members):
            try:
                ended[m.run.id] = m.fail(error)
            except Exception as settle_error:  # the database went away while failing them
                for rest in open_members[i:]:
                    rest.abandon()
                raise settle_error from exc
    return outcomes + [ended[m.run.id] for m in members]


def fitting_pack_size(config: RunConfig, device: str) -> int:
    """Members of ``config``'s shape one pack may hold on ``device`` (``auto``): what fits half
    the free memory of a GPU, or of the host up to 8 on a CPU (``kanfarm.packing.auto_pack_size``)."""
    from kanfarm.data import dataset_shape
    from kanfarm.packing import auto_pack_size

    return auto_pack_size(config, *dataset_shape(config.dataset, **config.dataset_options), device=device)


def _pack_size(pack_size: int | str, config: RunConfig, device: str) -> int:
    return fitting_pack_size(config, device) if pack_size == "auto" else int(pack_size)


def plan_work(waiting: list[tuple[int, RunConfig]], pack_size: int | str, device: str) -> list[list[int]]:
    """The packs ``work_loop`` trains the ``waiting`` runs in (one run each with ``pack_size`` 1)."""
    from kanfarm.packing import plan_packs

    return plan_packs(waiting, lambda config: _pack_size(pack_size, config, device))


def work_units(waiting: list[tuple[int, RunConfig]], pack_size: int | str, device: str) -> int:
    """The packs ``waiting`` runs make (``plan_work``): how many workers can be busy. Runs, with
    ``pack_size`` 1 or ``auto`` on a GPU (sizing packs there would start CUDA in the asking
    process, which holds its memory for good)."""
    if pack_size == 1 or (pack_size == "auto" and not str(device).startswith("cpu")):
        return len(waiting)
    return len(plan_work(waiting, pack_size, device))


class _DatabaseRetries:
    """A work loop rides out brief database errors: the run was handed back (``abandon``) and is
    claimed again after a pause; ``limit`` errors in a row end the loop with the last one."""

    def __init__(self, limit: int = 5, pause_s: float = 1.0):
        self.limit, self.pause_s, self.in_a_row = limit, pause_s, 0

    @contextmanager
    def riding_out(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            self.in_a_row += 1
            if self.in_a_row >= self.limit:
                raise
            log.warning("database unavailable (%s); retrying in %.0f s", type(exc).__name__,
                        self.pause_s * self.in_a_row)
            time.sleep(self.pause_s * self.in_a_row)
        else:
            self.in_a_row = 0


def work_loop(store: Store, worker: str, *, grid: str | None = None, device: str = "cpu",
              lease_s: float = DEFAULT_LEASE_S, shutdown: threading.Event | None = None,
              max_attempts: int | None = None,
              on_epoch: Callable[[int, EpochRecord], None] | None = None,
              pack_size: int | str = 1) -> list[Outcome]:
    """Claim and execute runs of ``grid`` until none is left (or shutdown). ``pack_size`` > 1 (or
    ``"auto"``): runs that can share a pack are trained together, up to that many at once."""
    outcomes = []
    retried = _DatabaseRetries()
    while pack_size != 1 and (shutdown is None or not shutdown.is_set()):
        with retried.riding_out():
            waiting = store.claimable_runs(grid)
            if not waiting:
                return outcomes
            # one plan for all the runs waiting now (planning takes ~0.1 ms a run: once per pack it
            # was quadratic in the grid); a pack whose members another worker took claims the rest
            for pack in plan_work(waiting, pack_size, device):
                if shutdown is not None and shutdown.is_set():
                    break
                outcomes += [o for o in execute_pack(store, pack, worker, device=device, lease_s=lease_s,
                                                     shutdown=shutdown, max_attempts=max_attempts, on_epoch=on_epoch)
                             if o.status != "not-claimed"]
    while shutdown is None or not shutdown.is_set():
        _settings_before_claim()  # before each claim: a setting gone bad (a full disk) claims nothing more
        with retried.riding_out():
            run = store.claim_next(worker, lease_s, grid=grid, max_attempts=max_attempts)
            if run is None:
                return outcomes
            outcomes.append(execute_run(store, run.id, worker, device=device, lease_s=lease_s, claimed=True,
                                        shutdown=shutdown, on_epoch=on_epoch))
    return outcomes
