"""Plain-row helpers shared by the figures and the HTML page: labels, orderings, the picks of the
learning-curve figure, and the note on what is still missing. No matplotlib here."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

from kanfarm.reports.tables import MODEL_ORDER, REPORTED, SETTING_COLUMNS, unused_settings

Row = dict[str, Any]


def finished(rows: Iterable[Row]) -> list[Row]:
    return [r for r in rows if r.get("status") in REPORTED]


def with_value(rows: Iterable[Row], column: str) -> list[Row]:
    """Finished runs that have ``column`` (a run that diverged at once has no best accuracy)."""
    return [r for r in finished(rows) if r.get(column) is not None]


def arch_label(row: Row) -> str:
    """The depth preset's name, else the hidden widths: the same network reads the same everywhere."""
    return row.get("depth") or f"[{row.get('hidden_widths') or ''}]"


#: short names of the settings that can tell two boxes of one model and depth apart.
_SETTING_NAMES = {"activation": "", "spline_order": "k=", "grid_size": "G=", "batch_size": "batch ",
                  "max_epochs": "epochs ", "batch_norm": "batch norm ", "dropout": "dropout ",
                  "wide_multiplier": "wide x", "patience": "patience ", "train_eval_size": "train eval ",
                  "hsic_beta": "beta ", "hsic_sigma": "sigma ", "hsic_x_term": "X term ",
                  "hsic_format_epochs": "format epochs ", "matmul_precision": "", "dataset_options": ""}


def varying_settings(rows: Iterable[Row]) -> tuple[str, ...]:
    """The settings beyond model, widths and trainer that take more than one value among the
    ``rows`` of one model, widths and trainer (a KAN's GELU next to an MLP's ReLU is no variation)."""
    same = group(rows, lambda r: (r.get("model"), r.get("hidden_widths"), r.get("trainer"))).values()
    return tuple(c for c in SETTING_COLUMNS if c in _SETTING_NAMES and any(several(g, c) for g in same))


def text(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in sorted(value.items())) or "default options"
    return str(value)


def order_key(value: Any) -> tuple:
    """Sorts setting values as numbers when they are numbers (k=2 before k=10), else as text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, text(value))


def settings_label(row: Row, columns: tuple[str, ...]) -> str:
    """``row``'s values of ``columns`` as a label suffix ("" when none vary), without those its
    model and trainer do not use (a plain MLP's bar is not labelled with a spline order)."""
    unused = unused_settings(row)
    return "".join(f"\n{_SETTING_NAMES[c]}{text(row.get(c))}" for c in columns if c not in unused)


def model_key(model: str) -> tuple:
    return (MODEL_ORDER.get(model, 9), model)


def several(rows: Iterable[Row], column: str) -> bool:
    return len({text(r.get(column)) for r in rows}) > 1


def series_label(row: Row, show_trainer: bool) -> str:
    """Model name, plus the trainer when a grid mixes trainers (their bars must not be merged)."""
    return f"{row['model']} ({row['trainer']})" if show_trainer else row["model"]


def group(rows: Iterable[Row], key: Callable[[Row], Any]) -> dict[Any, list[Row]]:
    out: dict[Any, list[Row]] = defaultdict(list)
    for r in rows:
        out[key(r)].append(r)
    return dict(out)


def extremes(rows: Iterable[Row]) -> dict[tuple[str, str], tuple[Row, Row]]:
    """(dataset, series) -> (best run, worst run) by best test accuracy; ties go to the lower id.
    A series is the model, with its trainer when the rows mix trainers (``series_label``): an
    HSIC run is not the "best" of the backprop ones."""
    rows = with_value(rows, "best_test_acc")
    trainers = several(rows, "trainer")
    picks = {}
    for key, runs in group(rows, lambda r: (r["dataset"], series_label(r, trainers))).items():
        best = max(runs, key=lambda r: (r["best_test_acc"], -r["run_id"]))
        worst = min(runs, key=lambda r: (r["best_test_acc"], r["run_id"]))
        picks[key] = (best, worst)
    return picks


def missing_note(counts: dict[str, int], grid: str | None = None) -> str | None:
    """What a report cannot show yet, from the runs per status; None once every run has finished."""
    total = sum(counts.values())
    where = f"grid {grid!r}" if grid else "the database"
    if total == 0:
        return f"no runs in {where} yet: submit a grid first"
    done = sum(counts.get(s, 0) for s in REPORTED)
    rest = ", ".join(f"{n} {status}" for status, n in counts.items() if n and status not in REPORTED)
    if done == 0:
        return f"no finished runs yet: {rest}"
    if rest:
        return (f"{done} of {total} runs finished; the figures and the efficiency, gap and sensitivity "
                f"tables leave out {rest} (the summary lists them, with their results so far)")
    return None
