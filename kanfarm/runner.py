"""Executes stored runs: connects the trainer to its checkpoints and to the store.

``execute_run`` is the one code path for a run, whether a local worker or a Celery task calls
it: claim atomically (a lost claim is a no-op), keep the lease alive from a heartbeat thread while
training, resume from the newest good checkpoint, write each epoch idempotently, finish.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kanfarm.data import load_dataset
from kanfarm.data.dataset import Dataset
from kanfarm.store import Store
from kanfarm.training import CheckpointManager, EpochRecord, train

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 300.0
#: a pack checkpoints at most this often (and at each member's last epoch): tiny models would
#: otherwise spend their time writing checkpoints.
PACK_CHECKPOINT_S = 30.0


def checkpoint_root() -> Path:
    return Path(os.environ.get("KANFARM_CHECKPOINT_DIR", "kanfarm-checkpoints"))


def worker_name(suffix: str = "") -> str:
    return f"{socket.gethostname()}:{os.getpid()}{suffix}"


@functools.lru_cache(maxsize=4)
def _dataset(name: str) -> Dataset:
    """Loaded once per process: a worker runs many cells of the same dataset."""
    return load_dataset(name)


class _Heartbeat(threading.Thread):
    """Extends the run's lease every ``interval`` seconds; notes when the lease is lost."""

    def __init__(self, store: Store, run_id: int, worker: str, lease_s: float):
        super().__init__(daemon=True, name=f"heartbeat-{run_id}")
        self.store, self.run_id, self.worker, self.lease_s = store, run_id, worker, lease_s
        self.interval = max(0.05, lease_s / 3)
        self.lost = threading.Event()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                if not self.store.heartbeat(self.run_id, self.worker, self.lease_s):
                    self.lost.set()
                    return
            except Exception as exc:  # a database hiccup is not a lost lease; the next beat retries
                log.warning("heartbeat for run %s failed: %s", self.run_id, exc)

    def stop(self) -> None:
        self._done.set()


@dataclass
class Outcome:
    run_id: int
    status: str  # completed, diverged, failed, stopped, released, not-claimed
    epochs_run: int = 0


