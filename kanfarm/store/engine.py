"""Engine set-up: which database, and the per-backend settings that make many writers safe.

SQLite: WAL once the file is migrated (readers never block the writer), a 30 s busy timeout,
foreign keys on, and write transactions opened with ``BEGIN IMMEDIATE`` so two processes never
both hold a read lock and then deadlock upgrading it (the cause of instant "database is locked"
errors that busy_timeout cannot help). Read-only work goes through :func:`read_only` and opens a
plain deferred ``BEGIN``.

PostgreSQL: ``pool_pre_ping`` so connections dropped by the server or a network blip are replaced.
"""
from __future__ import annotations

import math
import os
import sqlite3

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

DEFAULT_URL = "sqlite:///kanfarm.db"
URL_ENV = "KANFARM_DATABASE_URL"
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: execution option marking connections that only read (SQLite opens them with a deferred BEGIN).
READ_ONLY_OPTION = "kanfarm_read_only"


def database_url(url: str | URL | None = None) -> URL:
    """The given URL, else ``$KANFARM_DATABASE_URL``, else a ``kanfarm.db`` file in the cwd."""
    return make_url(url or os.environ.get(URL_ENV) or DEFAULT_URL)


#: query-string keys whose values are hidden by :func:`masked` (libpq also takes ``?password=``).
SECRET_QUERY_WORDS = ("pass", "secret", "token", "key")


def masked(url: str | URL) -> str:
    """The URL as text with any password replaced by ``***`` (safe to print or log): the one
    before the host and any query value whose key names a secret."""
    url = make_url(url)
    if url.host and "@" in url.host:  # a password's unencoded "@": the URL splits at the first one,
        url = url.set(host="***")     # and the host holds the rest of the password
    hidden = {key: "***" for key in url.query if any(word in key.lower() for word in SECRET_QUERY_WORDS)}
    if hidden:
        url = url.update_query_dict(hidden)
    return url.render_as_string(hide_password=True).replace("=%2A%2A%2A", "=***")


def make_engine(url: str | URL | None = None) -> Engine:
    url = database_url(url)
    if url.get_backend_name() == "sqlite":
        engine = sa.create_engine(url)
        _configure_sqlite(engine)
        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def read_only(engine: Engine) -> Engine:
    """A view of ``engine`` (same pool) whose transactions only read."""
    return engine.execution_options(**{READ_ONLY_OPTION: True})


def _configure_sqlite(engine: Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Let SQLAlchemy's "begin" event below issue BEGIN instead of the driver's implicit one.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS:d}")
            cursor.execute("PRAGMA foreign_keys = ON")
            _provide_ln(dbapi_connection, cursor)
            if engine.url.database not in (None, "", ":memory:") and _migrated(cursor):
                # only in a database kanfarm has migrated (WAL is a lasting property of the file):
                # a read-only command never changes a file it goes on to refuse
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection):
        if connection.get_execution_options().get(READ_ONLY_OPTION):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def _provide_ln(dbapi_connection, cursor) -> None:
    """``LN``, which the ``run_summary`` view's efficiency uses, is built into SQLite only when it
    was compiled with its math functions (3.35+, an option some Python builds leave out): where it
    is missing, the same function in Python (NULL outside its domain, as SQLite's)."""
    try:
        cursor.execute("SELECT ln(1)")
    except sqlite3.OperationalError:
        dbapi_connection.create_function("ln", 1, _ln, deterministic=True)


def _ln(x):
    try:
        return math.log(x) if x is not None and x > 0 else None
    except (TypeError, OverflowError):
        return None


def _migrated(cursor) -> bool:
    """Whether this SQLite database is at a kanfarm revision (another Alembic-managed application
    has an ``alembic_version`` table too). ``Store.upgrade`` reconnects after migrating, so a new
    database is switched to WAL as soon as it has one."""
    from kanfarm.store.migrate import KANFARM_TABLES, known_revisions

    cursor.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'")
    if cursor.fetchone() is None:
        return False
    cursor.execute("SELECT version_num FROM alembic_version")
    if not any(version in known_revisions() for (version,) in cursor.fetchall()):
        return False
    cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    return KANFARM_TABLES <= {name for (name,) in cursor.fetchall()}  # not another application's "0003"
