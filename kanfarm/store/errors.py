"""Errors the store raises for conditions callers are expected to handle."""
from __future__ import annotations


class SchemaOutOfDate(RuntimeError):
    """The database is not at the newest migration; nothing was read or written."""

    def __init__(self, url: str, current: str | None, head: str):
        super().__init__(
            f"run `kanfarm db upgrade`: the database schema is at revision "
            f"{current or 'none (empty database)'}, this kanfarm needs {head} (database: {url})")
        self.current = current
        self.head = head


class RunNotFound(LookupError):
    """No run with this id."""


class LeaseLost(RuntimeError):
    """The worker no longer holds the run (lease expired and taken, or the run was cancelled)."""