def execute_run(store: Store, run_id: int, worker: str, *, device: str = "cpu",
                lease_s: float = DEFAULT_LEASE_S, claimed: bool = False,
                shutdown: threading.Event | None = None,
                on_epoch: Callable[[int, EpochRecord], None] | None = None,
                max_attempts: int | None = None) -> Outcome:
    """Claim (unless ``claimed``) and train one run to its end.

    ``shutdown`` set (warm shutdown, Ctrl-C): the run checkpoints at the next epoch boundary and is
    released back to ``queued``. A lost lease or a cancel stops it without touching its state.
    """
    if not claimed and store.claim(run_id, worker, lease_s, max_attempts=max_attempts) is None:
        log.info("run %s not claimed by %s (taken, finished or cancelled)", run_id, worker)
        return Outcome(run_id, "not-claimed")
    run = store.run(run_id)
    beat = _Heartbeat(store, run_id, worker, lease_s)
    beat.start()
    try:
        def sink(record: EpochRecord) -> None:
            store.write_epoch(run_id, record)
            if on_epoch is not None:
                on_epoch(run_id, record)

        def should_stop() -> bool:
            return beat.lost.is_set() or (shutdown is not None and shutdown.is_set())

        checkpoints = CheckpointManager(
            checkpoint_root() / run.config_hash, run.config_hash,
            on_save=lambda epoch, path, digest: store.record_checkpoint(run_id, epoch, str(path), digest))
        result = train(run.config, _dataset(run.config.dataset), sink, checkpoints=checkpoints,
                       device=device, should_stop=should_stop)
    except Exception as exc:
        beat.stop()
        log.exception("run %s failed", run_id)
        store.finish(run_id, worker, "failed", error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"[-4000:])
        return Outcome(run_id, "failed")
    beat.stop()
    if result.status == "stopped":
        if beat.lost.is_set():
            return Outcome(run_id, "stopped", result.epochs_run)
        store.release(run_id, worker)
        return Outcome(run_id, "released", result.epochs_run)
    store.finish(run_id, worker, result.status)
    return Outcome(run_id, result.status, result.epochs_run)


def execute_pack(store: Store, run_ids: list[int], worker: str, *, device: str = "cpu",
                 lease_s: float = DEFAULT_LEASE_S, shutdown: threading.Event | None = None,
                 max_attempts: int | None = None,
                 on_epoch: Callable[[int, EpochRecord], None] | None = None) -> list[Outcome]:
    """Claim the claimable runs of ``run_ids`` at once and train them as one stacked pack
    (see ``kanfarm.packing``); runs already finished or held elsewhere are left out. Each member
    keeps its own lease, epoch rows, checkpoints and final status."""
    from kanfarm.packing import Member, train_pack

    claimed = store.claim_many(run_ids, worker, lease_s, max_attempts=max_attempts)
    outcomes = [Outcome(i, "not-claimed") for i in run_ids if i not in {r.id for r in claimed}]
    if len(claimed) <= 1:
        return outcomes + [execute_run(store, r.id, worker, device=device, lease_s=lease_s, claimed=True,
                                       shutdown=shutdown, on_epoch=on_epoch) for r in claimed]
    beats = {r.id: _Heartbeat(store, r.id, worker, lease_s) for r in claimed}
    for beat in beats.values():
        beat.start()

    def member(run) -> Member:
        beat = beats[run.id]

        def sink(record: EpochRecord) -> None:
            store.write_epoch(run.id, record)
            if on_epoch is not None:
                on_epoch(run.id, record)

        checkpoints = CheckpointManager(
            checkpoint_root() / run.config_hash, run.config_hash, min_interval_s=PACK_CHECKPOINT_S,
            on_save=lambda epoch, path, digest: store.record_checkpoint(run.id, epoch, str(path), digest))
        return Member(run.config, sink, checkpoints,
                      lambda: beat.lost.is_set() or (shutdown is not None and shutdown.is_set()))

    try:
        results = train_pack([member(r) for r in claimed], _dataset(claimed[0].config.dataset), device=device)
    except Exception as exc:
        for beat in beats.values():
            beat.stop()
        log.exception("pack %s failed", [r.id for r in claimed])
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"[-4000:]
        for r in claimed:
            store.finish(r.id, worker, "failed", error=error)
        return outcomes + [Outcome(r.id, "failed") for r in claimed]
    for beat in beats.values():
        beat.stop()
    for run, result in zip(claimed, results):
        if result.status == "stopped":
            if beats[run.id].lost.is_set():
                outcomes.append(Outcome(run.id, "stopped", result.epochs_run))
            else:
                store.release(run.id, worker)
                outcomes.append(Outcome(run.id, "released", result.epochs_run))
        else:
            store.finish(run.id, worker, result.status)
            outcomes.append(Outcome(run.id, result.status, result.epochs_run))
    return outcomes


def _pack_size(pack_size: int | str, run, device: str) -> int:
    if pack_size != "auto":
        return int(pack_size)
    from kanfarm.data import dataset_shape
    from kanfarm.packing import auto_pack_size

    return auto_pack_size(run[1], *dataset_shape(run[1].dataset), device=device)


def work_loop(store: Store, worker: str, *, grid: str | None = None, device: str = "cpu",
              lease_s: float = DEFAULT_LEASE_S, shutdown: threading.Event | None = None,
              max_attempts: int | None = None,
              on_epoch: Callable[[int, EpochRecord], None] | None = None,
              pack_size: int | str = 1) -> list[Outcome]:
    """Claim and execute runs of ``grid`` until none is left (or shutdown). ``pack_size`` > 1 (or
    ``"auto"``): runs that can share a pack are trained together, up to that many at once."""
    outcomes = []
    while pack_size != 1 and (shutdown is None or not shutdown.is_set()):
        from kanfarm.packing import plan_packs

        waiting = store.claimable_runs(grid)
        if not waiting:
            return outcomes
        pack = plan_packs(waiting, _pack_size(pack_size, waiting[0], device))[0]
        outcomes += execute_pack(store, pack, worker, device=device, lease_s=lease_s, shutdown=shutdown,
                                 max_attempts=max_attempts, on_epoch=on_epoch)
    while shutdown is None or not shutdown.is_set():
        run = store.claim_next(worker, lease_s, grid=grid, max_attempts=max_attempts)
        if run is None:
            break
        outcomes.append(execute_run(store, run.id, worker, device=device, lease_s=lease_s, claimed=True,
                                    shutdown=shutdown, on_epoch=on_epoch))
    return outcomes
