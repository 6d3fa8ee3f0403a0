"""The study's figures from plain report rows.

Each figure function takes rows (``run_summary`` / report-table dicts) and returns a
``matplotlib.figure.Figure``, or raises :class:`NoData` saying what it lacks. Figures are built on
the Agg canvas directly, without pyplot: no global figure registry to leak or close, no display
needed, and a caller's own backend (say, a notebook's) is left alone.
"""
from __future__ import annotations

import io
import math
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import Formatter, LogFormatterSciNotation, MaxNLocator

from kanfarm.atomic import atomic_write
from kanfarm.reports import _plotdata as plotdata
from kanfarm.reports.tables import SETTING_COLUMNS, arch_order, efficiency_table, setting_of, with_settings

Row = dict[str, Any]
MODEL_COLOURS = {"kan": "C0", "mlp_wide": "C1", "mlp": "C2"}
MODEL_MARKERS = {"kan": "o", "mlp_wide": "^", "mlp": "s"}
TRAINER_COLOURS = {"backprop": "C0", "hsic": "C3"}
PANEL_SIZE = (4.8, 3.6)
#: the widest figure drawn (inches); one that needs more is left out, with the reason: a panel of
#: 2,400 bars was 135,000 pixels wide, took a minute and 1.3 GB, and could not be read anyway
MAX_WIDTH_IN = 40.0


class NoData(ValueError):
    """A figure has nothing to show; the message says what is missing."""


def _panel_width(items: int, per_item: float, what: str) -> float:
    """Width for a panel of ``items`` bars or boxes; NoData when it would exceed ``MAX_WIDTH_IN``."""
    width = max(6.4, 1.5 + per_item * items)
    if width > MAX_WIDTH_IN:
        raise NoData(f"{items} {what} in one panel, too many to draw readably (figures stop at "
                     f"{MAX_WIDTH_IN:g} in): narrow it with --grid")
    return width


