"""The experiment store: grids, runs and their state machine, epoch metrics, checkpoints.

``Store(url)`` is the whole API; see ``store.py`` for the run states and ``schema.py`` for the
tables users may query directly (and the ``run_summary`` view).
"""
from kanfarm.store.engine import DEFAULT_URL, URL_ENV, database_url, masked
from kanfarm.store.errors import (DatabaseFileReplaced, LeaseLost, RunNotFound, SchemaOutOfDate, database_errors,
                                  database_unavailable)
from kanfarm.store.rows import CheckpointRow, GridRow, RunRow, SubmitResult
from kanfarm.store.schema import STATUSES
from kanfarm.store.store import Store

__all__ = [
    "DEFAULT_URL", "DatabaseFileReplaced", "URL_ENV", "database_url", "masked", "LeaseLost", "RunNotFound",
    "SchemaOutOfDate", "database_errors", "database_unavailable", "CheckpointRow", "GridRow", "RunRow", "SubmitResult", "STATUSES",
    "Store",
]
