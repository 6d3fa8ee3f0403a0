"""What every command module shares: options, error handling, opening the store, validation.

Bad input exits with code 2 and a message naming the field (see ``cli.output.fail``).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import typer

from cli.output import fail

GridOpt = typer.Option(None, "--grid", help="Only runs of this grid (default: all).")
JsonOpt = typer.Option(False, "--json", help="Machine-readable JSON on stdout.")
CsvOpt = typer.Option(False, "--csv", help="CSV on stdout.")


def handles_errors(func: Callable) -> Callable:
    """Turn the library's expected failures into one-line messages and exit codes."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from kanfarm.config import ConfigError
        from kanfarm.data import DatasetUnavailable
        from kanfarm.store import SchemaOutOfDate

        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            fail(f"invalid {exc}")
        except SchemaOutOfDate as exc:
            fail(str(exc), code=2)
        except DatasetUnavailable as exc:
            fail(str(exc), code=1)

    return wrapper


def open_store(check: bool = True):
    from kanfarm.store import Store

    store = Store()
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
