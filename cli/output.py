"""Rendering rows for people (a Rich table) or programs (JSON, CSV), and errors with exit codes."""
from __future__ import annotations

import csv
import io
import json
import math
import sys
import threading
import time
import unicodedata
from contextlib import contextmanager
from decimal import Decimal
from typing import Any, Iterable, Iterator, NoReturn, TextIO

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from kanfarm.config import UNSEEN_CATEGORIES

# Markup off: grid names, spec paths, field values and table cells are the user's text, and Rich
# would read "[/]" or "[red]" in them as markup (a crash, or silently changed output).
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)
#: work that lasts longer than this, out of a terminal, says what it is doing (and then that it is done)
SAY_AFTER_S = 2.0


@contextmanager
def working(text: str) -> Iterator[None]:
    """A spinner saying ``text`` on a terminal. Elsewhere (a log file, a pipe, compose's logs) a
    spinner shows nothing, so work that lasts more than ``SAY_AFTER_S`` says ``text`` once, and how
    long it took when it ends: seconds of silence otherwise look like a hang."""
    if err_console.is_terminal:
        with err_console.status(Text(text)):
            yield
        return
    started = time.monotonic()
    said = threading.Event()

    def say() -> None:
        err_console.print(f"{text} ...", highlight=False, soft_wrap=True)
        said.set()

    timer = threading.Timer(SAY_AFTER_S, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
    if said.is_set():
        err_console.print(f"{text}: done in {time.monotonic() - started:.1f} s", highlight=False, soft_wrap=True)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python's warnings (a dataset cache that could not be read or written) as one ``warning:``
    line, not kanfarm's file and line and a source line the user did not write."""
    err_console.print(Text("warning: ", style="yellow") + Text(visible(str(message))), highlight=False,
                      soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Exit with ``code`` (2: bad input) and a one-line message on stderr."""
    err_console.print(Text("error: ", style="bold red") + Text(visible(message, keep="\n\t")), highlight=False,
                      soft_wrap=True)
    raise typer.Exit(code)


def visible(text: str, keep: str = "") -> str:
    r"""``text`` with its unseen characters, but those in ``keep``, as escapes (``\x1b``): stored
    text (a grid name written through the library, not the CLI) reaches the terminal inert."""
    if text.isprintable():
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(ch) in UNSEEN_CATEGORIES and ch not in keep else ch for ch in text)


def use_escapes_where_unencodable() -> None:
    """On a terminal or pipe whose encoding lacks a character (ASCII, Latin-1), write it as an
    escape rather than fail with UnicodeEncodeError after half the output."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and getattr(stream, "errors", None) == "strict":
            reconfigure(errors="backslashreplace")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    if isinstance(value, (list, tuple)):
        return ",".join(visible(str(v)) for v in value)
    return visible(str(value))


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, Decimal):  # PostgreSQL's numeric (an AVG of integers): a number, not a string
        return float(value)
    return str(value)


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=_json_default)


def emit_json(data: Any) -> None:
    """``data`` as one JSON document on stdout (what every ``--json`` prints)."""
    sys.stdout.write(to_json(data) + "\n")


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
        emit_json(rows)
        return
    if as_csv:
        sys.stdout.write(to_csv(rows, columns if not rows else None))
        return
    if not rows:
        console.print(f"{title}: no rows ({empty}).")
        return
    cols = list(columns or rows[0])
    values = [[row.get(c) for c in cols] for row in rows]
    console.file.write(render_table(title, cols, values, unicode=console.encoding.startswith("utf")))


#: the box's characters: heavy head over light body, as Rich draws tables; ASCII for other encodings
_BOX = {True: "┏┳┓━┃┡╇┩│└┴┘─", False: "+++=|+++|+++-"}


def render_table(title: str, columns: list[str], values: list[list[Any]], unicode: bool = True) -> str:
    """A boxed text table, numbers right-aligned, every column at its natural width.

    Drawn here rather than by Rich's ``Table``, which measures and styles every cell: 20,000 runs x
    22 columns took 81 s there (a whole study's summary), plain joins take well under a second.
    Columns are never squeezed (a squeezed table of 20 columns is unreadable): wider than the
    terminal, lines run on (use --csv / --json, or a pager such as ``less -S``)."""
    cells = [[_cell(v) for v in line] for line in values]
    right = [all(isinstance(line[i], (int, float)) and not isinstance(line[i], bool) or line[i] is None
                 for line in values) for i in range(len(columns))]
    widths = [max([cell_len(c)] + [cell_len(line[i]) for line in cells]) for i, c in enumerate(columns)]

    def row(texts: list[str], bar: str, align: list[bool]) -> str:
        padded = [" " * (w - cell_len(t)) + t if r else t + " " * (w - cell_len(t))
                  for t, w, r in zip(texts, widths, align)]
        return bar + " " + f" {bar} ".join(padded) + " " + bar + "\n"

    def rule(left: str, mid: str, end: str, line: str) -> str:
        return left + mid.join(line * (w + 2) for w in widths) + end + "\n"

    b = _BOX[unicode]
    total = sum(w + 3 for w in widths) + 1
    out = [visible(title).center(total).rstrip() + "\n", rule(b[0], b[1], b[2], b[3]),
           row(list(columns), b[4], right), rule(b[5], b[6], b[7], b[3])]
    out.extend(row(line, b[8], right) for line in cells)
    out.append(rule(b[9], b[10], b[11], b[12]))
    return "".join(out)