def _figure(nrows: int = 1, ncols: int = 1, width: float | None = None) -> tuple[Figure, list[list[Any]]]:
    fig = Figure(figsize=(width or PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False).tolist()


def _colour(label: str) -> str:
    """By model (or by trainer on the backprop vs HSIC figure); anything else grey."""
    return MODEL_COLOURS.get(label.split(" (")[0]) or TRAINER_COLOURS.get(label) or "grey"


def _hatch(label: str) -> str | None:
    """HSIC-trained series of a model are hatched, so both trainers of a model share its colour."""
    return "//" if label.endswith("(hsic)") else None


def _grouped_bars(rows: list[Row], value: str, height: Callable[[list[float]], float],
                  series_of: Callable[[Row], str], ylabel: str, title: str, with_model: bool = False) -> Figure:
    """One panel per dataset; per group (architecture, with the model when ``with_model``, and the
    settings that vary, so that a bar only pools training schemes) one bar per series, whiskers
    from min to max over the runs (the training schemes) behind the bar."""
    extras = {d: plotdata.varying_settings(r for r in rows if r["dataset"] == d) for d in {r["dataset"] for r in rows}}

    def group_of(r: Row) -> str:
        arch = f"{r['model']}\n{plotdata.arch_label(r)}" if with_model else plotdata.arch_label(r)
        return arch + plotdata.settings_label(r, extras[r["dataset"]])

    sort_keys: dict[str, tuple] = {}
    for r in rows:
        sort_keys.setdefault(group_of(r), (arch_order(plotdata.arch_label(r)),
                                           plotdata.model_key(r["model"]) if with_model else (),
                                           tuple(plotdata.order_key(r.get(c)) for c in extras[r["dataset"]])))
    datasets = sorted({r["dataset"] for r in rows})
    groups = sorted(sort_keys, key=sort_keys.__getitem__)
    names = sorted({series_of(r) for r in rows}, key=_series_key)
    # as wide as the fullest panel's bars (not every group of every dataset times every series)
    bars = max(len({(group_of(r), series_of(r)) for r in rows if r["dataset"] == d}) for d in datasets)
    fig, axes = _figure(len(datasets), 1, width=_panel_width(bars, 0.45, "bars"))
    for (ax,), dataset in zip(axes, datasets):
        cells = plotdata.group([r for r in rows if r["dataset"] == dataset], lambda r: (group_of(r), series_of(r)))
        here = [g for g in groups if any((g, s) in cells for s in names)]
        width = 0.8 / max(sum((g, s) in cells for s in names) for g in here)
        labelled = set()
        for i, g in enumerate(here):
            present = [s for s in names if (g, s) in cells]
            for j, name in enumerate(present):
                values = [r[value] for r in cells[(g, name)]]
                h = height(values)
                x = i + (j - (len(present) - 1) / 2) * width
                ax.bar(x, h, width, color=_colour(name), hatch=_hatch(name),
                       label=None if name in labelled else name)
                ax.errorbar(x, h, yerr=[[h - min(values)], [max(values) - h]], fmt="none", ecolor="black",
                            capsize=3, linewidth=1)
                labelled.add(name)
        ax.set_xticks(range(len(here)), here)
        ax.set_title(dataset)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    fig.suptitle(textwrap.fill(title, 60))
    return fig


def _log_x(ax) -> None:
    """Log x axis labelled at the decades when two or more are in view, else at a few of the
    minor ticks (parameter counts within one decade had no number on the axis at all)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(_LogAxisLabels(major=True))
    ax.xaxis.set_minor_formatter(_LogAxisLabels(major=False))


class _LogAxisLabels(Formatter):
    """Decades as powers of ten, or, with fewer than two decades in view, ticks as short numbers
    ("3k", "25.4k"), thinned to about five spread along the axis (all of them would overlap)."""

    def __init__(self, major: bool):
        self.major = major
        self._decades = LogFormatterSciNotation()

    def set_axis(self, axis) -> None:
        super().set_axis(axis)
        self._decades.set_axis(axis)

    def __call__(self, x, pos=None) -> str:
        return self.format_ticks([x])[0]

    def format_ticks(self, values) -> list[str]:
        lo, hi = sorted(self.axis.get_view_interval())
        decades = [v for v in self.axis.get_majorticklocs() if lo <= v <= hi]
        if len(decades) >= 2:
            return self._decades.format_ticks(values) if self.major else [""] * len(values)
        ticks = sorted(v for v in [*decades, *self.axis.get_minorticklocs()] if lo <= v <= hi)
        gap, keep, last = math.log10(hi / lo) / 5, set(), None
        for v in ticks:  # greedy, left to right: each label at least a fifth of the axis after the last
            if last is None or math.log10(v / last) >= gap:
                keep.add(v)
                last = v
        kept = sorted(keep)
        digits = 3  # more where 3 would give two ticks one label ("23.7k" for 23,680 and 23,710)
        while digits < 7 and len({_short_number(v, digits) for v in kept}) < len(kept):
            digits += 1
        return [_short_number(v, digits) if v in keep else "" for v in values]


def _short_number(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, in k, M or G; the unit is chosen after rounding, so
    999,999 is "1M", not "1e+03k"."""
    rounded = float(f"{value:.{digits}g}")
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if rounded >= scale:
            return f"{rounded / scale:.{digits}g}{unit}"
    return f"{rounded:.{digits}g}"


def _series_key(label: str) -> tuple:
    model, _, trainer = label.partition(" (")
    return (plotdata.model_key(model), trainer)


def accuracy_bars(rows: Iterable[Row]) -> Figure:
    """Best test accuracy per model x depth (bar: the best scheme; whiskers: min-max over schemes)."""
    rows = plotdata.with_value(rows, "best_test_acc")
    if not rows:
        raise NoData("no finished run has a test accuracy")
    trainers = plotdata.several(rows, "trainer")
    return _grouped_bars(rows, "best_test_acc", max, lambda r: plotdata.series_label(r, trainers),
                         "best test accuracy", "Best test accuracy per model and depth (whiskers: min-max over schemes)")


def gap_bars(rows: Iterable[Row]) -> Figure:
    """Generalisation gap (train - test accuracy at the best epoch) per model x depth, median over
    schemes with min-max whiskers."""
    rows = plotdata.with_value(rows, "gap_at_best")
    if not rows:
        raise NoData("no finished run has a generalisation gap (train and test accuracy at its best epoch)")
    trainers = plotdata.several(rows, "trainer")
    return _grouped_bars(rows, "gap_at_best", statistics.median,
                         lambda r: plotdata.series_label(r, trainers), "train - test accuracy at best epoch",
                         "Generalisation gap per model and depth (bar: median, whiskers: min-max over schemes)")


def trainer_bars(rows: Iterable[Row]) -> Figure:
    """Backprop next to HSIC: best test accuracy per model x depth, one bar per trainer."""
    rows = plotdata.with_value(rows, "best_test_acc")
    found = sorted({r["trainer"] for r in rows})
    if not {"backprop", "hsic"} <= set(found):
        raise NoData(f"needs finished runs of both backprop and hsic (found: {', '.join(found) or 'none'})")
    return _grouped_bars(rows, "best_test_acc", max, lambda r: r["trainer"], "best test accuracy",
                         "Backprop vs HSIC: best test accuracy (whiskers: min-max over schemes)", with_model=True)


def sensitivity_boxes(rows: Iterable[Row]) -> Figure:
    """Best test accuracy over training schemes, one box per setting (model x depth, and activation,
    spline order, ... where those vary: ``tables.SETTING_COLUMNS``), one panel per dataset: a tall
    box means the model's result depends on the scheme."""
    rows = plotdata.with_value(rows, "best_test_acc")
    if not rows:
        raise NoData("no finished run has a test accuracy")
    trainers = plotdata.several(rows, "trainer")
    datasets = sorted({r["dataset"] for r in rows})
    cells = plotdata.group(rows, setting_of)  # dataset first
    most = max(sum(1 for c in cells if c[0] == d) for d in datasets)
    fig, axes = _figure(len(datasets), 1, width=_panel_width(most, 0.75, "boxes"))
    for (ax,), dataset in zip(axes, datasets):
        boxes = [runs for key, runs in cells.items() if key[0] == dataset]
        extras = plotdata.varying_settings(r for runs in boxes for r in runs)
        boxes.sort(key=lambda runs: (arch_order(plotdata.arch_label(runs[0])),
                                     _series_key(plotdata.series_label(runs[0], trainers)),
                                     tuple(map(str, setting_of(runs[0])))))
        parts = ax.boxplot([[r["best_test_acc"] for r in runs] for runs in boxes], patch_artist=True)
        labels = []
        for box, runs in zip(parts["boxes"], boxes):
            series = plotdata.series_label(runs[0], trainers)
            box.set_facecolor(_colour(series))
            box.set_hatch(_hatch(series))
            box.set_alpha(0.7)
            labels.append(f"{series}\n{plotdata.arch_label(runs[0])}{plotdata.settings_label(runs[0], extras)}"
                          .replace(" (", "\n("))
        ax.set_xticks(range(1, len(boxes) + 1), labels, fontsize="small")
        ax.set_title(dataset)
        ax.set_ylabel("best test accuracy")
    fig.suptitle("Sensitivity to the training scheme (init x optimiser x learning rate)")
    return fig


def efficiency_scatter(rows: Iterable[Row]) -> Figure:
    """Efficiency against parameter count, all datasets together: marker = model, colour = dataset."""
    rows = [r for r in rows if r.get("efficiency") is not None and r.get("n_params")]
    if not rows:
        raise NoData("no run has a defined efficiency (needs a finished run, a known intrinsic dimension "
                     "and more parameters than it)")
    datasets = sorted({r["dataset"] for r in rows})
    colours = {d: f"C{i % 10}" for i, d in enumerate(datasets)}
    fig, axes = _figure(1, 1, width=6.4)
    ax = axes[0][0]
    models = sorted({r["model"] for r in rows}, key=plotdata.model_key)
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        ax.scatter([r["n_params"] for r in mine], [r["efficiency"] for r in mine],
                   c=[colours[r["dataset"]] for r in mine], marker=MODEL_MARKERS.get(model, "D"),
                   label=model, alpha=0.8, edgecolors="black", linewidths=0.5)
    _log_x(ax)
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("efficiency: A / (t + 1) / ln(1 + N - ID)")
    handles = [Line2D([], [], linestyle="", marker=MODEL_MARKERS.get(m, "D"), color="grey", label=m) for m in models]
    handles += [Line2D([], [], linestyle="", marker="o", color=colours[d], label=d) for d in datasets]
    ax.legend(handles=handles, fontsize="small")
    ax.set_title("Efficiency against model size")
    return fig


def learning_curves(rows: Iterable[Row], epoch_rows: Iterable[Row]) -> Figure:
    """Train and test accuracy per epoch of the best and the worst run of each model (and trainer,
    when they are mixed) per dataset: one panel per dataset x series, each run labelled with its
    architecture and scheme. ``epoch_rows`` may hold other runs too; they are ignored."""
    picks = plotdata.extremes(rows)
    if not picks:
        raise NoData("no finished run has a test accuracy")
    curves = plotdata.group((m for m in epoch_rows), lambda m: m["run_id"])
    datasets = sorted({d for d, _ in picks})
    models = sorted({m for _, m in picks}, key=_series_key)
    fig, axes = _figure(len(datasets), len(models))
    for row_axes, dataset in zip(axes, datasets):
        for ax, model in zip(row_axes, models):
            if (dataset, model) not in picks:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"no finished {model} runs", ha="center", va="center", transform=ax.transAxes)
                continue
            best, worst = picks[(dataset, model)]
            runs = [("best", best, "C2")] + ([("worst", worst, "C3")] if worst is not best else [])
            last = 0
            for tag, run, colour in runs:
                points = sorted(curves.get(run["run_id"], []), key=lambda m: m["epoch"])
                last = max([last] + [m["epoch"] for m in points])
                label = (f"{tag}: #{run['run_id']} {plotdata.arch_label(run)} {run['optimizer']} lr={run['lr']:g} "
                         f"{run['init']}")
                if run.get("status") == "diverged":
                    label += " (diverged)"
                for column, style in (("train_acc", "--"), ("test_acc", "-")):
                    xy = [(m["epoch"], m[column]) for m in points if m[column] is not None]
                    # markers: a run that diverged after epoch 0 has a single point, no line
                    ax.plot([p[0] for p in xy], [p[1] for p in xy], style, color=colour, marker="o",
                            markersize=2.5, label=label if column == "test_acc" else None)
            ax.set_xlim(-0.5, max(last, 1) + 0.5)  # runs of epoch 0 alone had ticks at -0.045 ... 0.045
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{dataset} / {model}", fontsize="medium")
            ax.set_xlabel("epoch")
            ax.set_ylabel("accuracy")
            ax.legend(fontsize="x-small")
    fig.suptitle("Learning curves of the best and worst run (dashed: train, solid: test)")
    return fig


