"""Errors the store raises for conditions callers are expected to handle."""
from __future__ import annotations


class SchemaOutOfDate(RuntimeError):
    """The database is not at the newest migration; nothing was read or written."""

    def __init__(self, url: str, current: str | None, head: str, known: bool = True):
        if known:
            text = (f"run `kanfarm db upgrade`: the database schema is at revision "
                    f"{current or 'none (empty database)'}, this kanfarm needs {head} (database: {url})")
        else:
            text = (f"the database schema is at revision {current}, which this kanfarm does not know (a newer "
                    f"kanfarm's database, or another application's); use a matching kanfarm or another "
                    f"database (database: {url})")
        super().__init__(text)
        self.current = current
        self.head = head


class DatabaseFileReplaced(RuntimeError):
    """The SQLite file a store opened was deleted or replaced while it was in use."""

    def __init__(self, path: str, deleted: bool):
        super().__init__(f"the database file {path} was {'deleted' if deleted else 'replaced'} while this "
                         "command used it: what it wrote since went with the old file. Nothing more is written; "
                         "put the database back (or `kanfarm db upgrade` a new one) and run the command again")
        self.path = path


class RunNotFound(LookupError):
    """No run with this id."""


class LeaseLost(RuntimeError):
    """The worker no longer holds the run (lease expired and taken, or the run was cancelled)."""


def database_errors() -> tuple[type[Exception], ...]:
    """What ``database_unavailable`` accepts, as a tuple for ``except`` clauses."""
    from sqlalchemy.exc import InterfaceError, InternalError, OperationalError, TimeoutError

    return OperationalError, InternalError, InterfaceError, TimeoutError


def database_unavailable(exc: BaseException) -> bool:
    """A lost connection, a locked SQLite file, a server restart, a failover onto a read-only
    standby (PostgreSQL's ``InternalError``), no pooled connection free in time (``TimeoutError``):
    errors of the database, not of the run, which must
    not mark it failed (callers retry instead). Errors of the statement itself (``IntegrityError``,
    ``DataError``, ``ProgrammingError``) are bugs and propagate."""
    return isinstance(exc, database_errors())
