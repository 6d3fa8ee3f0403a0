"""One self-contained HTML report: figures as base64 PNG, the tables, the grid spec, versions and
hardware. No external CSS, JS or fonts, so the page opens offline and can be mailed as one file.
Every text from the database is escaped."""
from __future__ import annotations

import base64
import json
import os
import platform
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

import kanfarm
from kanfarm.atomic import atomic_write
from kanfarm.reports.figures import build_figures, figure_bytes
from kanfarm.reports.tables import efficiency_table, gap_table, sensitivity_table, summary_table

TABLES = {"summary": summary_table, "gap": gap_table, "efficiency": efficiency_table,
          "sensitivity": sensitivity_table}
CAPTIONS = {
    "accuracy": "Best test accuracy per model and depth; whiskers span the training schemes.",
    "sensitivity": "Best test accuracy over training schemes (sensitivity to init, optimiser, learning rate).",
    "efficiency": "Efficiency against parameter count, all datasets together.",
    "gap": "Generalisation gap (train - test accuracy at the best epoch) per model and depth.",
    "learning_curves": "Train and test accuracy per epoch of the best and worst run of each model.",
    "trainers": "Backprop next to the HSIC Bottleneck.",
    "degree": "KAN spline order versus width (one hidden layer).",
}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1, h2 { font-weight: 600; }
.note { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.6em 1em; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
.scroll { overflow-x: auto; max-height: 32em; overflow-y: auto; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; position: sticky; top: 0; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
"""


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def html_table(rows: list[dict[str, Any]], table_id: str) -> str:
    if not rows:
        return f'<p id="{escape(table_id)}">no rows yet</p>'
    columns = list(rows[0])
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(_cell(r.get(c)))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return (f'<div class="scroll"><table id="{escape(table_id)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def environment() -> dict[str, Any]:
    """Versions and hardware of the machine writing the report (workers may have run elsewhere)."""
    info: dict[str, Any] = {"kanfarm": kanfarm.__version__, "python": platform.python_version(),
                            "platform": platform.platform(), "machine": platform.machine(),
                            "processor": platform.processor() or "unknown", "cpu_count": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:
        info["torch"] = "not installed"
    return info


def _specs(store, grid: str | None) -> str:
    if grid is not None:
        row = store.grid(grid)
        data: Any = None if row is None else row.spec
    else:
        data = {g.name: g.spec for g in store.grids()}
    return "(no grid stored)" if not data else json.dumps(data, indent=2, sort_keys=True, default=str)


def _runs_beyond_spec(store, grid: str | None) -> int:
    """``runs_beyond_spec`` of the grid's stored spec (0 when that no longer parses, as an older
    version's may not)."""
    from kanfarm.config import ConfigError
    from kanfarm.grids import parse_spec
    from kanfarm.submission import runs_beyond_spec

    row = store.grid(grid) if grid is not None else None
    if row is None:
        return 0
    try:
        spec = parse_spec(row.spec)
    except ConfigError:
        return 0
    return runs_beyond_spec(store, spec)


def _dl(info: dict[str, Any]) -> str:
    return "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in info.items()) + "</dl>"


class _ReadOnce:
    """The store, with each grid's ``summary`` (the run_summary view) and ``run_configs`` read
    once: the page's figures and its four tables all start from them, and on a large database the
    view is what takes the time. The rows are shared: the reports copy what they change."""

    def __init__(self, store):
        self._store, self._read = store, {}

    def _once(self, method: str, grid: str | None):
        if (method, grid) not in self._read:
            self._read[method, grid] = getattr(self._store, method)(grid)
        return self._read[method, grid]

    def summary(self, grid: str | None = None):
        return self._once("summary", grid)

    def run_configs(self, grid: str | None = None):
        return self._once("run_configs", grid)

    def __getattr__(self, name: str):
        return getattr(self._store, name)


def render_html(store, grid: str | None = None) -> str:
    """The whole page as a string."""
    store = _ReadOnce(store)
    built = build_figures(store, grid)
    title = f"kanfarm report: {grid or 'all grids'}"
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>{escape(title)}</h1>",
             f"<p>generated {escape(datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}; runs per status: "
             f"{escape(', '.join(f'{n} {s}' for s, n in store.status_counts(grid).items() if n) or 'none')}</p>"]
    if built.note:
        parts.append(f'<p class="note" id="missing">{escape(built.note)}</p>')
    parts.append('<h2 id="figures">Figures</h2>')
    for name, fig in built.figures.items():
        data = base64.b64encode(figure_bytes(fig, "png")).decode("ascii")
        caption = CAPTIONS.get(name, name)
        parts.append(f'<figure><img id="fig-{escape(name)}" alt="{escape(caption)}" '
                     f'src="data:image/png;base64,{data}"><figcaption>{escape(caption)}</figcaption></figure>')
    if built.skipped:
        items = "".join(f"<li><b>{escape(n)}</b>: {escape(r)}</li>" for n, r in built.skipped.items())
        parts.append(f'<p>Figures left out:</p><ul id="skipped">{items}</ul>')
    for name, table in TABLES.items():
        parts.append(f'<h2>{escape(name.capitalize())} table</h2>')
        parts.append(html_table(table(store, grid), f"table-{name}"))
    parts.append(f'<h2>Grid spec</h2><pre id="spec">{escape(_specs(store, grid))}</pre>')
    beyond = _runs_beyond_spec(store, grid)
    if beyond:
        parts.append(f'<p class="note" id="beyond-spec">The grid also holds {beyond} runs that are not cells of '
                     f'this spec: cells of an earlier version of it, submitted under the same name. The tables '
                     f'and figures include them.</p>')
    parts.append(f'<h2>Versions and hardware</h2><p>of the machine that wrote this report</p><div id="environment">{_dl(environment())}</div>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html(store, grid: str | None, path: str | Path) -> Path:
    """Render and write the page atomically (a browser never loads half a page)."""
    path = Path(path)
    atomic_write(path, render_html(store, grid).encode("utf-8"))
    return path