#: what a degree study varies (besides the schemes): everything else holds a study together
_DEGREE_AXES = ("spline_order", "hidden_widths", "depth")


def degree_rows(rows: Iterable[Row]) -> dict[tuple, list[Row]]:
    """The KAN runs of each degree study: one hidden layer, more than one spline order and more
    than one width, every other setting equal (activation, epochs, batch size, ...: runs that
    differ in one are separate studies, not schemes to take the best of). Keyed by (dataset,
    trainer, the other settings)."""
    kans = [r for r in plotdata.with_value(rows, "best_test_acc")
            if r["model"] == "kan" and r.get("hidden_widths") and "," not in r["hidden_widths"]]

    def study(r: Row) -> tuple:
        rest = tuple(repr(v) for c, v in zip(SETTING_COLUMNS, setting_of(r)) if c not in _DEGREE_AXES)
        return (r["dataset"], r["trainer"], rest)

    out = {}
    for key, runs in plotdata.group(kans, study).items():
        if plotdata.several(runs, "spline_order") and plotdata.several(runs, "hidden_widths"):
            out[key] = runs
    return out


def degree_vs_width(rows: Iterable[Row]) -> Figure:
    """KAN spline order against width: accuracy per order (one line per width), and the same points
    against parameter count, to see whether a higher degree buys what a wider layer does."""
    studies = degree_rows(rows)
    if not studies:
        raise NoData("no degree study: needs finished KAN runs with one hidden layer, more than one "
                     "spline_order and more than one width")
    fig, axes = _figure(len(studies), 2)
    extras = tuple(c for c in plotdata.varying_settings(r for runs in studies.values() for r in runs)
                   if c not in _DEGREE_AXES)
    for (left, right), ((dataset, trainer, _), runs) in zip(axes, sorted(studies.items())):
        for i, (width, mine) in enumerate(sorted(plotdata.group(runs, lambda r: int(r["hidden_widths"])).items())):
            best = {}
            for r in mine:  # best scheme per order
                if r["spline_order"] not in best or r["best_test_acc"] > best[r["spline_order"]]["best_test_acc"]:
                    best[r["spline_order"]] = r
            points = [best[k] for k in sorted(best)]
            acc = [r["best_test_acc"] for r in points]
            left.plot([r["spline_order"] for r in points], acc, "o-", color=f"C{i % 10}", label=f"width {width}")
            right.plot([r["n_params"] for r in points], acc, "o-", color=f"C{i % 10}", label=f"width {width}")
        left.set_xlabel("spline order (degree)")
        right.set_xlabel("parameters (log scale)")
        left.xaxis.set_major_locator(MaxNLocator(integer=True))
        _log_x(right)
        setting = plotdata.settings_label(runs[0], extras).strip().replace("\n", ", ")
        for ax in (left, right):
            ax.set_ylabel("best test accuracy")
            ax.set_title(f"{dataset} ({trainer})" + (f", {setting}" if setting else ""))
            ax.legend(fontsize="small")
    fig.suptitle("KAN degree versus width (one hidden layer)")
    return fig


