"""Rendering rows for people (a Rich table) or programs (JSON, CSV), and errors with exit codes."""
from __future__ import annotations

import csv
import io
import json
import math
import sys
from typing import Any, Iterable, Iterator, NoReturn, TextIO

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Markup off: grid names, spec paths, field values and table cells are the user's text, and Rich
# would read "[/]" or "[red]" in them as markup (a crash, or silently changed output).
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """Exit with ``code`` (2: bad input) and a one-line message on stderr."""
    err_console.print(Text("error: ", style="bold red") + Text(message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=_json_default)


def json_array_chunks(rows: Iterable[Any]) -> Iterator[str]:
    """``to_json(list(rows))`` in pieces, one row at a time: a long export is never one string."""
    first = True
    for row in rows:
        yield ("[\n  " if first else ",\n  ") + to_json(row).replace("\n", "\n  ")
        first = False
    yield "[]" if first else "\n]"


def to_csv(rows: list[dict[str, Any]], columns: Iterable[str] | None = None) -> str:
    """CSV with a header row: ``columns`` when given (so that no rows still give a header), else
    the first row's keys."""
    buffer = io.StringIO()
    columns = list(columns) if columns is not None else list(rows[0]) if rows else []
    write_csv(buffer, rows, columns)
    return buffer.getvalue()


def write_csv(out: TextIO, rows: Iterable[dict[str, Any]], columns: Iterable[str]) -> None:
    """CSV of ``rows`` (lists and dicts as JSON) under a header of ``columns``, row by row."""
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in row.items()})


def emit_rows(rows: list[dict[str, Any]], *, title: str, as_json: bool = False, as_csv: bool = False,
              columns: Iterable[str] | None = None, empty: str = "no finished runs match") -> None:
    if as_json and as_csv:
        fail("--json and --csv exclude each other")
    if as_json:
        sys.stdout.write(to_json(rows) + "\n")
        return
    if as_csv:
        sys.stdout.write(to_csv(rows, columns if not rows else None))
        return
    if not rows:
        console.print(f"{title}: no rows ({empty}).")
        return
    cols = list(columns or rows[0])
    cells = [[_cell(row.get(c)) for c in cols] for row in rows]
    table = Table(title=title, show_lines=False)
    for c in cols:
        table.add_column(c, no_wrap=True)
    for line in cells:
        table.add_row(*line)
    # Columns keep their natural width (a squeezed table of 20 columns is unreadable): wider than
    # the terminal, lines run on (use --csv / --json, or a pager such as `less -S`).
    natural = sum(max(len(c), *(len(line[i]) for line in cells)) + 3 for i, c in enumerate(cols)) + 1
    width = console.width
    console.width = max(width, natural)
    try:
        console.print(table, crop=False)
    finally:
        console.width = width
