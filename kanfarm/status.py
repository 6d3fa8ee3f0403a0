"""Where a grid stands: runs per status, progress, and a time-left estimate from timed epochs."""
from __future__ import annotations

from typing import Any

from kanfarm.store import Store

FINISHED = ("completed", "diverged", "failed", "cancelled")

_REMAINING_SQL = """
SELECT r.id, r.dataset, r.model, r.depth, r.max_epochs, r.status, MAX(e.epoch) AS epoch
FROM runs r LEFT JOIN epoch_metrics e ON e.run_id = r.id
WHERE r.status IN ('pending', 'queued', 'running') {grid_filter}
GROUP BY r.id, r.dataset, r.model, r.depth, r.max_epochs, r.status
"""
_TIMED_SQL = """
SELECT r.dataset, r.model, r.depth, AVG(e.seconds) AS mean_seconds, COUNT(*) AS n
FROM epoch_metrics e JOIN runs r ON r.id = e.run_id
WHERE e.epoch > 0 AND e.seconds IS NOT NULL
GROUP BY r.dataset, r.model, r.depth
"""
_GRID_FILTER = "AND r.id IN (SELECT g.run_id FROM grid_runs g JOIN grids gr ON gr.id = g.grid_id WHERE gr.name = :grid)"


def grid_status(store: Store, grid: str | None = None) -> dict[str, Any]:
    """Counts per status and ``eta_seconds``: remaining epochs times the mean epoch time of runs of
    the same dataset, model and depth (any timed epoch when that group has none), for one worker."""
    counts = store.status_counts(grid)
    total = sum(counts.values())
    done = sum(counts.get(s, 0) for s in FINISHED)
    params = {"grid": grid} if grid else {}
    remaining = store.query(_REMAINING_SQL.format(grid_filter=_GRID_FILTER if grid else ""), params)
    timed = store.query(_TIMED_SQL, {})
    by_group = {(t["dataset"], t["model"], t["depth"]): t["mean_seconds"] for t in timed}
    n_timed = sum(t["n"] for t in timed)
    overall = (sum(t["mean_seconds"] * t["n"] for t in timed) / n_timed) if n_timed else None
    eta: float | None = 0.0
    for r in remaining:
        per_epoch = by_group.get((r["dataset"], r["model"], r["depth"]), overall)
        if per_epoch is None:
            eta = None
            break
        eta += per_epoch * (r["max_epochs"] - (r["epoch"] or 0))
    return {"grid": grid, "counts": counts, "total": total, "done": done,
            "progress": done / total if total else 0.0, "eta_seconds": eta, "epochs_timed": n_timed}
