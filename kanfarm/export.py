"""Runs and epoch metrics in long format: one row per (run, epoch), config columns repeated.

A run without epoch rows (pending, or failed before its first) appears once, its epoch columns
empty; so are the spline columns of a model without splines (stored at their defaults). ``config``
is the run's whole stored config (patience, dropout, batch norm, HSIC settings, dataset
options...: what tells apart runs the other columns do not)."""
from __future__ import annotations

import json
from typing import Any, Iterator

from kanfarm.store import Store

_SQL = """
SELECT r.id AS run_id, r.config_hash, r.dataset, r.model, r.depth, r.hidden_widths, r.init, r.optimizer, r.lr,
       r.trainer, r.activation, r.spline_order, r.grid_size, r.batch_size, r.max_epochs, r.seed, r.n_params,
       r.status, r.intrinsic_dim, e.epoch, e.train_loss, e.train_acc, e.test_loss, e.test_acc, e.seconds,
       e.diverged, e.extra, r.config
FROM runs r LEFT JOIN epoch_metrics e ON e.run_id = r.id
{grid_filter}
ORDER BY r.id, e.epoch
"""
#: the columns of ``long_rows``, in order (a CSV of no rows still has its header)
COLUMNS = ("run_id", "config_hash", "dataset", "model", "depth", "hidden_widths", "init", "optimizer", "lr", "trainer",
           "activation", "spline_order", "grid_size", "batch_size", "max_epochs", "seed", "n_params", "status",
           "intrinsic_dim", "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "diverged",
           "extra", "config")
_GRID_FILTER = "WHERE r.id IN (SELECT g.run_id FROM grid_runs g JOIN grids gr ON gr.id = g.grid_id WHERE gr.name = :grid)"


def long_rows(store: Store, grid: str | None = None) -> Iterator[dict[str, Any]]:
    """The rows, one at a time, by run and epoch. With ``grid``, ``intrinsic_dim`` is that grid's
    own (as its reports use), not what the last grid to state one stored on a run they share.
    A run's ``config`` is decoded once and shared by its rows."""
    from kanfarm.reports.tables import intrinsic_dims, unused_settings

    dims = intrinsic_dims(store, grid)
    config_of: tuple[Any, Any, Any] = (None, None, ())  # (run id, its decoded config, the settings it does not use)
    for row in store.stream(_SQL.format(grid_filter=_GRID_FILTER if grid else ""), {"grid": grid} if grid else {}):
        row["intrinsic_dim"] = dims.get(row["dataset"], row["intrinsic_dim"])
        if config_of[0] != row["run_id"]:
            config = _json_column(row["config"])
            unused = unused_settings({**row, "wide_multiplier": (config or {}).get("wide_multiplier")})
            config_of = (row["run_id"], config, [name for name in unused if name in row])
        row["config"] = config_of[1]
        row.update(dict.fromkeys(config_of[2]))  # an MLP's spline columns: stored defaults, not settings
        row["extra"] = _json_column(row["extra"])
        if isinstance(row.get("hidden_widths"), str) and row["hidden_widths"].startswith("["):
            row["hidden_widths"] = json.loads(row["hidden_widths"])
        if row.get("diverged") is not None:
            row["diverged"] = bool(row["diverged"])
        yield row


def _json_column(value: Any) -> Any:
    """A JSON column as a dict with sorted keys (PostgreSQL's JSONB reorders them): one order on both."""
    if isinstance(value, str):
        value = json.loads(value)
    return dict(sorted(value.items())) if isinstance(value, dict) else value