# -- from the store -----------------------------------------------------------------------------

@dataclass
class FigureSet:
    """Built figures by name, the figures left out with the reason, and what the grid still lacks."""

    figures: dict[str, Figure] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    note: str | None = None


def build_figures(store, grid: str | None = None) -> FigureSet:
    """Every figure the grid has data for; the others go to ``skipped`` with the reason."""
    out = FigureSet(note=plotdata.missing_note(store.status_counts(grid), grid))
    rows = with_settings(store, grid)  # the view's rows, plus the settings only the configs hold
    picks = plotdata.extremes(rows)
    epochs = [m for best, worst in picks.values() for run in {best["run_id"], worst["run_id"]}
              for m in store.epoch_metrics(run_id=run)]
    makers: dict[str, Callable[[], Figure]] = {
        "accuracy": lambda: accuracy_bars(rows),
        "sensitivity": lambda: sensitivity_boxes(rows),
        "efficiency": lambda: efficiency_scatter(efficiency_table(store, grid)),
        "gap": lambda: gap_bars(rows),
        "learning_curves": lambda: learning_curves(rows, epochs),
        "trainers": lambda: trainer_bars(rows),
        "degree": lambda: degree_vs_width(rows),
    }
    for name, make in makers.items():
        try:
            out.figures[name] = make()
        except NoData as exc:
            out.skipped[name] = str(exc)
    return out


def figure_bytes(fig: Figure, fmt: str, dpi: int = 100) -> bytes:
    """The figure as PNG or SVG bytes; no creation date in SVGs, so equal data give equal files."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=dpi, metadata={"Date": None} if fmt == "svg" else None)
    return buffer.getvalue()


def save_figures(figures: dict[str, Figure], out_dir: str | Path) -> list[Path]:
    """Write each figure as PNG and SVG into ``out_dir`` (created only when there is one)."""
    if not figures:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        for fmt in ("png", "svg"):
            path = out / f"{name}.{fmt}"
            atomic_write(path, figure_bytes(fig, fmt))
            paths.append(path)
    return paths
