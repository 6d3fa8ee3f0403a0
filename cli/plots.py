"""``kanfarm report plot`` and ``kanfarm report html``: figures and the one-page report.

Kept out of cli/main.py; main adds them with ``register(report_app)``.
"""
from pathlib import Path
from typing import Optional

import typer

from cli.common import GridOpt, JsonOpt, grid_exists, handles_errors, open_store
from cli.output import console, emit_json, err_console, fail


def register(report_app: typer.Typer) -> None:
    @report_app.command("plot")
    @handles_errors
    def report_plot(grid: Optional[str] = GridOpt,
                    out: str = typer.Option(..., "--out", metavar="FOLDER", help="Folder for name.png and name.svg."),
                    as_json: bool = JsonOpt) -> None:
        """Figures (PNG and SVG) of every study question the grid has data for.

        With --json: {"grid", "written": [paths], "skipped": {figure: reason}} on stdout."""
        from kanfarm.reports.figures import build_figures, save_figures

        if not out.strip():  # as a Path, "" would be the current folder
            fail("--out: give a folder (. for the current one)")

        store = open_store()
        grid_exists(store, grid)
        built = build_figures(store, grid)
        if built.note:
            err_console.print(built.note, highlight=False, soft_wrap=True)
        try:
            paths = save_figures(built.figures, Path(out))
        except OSError as exc:
            fail(f"--out: cannot write to {out}: {exc.strerror or exc}")
        for name, reason in built.skipped.items():
            older = [p.name for p in (Path(out) / f"{name}.png", Path(out) / f"{name}.svg") if p.is_file()]
            left = f" ({' and '.join(older)} in {out} are from an earlier plot, left as they were)" if older else ""
            err_console.print(f"skipped {name}: {reason}{left}", highlight=False, soft_wrap=True)
        if as_json:
            emit_json({"grid": grid, "written": [str(p) for p in paths], "skipped": built.skipped})
        else:
            for path in paths:
                console.print(str(path), highlight=False, soft_wrap=True)
        if not paths:
            err_console.print("no figures written: nothing to plot yet", highlight=False, soft_wrap=True)

    @report_app.command("html")
    @handles_errors
    def report_html(grid: Optional[str] = GridOpt,
                    out: Path = typer.Option(Path("report.html"), "--out", metavar="FILE", help="The page to write."),
                    as_json: bool = JsonOpt) -> None:
        """One self-contained HTML page: figures, tables, grid spec, versions and hardware.

        With --json: {"grid", "written": path} on stdout."""
        from kanfarm.reports.html import write_html

        store = open_store()
        grid_exists(store, grid)
        try:
            write_html(store, grid, out)
        except OSError as exc:
            fail(f"--out: cannot write {out}: {exc.strerror or exc}")
        if as_json:
            emit_json({"grid": grid, "written": str(out)})
        else:
            console.print(f"wrote {out}", highlight=False, soft_wrap=True)
