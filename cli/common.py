"""What every command module shares: options, error handling, opening the store, validation.

Bad input exits with code 2 and a message naming the field (see ``cli.output.fail``).
"""
from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Any, Callable

import typer

from cli.output import fail, working

def grid_name(value: str | None) -> str | None:
    """``--grid``'s value as grid names are stored (``kanfarm.config.grid_name``)."""
    from kanfarm.config import grid_name as stored_form

    return None if value is None else stored_form(value)


GridOpt = typer.Option(None, "--grid", metavar="NAME", help="Only runs of this grid (default: all).", callback=grid_name)
JsonOpt = typer.Option(False, "--json", help="Machine-readable JSON on stdout.")
SpecArg = typer.Argument(..., metavar="SPEC", help="A TOML spec file or a preset name.")


def command_group(help: str, **options: Any) -> typer.Typer:
    """A group of commands, its help in click's plain layout (Typer's rich one shows flags as ``<bool>``)."""
    return typer.Typer(no_args_is_help=True, rich_markup_mode=None, help=help, **options)
CsvOpt = typer.Option(False, "--csv", help="CSV on stdout.")


def read_spec(spec: str):
    """The GridSpec of a file or preset, every cell checked (a spinner meanwhile: seconds for a
    large grid). Nothing is written."""
    from kanfarm.grids import load_spec

    with working(f"reading and checking every cell of {spec}"):
        grid = load_spec(spec)
        grid.expand()
    return grid


def submit_spec(store, grid):
    """Store every cell of ``grid`` (a GridSpec, from ``read_spec``); warns when the grid already
    holds runs that are not cells of this spec. Returns the submission result."""
    from cli.output import err_console
    from kanfarm.submission import runs_beyond_spec, submit

    with working(f"storing the cells of grid {grid.name}"):
        result = submit(store, grid)
    others = runs_beyond_spec(store, grid)
    if others:  # a spec (or preset) changed under the same name: its old cells stay in the grid
        err_console.print(f"warning: grid {grid.name} also holds {others} runs that are not cells of this "
                          f"spec (an earlier version of it); its reports include them and `run grid` trains them. Submit under "
                          f"another name to keep them apart.", highlight=False, soft_wrap=True)
    return result


#: SQLite's words for a file that is not (or no longer) a database
_NOT_A_DATABASE = ("file is not a database", "database disk image is malformed")
#: how psycopg words libpq's refusal of a URL option's value (a port, an sslmode) before connecting
_URL_REFUSED = ("connection is bad: invalid ",)


def handles_errors(func: Callable) -> Callable:
    """Turn the library's expected failures into one-line messages and exit codes."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from sqlalchemy.exc import DatabaseError, OperationalError, ProgrammingError

        from kanfarm.config import ConfigError
        from kanfarm.data import DatasetFormatError, DatasetUnavailable
        from kanfarm.store import DatabaseFileReplaced, SchemaOutOfDate

        try:
            result = func(*args, **kwargs)
            sys.stdout.flush()  # here, not at exit: a full disk under stdout is then an error below
            return result
        except ConfigError as exc:
            fail(f"invalid {exc}")
        except SchemaOutOfDate as exc:
            fail(str(exc), code=2)
        except DatabaseFileReplaced as exc:
            fail(str(exc), code=1)
        except (DatasetUnavailable, DatasetFormatError) as exc:
            fail(str(exc), code=1)
        except OperationalError as exc:  # the driver's own words name no password
            first = str(exc.orig or exc).strip().splitlines()[0]
            if first.startswith(_URL_REFUSED):
                fail(f"{_url_text()}: the driver refused the URL: {first}", code=2)
            fail(f"database unavailable ({_url_text()}): {first}", code=1)
        except DatabaseError as exc:
            first = str(exc.orig or exc).strip().splitlines()[0]
            if any(words in first for words in _NOT_A_DATABASE):
                fail(f"{_url_text()}: not a usable kanfarm database: {first}", code=2)
            if isinstance(exc, ProgrammingError) and exc.statement is None:  # while connecting: an option
                fail(f"{_url_text()}: the driver refused the URL: {first}", code=2)  # the driver does not take
            raise  # a constraint or a bug: its traceback is the useful part
        except OSError as exc:
            if exc.errno not in _OUTPUT_FAULTS:
                raise
            # a full disk or a closed pipe under the output (``> file``, ``| head``): one line, not
            # Rich's traceback; stdout itself may be what cannot be written, so nothing more goes there
            if exc.errno == errno.EPIPE and exc.filename is None and _stdout_reader_gone():
                _stdout_gone()  # `| head`: the reader has what it wanted, nothing to say
                raise typer.Exit(1)
            if exc.filename is None:
                _stdout_gone()
            fail(f"{exc.filename or 'standard output'} cannot be written ({exc.strerror})", code=1)

    return wrapper


#: errors of where a command writes (``> file`` on a full disk, a pipe closed by ``head``)
_OUTPUT_FAULTS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EPIPE, errno.EROFS))


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader closed it (another pipe's EPIPE is an error to show)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no real descriptor (a test's captured stdout)
        return False


def _stdout_gone() -> None:
    """Point stdout at /dev/null: what is still buffered for it can never be written, and the
    interpreter's flush at exit would raise again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (a test's captured stdout)
        pass


def _url_text() -> str:
    from kanfarm.store.engine import URL_ENV, database_url, masked

    try:
        return f"{URL_ENV}={masked(database_url())}"
    except Exception:
        return URL_ENV


def open_store(check: bool = True):
    """The Store of ``$KANFARM_DATABASE_URL``. With ``check`` (every command but the ones that
    create the schema) it must exist and be migrated: a SQLite file that is not there is refused
    before it would be created empty."""
    from sqlalchemy.exc import NoSuchModuleError

    from kanfarm.store import Store
    from kanfarm.store.engine import URL_ENV
    from kanfarm.store.url import checked_database_url, missing_sqlite_file

    url = checked_database_url()
    if check and (path := missing_sqlite_file(url)):
        fail(f"no database at {path} ({URL_ENV}): run `kanfarm db upgrade` to create it")
    try:
        store = Store(url)
    except (NoSuchModuleError, ImportError) as exc:
        fail(f"{URL_ENV}: no database driver for {url.drivername} ({type(exc).__name__}: {exc})")
    if check:
        store.check_schema()
    return store


def grid_exists(store, grid: str | None) -> None:
    if grid is not None and store.grid(grid) is None:
        names = ", ".join(g.name for g in store.grids()) or "none yet"
        fail(f"--grid: no grid named {grid!r} (known: {names})")


def parse_pack_size(value: str) -> int | str:
    """``--pack-size``: a positive integer or ``auto``."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        fail(f"--pack-size: {value!r} is not a positive integer or auto")
    return size
