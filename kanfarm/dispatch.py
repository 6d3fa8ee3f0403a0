"""Which runs the distributed commands hand to workers, in which messages, to which queue.

The database decides what runs; the broker only carries "try run N" (or "try runs [a, b, ...]")
messages, and the same id published twice is harmless (the second claim is a no-op). So run
states change here first and the ids to publish come back: a message never finds its run not yet
claimable. ``sweep`` goes the other way round, as stale runs are claimable already. Publishing is
the caller's (``workers.tasks.publish_packs``): the library knows no broker.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from kanfarm.config import RunConfig
from kanfarm.store import Store

#: statuses ``enqueue grid`` moves to queued: waiting runs and cancelled ones (not finished: failed is)
ENQUEUE_FROM = ("pending", "cancelled")
#: where a run never enqueued (a local ``run grid``'s) is published by ``requeue``
DEFAULT_QUEUE = "cpu"

#: ``publish(packs, queue, fit)`` -> runs published; ``fit``: each worker splits packs to suit its device
Publish = Callable[[list[list[int]], str, bool], int]


def pack_messages(run_ids: list[int], size: int | str, config_of: Callable[[int], RunConfig]) -> list[list[int]]:
    """The runs' messages: one each with ``size`` 1, else packs of up to ``size`` (``auto``: the
    largest; each worker splits them to suit its device)."""
    if size == 1:
        return [[i] for i in run_ids]
    from kanfarm.packing import plan_packs  # imports torch: only for packs
    from kanfarm.packing.planner import MAX_PACK

    return plan_packs([(i, config_of(i)) for i in run_ids], MAX_PACK if size == "auto" else size)


def queued_messages(store: Store, grid: str | None, run_ids: list[int], size: int | str) -> list[list[int]]:
    """``pack_messages`` of those of ``run_ids`` still claimable (read in one query)."""
    if size == 1:
        return [[i] for i in run_ids]
    wanted = set(run_ids)
    configs = {i: c for i, c in store.claimable_runs(grid) if i in wanted}
    return pack_messages(list(configs), size, configs.__getitem__)


def enqueue(store: Store, grid: str, queue: str) -> list[int]:
    """Mark the grid's waiting and cancelled runs queued on ``queue``; the ids of all its queued
    runs (those queued before too: their messages may be lost), to publish."""
    store.mark_queued(store.run_ids(grid, statuses=ENQUEUE_FROM))
    queued = store.run_ids(grid, statuses=["queued"])
    store.assign_queue(queued, queue)
    return queued


def enqueue_preview(store: Store, grid: str, hashes: set[str]) -> dict[str, int]:
    """What ``enqueue`` of a spec whose cells hash to ``hashes`` would do, writing nothing: runs
    added, already stored, published (the new ones, and the waiting runs among the spec's cells and
    the grid's earlier ones)."""
    known = {row["config_hash"]: row["status"] for row in store.query("SELECT config_hash, status FROM runs")}
    stored = hashes & known.keys()
    candidates = stored | store.config_hashes(grid)
    waiting = sum(known[h] in ("queued", *ENQUEUE_FROM) for h in candidates)
    return {"added": len(hashes) - len(stored), "skipped": len(stored),
            "published": len(hashes) - len(stored) + waiting}


@dataclass
class Requeue:
    """What ``requeue`` found and marked; ``by_queue`` is what to publish where."""

    queued: list[int] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)
    retried: list[int] = field(default_factory=list)
    exhausted: list[int] = field(default_factory=list)  # failed runs with no attempt left
    #: retried under a larger bound than the workers' own: they fail them again at their claim
    beyond_workers: list[int] = field(default_factory=list)
    by_queue: dict[str, list[int]] = field(default_factory=dict)


def requeue(store: Store, grid: str | None, *, stale: bool = False, failed_bound: int | None = None,
            workers_bound: int | None = None, queue: str | None = None) -> Requeue:
    """Every queued run to publish again (after a Redis restart or flush); with ``stale`` also runs
    whose lease expired; with ``failed_bound`` failed runs with fewer attempts than that, marked
    queued (their attempts stay counted). Each run goes to ``queue``, else the queue it was enqueued
    on (``DEFAULT_QUEUE`` for one never enqueued), and a queue other than the noted one is noted."""
    found = Requeue(queued=store.run_ids(grid, statuses=["queued"]),
                    stale=store.stale_runs(grid) if stale else [])
    if failed_bound is not None:
        workers_bound = failed_bound if workers_bound is None else workers_bound
        ids = set(store.run_ids(grid, statuses=["failed"]))
        for row in store.query("SELECT id, attempts FROM runs WHERE status = 'failed' ORDER BY id"):
            if row["id"] in ids:
                (found.retried if row["attempts"] < failed_bound else found.exhausted).append(row["id"])
                if workers_bound <= row["attempts"] < failed_bound:
                    found.beyond_workers.append(row["id"])
        store.mark_queued(found.retried, fresh_attempts=False)  # the bound counts every earlier attempt
    unnoted: dict[str, list[int]] = {}
    for run_id, noted in sorted(store.queues(sorted({*found.queued, *found.stale, *found.retried})).items()):
        name = queue or noted or DEFAULT_QUEUE
        found.by_queue.setdefault(name, []).append(run_id)
        if name != noted:
            unnoted.setdefault(name, []).append(run_id)
    for name, ids in unnoted.items():
        store.assign_queue(ids, name)
    return found


def sweep(store: Store, grid: str | None, size: int | str, grace_s: float, publish: Publish) -> dict[str, Any]:
    """Publish the runs whose lease expired ``grace_s`` ago or earlier (each to the queue it was
    enqueued on, in packs with ``size`` > 1), then mark them queued: a worker that takes a message
    first claims the run all the same (an expired lease is claimable), and a later sweep leaves a
    queued run alone. Runs never enqueued are left to the local ``run grid`` that holds them."""
    stale = store.stale_runs(grid, grace_s=grace_s)
    by_queue: dict[str, list[int]] = {}
    for run_id, noted in sorted(store.queues(stale).items()):
        if noted is not None:
            by_queue.setdefault(noted, []).append(run_id)
    published = {name: publish(pack_messages(ids, size, lambda i: store.run(i).config), name, size == "auto")
                 for name, ids in sorted(by_queue.items())}
    moved = store.requeue_stale([i for ids in by_queue.values() for i in ids])
    return {"grid": grid, "stale": len(stale), "local": len(stale) - sum(map(len, by_queue.values())),
            "published": sum(published.values()), "published_by_queue": published, "requeued": len(moved)}


def grids_sharing_unfinished(store: Store, grid: str) -> list[str]:
    """The other grids that hold some of ``grid``'s waiting or running runs (a run is one cell of
    every grid that holds it: cancelling it cancels it there too)."""
    return [row["name"] for row in store.query(
        "SELECT DISTINCT g2.name FROM grids g1 JOIN grid_runs a ON a.grid_id = g1.id "
        "JOIN grid_runs b ON b.run_id = a.run_id JOIN grids g2 ON g2.id = b.grid_id "
        "JOIN runs r ON r.id = a.run_id WHERE g1.name = :grid AND g2.name <> :grid "
        "AND r.status IN ('pending', 'queued', 'running') ORDER BY g2.name", {"grid": grid})]
