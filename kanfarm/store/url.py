"""The database URL's checks, made before anything connects or is written.

A bad URL otherwise surfaced as a driver traceback at the first connection, or (a SQLite path in a
missing folder, an in-memory database) as a store that keeps nothing. Each refusal is a
``ConfigError`` naming ``KANFARM_DATABASE_URL``; a URL that may hold a password is never echoed.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SAWarning

from kanfarm.config import ConfigError
from kanfarm.store.engine import URL_ENV, database_url, masked


def _refuse(message: str) -> None:
    raise ConfigError(URL_ENV, message)


def checked_database_url(url: str | URL | None = None) -> URL:
    """``database_url(url)`` (default ``$KANFARM_DATABASE_URL``), refused unless it is a SQLite or
    PostgreSQL URL whose parts and options its driver takes."""
    try:
        url = database_url(url)
    except (ArgumentError, ValueError):  # not echoed: an unparsable URL may still hold a password
        _refuse("not a database URL (sqlite:///path/to.db or postgresql+psycopg://user@host/db)")
    if url.host and "@" in url.host:  # not echoed: the host holds part of the password
        _refuse("the host part holds '@': write an '@' in the password as %40")
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        _refuse(f"unsupported database {masked(url)}: use sqlite or postgresql")
    if url.port is not None and not 0 < url.port < 65536:
        _refuse(f"port {url.port} is not a port number (1-65535)")
    if url.get_backend_name() == "sqlite":
        _check_sqlite(url)
    _check_driver_options(url)
    return url


def _check_sqlite(url: URL) -> None:
    """A SQLite URL's file, refused here rather than as "database unavailable"."""
    if url.database in (None, "", ":memory:"):
        _refuse("an in-memory SQLite database keeps nothing between commands: give a file (sqlite:///path/to.db)")
    if str(url.query.get("uri", "")).lower() in ("true", "1"):
        _refuse("SQLite URI filenames (uri=true) are not supported: give a path (sqlite:///path/to.db)")
    path = Path(url.database)
    if path.is_dir():
        _refuse(f"{url.database} is a folder, not a database file")
    if not path.absolute().parent.is_dir():
        _refuse(f"no folder {str(path.absolute().parent)!r} for the database file")


def _check_driver_options(url: URL) -> None:
    """The URL's query options as the driver's dialect reads them (a port or timeout that is no
    number, an option SQLite's driver would ignore). A driver that is not installed is left to the
    store's construction."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", SAWarning)  # an option the driver would ignore
        try:
            url.get_dialect()().create_connect_args(url)
        except (NoSuchModuleError, ImportError):
            return
        except SAWarning as exc:
            _refuse(str(exc).splitlines()[0])
        except (ArgumentError, ValueError, TypeError) as exc:
            _refuse(f"a query option's value: {str(exc).splitlines()[0]}")


def missing_sqlite_file(url: URL) -> str | None:
    """The path of a SQLite database file that does not exist yet, else None."""
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
            and not Path(url.database).is_file():
        return url.database
    return None
