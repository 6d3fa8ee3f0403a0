"""Where a grid stands: runs per status, progress, and a time-left estimate from timed epochs."""
from __future__ import annotations

from typing import Any

from kanfarm.store import Store

#: statuses of runs that no longer wait for a worker
ENDED = ("completed", "diverged", "failed", "cancelled")

#: what sets an epoch's time, as columns of ``runs``: runs alike in all of them (and in their
#: dataset options, ``_OPTIONS``) are timed together. ``depth`` is NULL for grids that give widths,
#: so the widths themselves are part of it.
SHAPE = ("dataset", "model", "depth", "hidden_widths", "batch_size", "spline_order", "grid_size", "trainer")
_SHAPE_SQL = ", ".join(f"r.{c}" for c in SHAPE)
#: the stored config's dataset options as text (imdb's vocabulary size is the input width, higgs's
#: n_train the rows of an epoch), per dialect: JSONB on PostgreSQL, JSON text on SQLite
_OPTIONS = {"postgresql": "CAST(r.config -> 'dataset_options' AS TEXT)",
            "sqlite": "json_extract(r.config, '$.dataset_options')"}

_REMAINING_SQL = f"""
SELECT r.id, {_SHAPE_SQL}, {{options}} AS options, r.max_epochs, r.status, MAX(e.epoch) AS epoch
FROM runs r LEFT JOIN epoch_metrics e ON e.run_id = r.id
WHERE r.status IN ('pending', 'queued', 'running') {{grid_filter}}
GROUP BY r.id, {_SHAPE_SQL}, {{options}}, r.max_epochs, r.status
"""
#: epochs summed per run first, so that each run's options are read once, not once per epoch row
_TIMED_SQL = f"""
SELECT {_SHAPE_SQL}, {{options}} AS options,
       CAST(SUM(t.total) AS DOUBLE PRECISION) / CAST(SUM(t.n) AS DOUBLE PRECISION) AS mean_seconds,
       CAST(SUM(t.n) AS BIGINT) AS n
FROM (SELECT e.run_id, SUM(e.seconds) AS total, COUNT(*) AS n FROM epoch_metrics e
      WHERE e.epoch > 0 AND e.seconds IS NOT NULL
        AND e.run_id IN (SELECT id FROM runs WHERE dataset IN ({{datasets}}))
      GROUP BY e.run_id) t
JOIN runs r ON r.id = t.run_id
GROUP BY {_SHAPE_SQL}, {{options}}
"""
_GRID_FILTER = "AND r.id IN (SELECT g.run_id FROM grid_runs g JOIN grids gr ON gr.id = g.grid_id WHERE gr.name = :grid)"


def grid_status(store: Store, grid: str | None = None) -> dict[str, Any]:
    """Counts per status, ``done`` (runs that ended: completed, diverged, failed or cancelled) and
    ``eta_seconds``: remaining epochs times the mean epoch time of runs (of any grid) of the same
    shape (``SHAPE``: dataset and its options, model, widths, batch size, spline settings,
    trainer), else of the same dataset; unknown (None) when a remaining run's dataset has no timed
    epoch, rather than a guess from another dataset. ``epochs_timed``: the timed epochs the
    estimate rests on. For one worker. ``stale``: running runs whose lease
    expired (their worker died, or hung and gave the run up): nothing trains them until a claim
    (``run grid``) or ``kanfarm sweep`` takes them."""
    counts = store.status_counts(grid)
    total = sum(counts.values())
    done = sum(counts.get(s, 0) for s in ENDED)
    params = {"grid": grid} if grid else {}
    options = _OPTIONS[store.engine.dialect.name]
    remaining = store.query(_REMAINING_SQL.format(grid_filter=_GRID_FILTER if grid else "", options=options), params)
    # only the datasets still to train: the epoch rows of a study's other datasets are not read
    datasets = {f"d{i}": name for i, name in enumerate(sorted({r["dataset"] for r in remaining}))}
    timed = store.query(_TIMED_SQL.format(datasets=", ".join(f":{k}" for k in datasets), options=options),
                        datasets) if datasets else []
    by_group = {tuple(t[c] for c in (*SHAPE, "options")): (t["mean_seconds"], t["n"]) for t in timed}
    by_dataset: dict[str, tuple[float, int]] = {}
    for t in timed:
        seconds, n = by_dataset.get(t["dataset"], (0.0, 0))
        by_dataset[t["dataset"]] = (seconds + t["mean_seconds"] * t["n"], n + t["n"])
    by_dataset = {d: (seconds / n, n) for d, (seconds, n) in by_dataset.items()}
    eta: float | None = 0.0
    used: set[tuple] = set()
    for r in remaining:
        key = tuple(r[c] for c in (*SHAPE, "options"))
        source = key if key in by_group else (r["dataset"],) if r["dataset"] in by_dataset else None
        if source is None:
            eta = None
            break
        used.add(source)
        per_epoch = (by_group[key] if len(source) > 1 else by_dataset[r["dataset"]])[0]
        eta += per_epoch * (r["max_epochs"] - (r["epoch"] or 0))
    n_timed = sum(by_group[s][1] if len(s) > 1 else by_dataset[s[0]][1] for s in used)
    return {"grid": grid, "counts": counts, "total": total, "done": done, "stale": len(store.stale_runs(grid)),
            "progress": done / total if total else 0.0, "eta_seconds": eta,
            "epochs_timed": n_timed if eta is not None else 0}
