"""The study's questions as tables: rows of plain dicts built on the ``run_summary`` view.

Per-run figures come straight from the view (SQL a user can write too); only the statistics SQL
cannot say portably (median, IQR, overfitting onset) are computed here.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from typing import Any, Iterable, Protocol

from kanfarm.reports.efficiency import KNOWN_INTRINSIC_DIM, efficiency

#: statuses of the runs that reports count: those that trained to their end
REPORTED = ("completed", "diverged")
CONFIG_COLUMNS = ("run_id", "dataset", "model", "depth", "hidden_widths", "trainer", "init", "optimizer", "lr",
                  "activation", "spline_order", "grid_size", "seed", "n_params", "status")
#: config fields the view does not hold that also fix a setting (``with_settings`` adds them).
CONFIG_SETTINGS = ("batch_norm", "dropout", "wide_multiplier", "patience", "train_eval_size", "hsic_beta",
                   "hsic_sigma", "hsic_x_term", "hsic_format_epochs", "matmul_precision", "dataset_options")
#: what fixes the setting a scheme is tried in: runs that differ in any of these are never pooled
#: (an ELU KAN, a degree-5 KAN or a KAN with batch norm is another model, not another scheme).
SETTING_COLUMNS = ("dataset", "model", "depth", "hidden_widths", "trainer", "activation", "spline_order",
                   "grid_size", "batch_size", "max_epochs", *CONFIG_SETTINGS)
#: rows sort so that each KAN stands next to its parameter-matched MLP-Wide, then the plain MLP.
MODEL_ORDER = {"kan": 0, "mlp_wide": 1, "mlp": 2}


class SummarySource(Protocol):
    def summary(self, grid: str | None = None) -> list[dict[str, Any]]: ...

    def run_configs(self, grid: str | None = None) -> dict[int, dict[str, Any]]: ...

    def lowest_test_acc_after_best(self, grid: str | None = None) -> dict[int, float]: ...

    def grid(self, name: str) -> Any: ...


def _finished(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] in REPORTED]


def _pick(row: dict[str, Any], columns: Iterable[str]) -> dict[str, Any]:
    """``columns`` of ``row``, those its model and trainer do not use empty: an MLP's spline order
    and grid size are stored at their defaults, and would read as settings. (The view holds no
    ``wide_multiplier``: an MLP-Wide shows the settings of the KAN it is matched to.)"""
    picked = {c: row.get(c) for c in columns}
    picked.update(dict.fromkeys(c for c in unused_settings(row) if c in picked))
    return picked


def intrinsic_dims(store: SummarySource, grid: str | None,
                   overrides: dict[str, int] | None = None) -> dict[str, int | None]:
    """Intrinsic dimensions that replace the stored ones, then ``overrides``. For a grid, its own
    view for every dataset: its ``[intrinsic_dim]`` entry, else the known value, else None
    (undefined), never what another grid stored on a run they share. Without a grid, only the
    ``overrides`` (each run keeps its stored value)."""
    from kanfarm.data import DATASETS

    row = store.grid(grid) if grid is not None else None
    dims: dict[str, int | None] = {}
    if row is not None:
        table = row.spec.get("intrinsic_dim") or {}
        dims = {name: (int(table[name]) if name in table else KNOWN_INTRINSIC_DIM.get(name)) for name in DATASETS}
    return {**dims, **(overrides or {})}


def summary_table(store: SummarySource, grid: str | None = None) -> list[dict[str, Any]]:
    cols = CONFIG_COLUMNS + ("best_test_acc", "best_epoch", "train_acc_at_best", "gap_at_best", "epochs_run",
                             "efficiency")
    dims = intrinsic_dims(store, grid)
    rows = []
    for r in store.summary(grid):
        row = _pick(r, cols)
        if r["dataset"] in dims and r["best_test_acc"] is not None:
            row["efficiency"] = efficiency(r["best_test_acc"], r["best_epoch"], r["n_params"], dims[r["dataset"]])
        rows.append(row)
    return rows


def efficiency_table(store: SummarySource, grid: str | None = None,
                     intrinsic_dim: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Finished runs by decreasing efficiency, with ``intrinsic_dims(store, grid, intrinsic_dim)``
    replacing the stored values."""
    dims = intrinsic_dims(store, grid, intrinsic_dim)
    rows = []
    for r in _finished(store.summary(grid)):
        dim = dims[r["dataset"]] if r["dataset"] in dims else r["intrinsic_dim"]
        row = _pick(r, CONFIG_COLUMNS + ("best_test_acc", "best_epoch"))
        row["intrinsic_dim"] = dim
        row["efficiency"] = efficiency(r["best_test_acc"], r["best_epoch"], r["n_params"], dim)
        rows.append(row)
    rows.sort(key=lambda r: (r["efficiency"] is None, -(r["efficiency"] or 0.0), r["run_id"]))
    return rows


def overfit_onset(curve: list[tuple[int, float]], tolerance: float = 0.0) -> int | None:
    """The epoch after which test accuracy falls: the first epoch at the maximum, when some later
    epoch lies more than ``tolerance`` below it; None when accuracy never falls after its peak.
    (``gap_table`` asks the same of the database, one figure per run, without the curves.)"""
    if not curve:
        return None
    best_epoch, best = max(curve, key=lambda p: (p[1], -p[0]))
    later = [acc for epoch, acc in curve if epoch > best_epoch]
    return best_epoch if later and min(later) < best - tolerance else None


def gap_table(store: SummarySource, grid: str | None = None, tolerance: float = 0.0) -> list[dict[str, Any]]:
    """Generalisation gap (train - test accuracy) at the best epoch, mean and max over epochs, and
    the onset of overfitting (``overfit_onset``: the best epoch, when a later one lies more than
    ``tolerance`` below it)."""
    lowest_later = store.lowest_test_acc_after_best(grid)
    rows = []
    for r in _finished(store.summary(grid)):
        row = _pick(r, CONFIG_COLUMNS + ("best_test_acc", "best_epoch", "train_acc_at_best", "gap_at_best",
                                        "mean_gap", "max_gap"))
        lowest = lowest_later.get(r["run_id"])
        falls = lowest is not None and lowest < r["best_test_acc"] - tolerance
        row["overfit_onset_epoch"] = r["best_epoch"] if falls else None
        rows.append(row)
    return rows


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) == 1:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def setting_of(row: dict[str, Any]) -> tuple:
    """The values of ``SETTING_COLUMNS``: runs with equal settings differ only in scheme and seed."""
    return tuple(json.dumps(row.get(c), sort_keys=True) if isinstance(row.get(c), dict) else row.get(c)
                 for c in SETTING_COLUMNS)


def with_settings(store: SummarySource, grid: str | None = None) -> list[dict[str, Any]]:
    """The view's rows (of ``grid``), each with the ``CONFIG_SETTINGS`` of its stored config
    (a field a config stored before it existed has RunConfig's default)."""
    from kanfarm.config import RunConfig

    defaults = RunConfig().to_dict()
    configs = store.run_configs(grid)
    return [{**row, **{c: configs.get(row["run_id"], {}).get(c, defaults[c]) for c in CONFIG_SETTINGS}}
            for row in store.summary(grid)]


def sensitivity_table(store: SummarySource, grid: str | None = None) -> list[dict[str, Any]]:
    """Spread of best test accuracy over training schemes (init x optimiser x learning rate, and
    seeds), one row per setting: every other config field (``SETTING_COLUMNS``: dataset, model,
    widths, trainer, activation, spline order, grid size, batch size, epochs, batch norm, dropout,
    HSIC settings, ...). Diverged runs count towards ``divergence_rate``; their best accuracy before
    diverging (if any) counts towards the spread like any other run's.
    """
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in _finished(with_settings(store, grid)):  # a setting the model does not use sets nothing apart
        groups[setting_of({**r, **dict.fromkeys(unused_settings(r))})].append(r)
    rows = []
    for runs in groups.values():
        setting = {c: runs[0].get(c) for c in SETTING_COLUMNS}
        setting.update(dict.fromkeys(unused_settings(setting)))  # shown empty: this model has no such setting
        accs = sorted(r["best_test_acc"] for r in runs if r["best_test_acc"] is not None)
        row: dict[str, Any] = {**setting, "runs": len(runs), "count": len(accs),
                               "divergence_rate": sum(r["status"] == "diverged" for r in runs) / len(runs)}
        if accs:
            q1, q3 = _quartiles(accs)
            row.update(mean=statistics.fmean(accs), median=statistics.median(accs),
                       std=statistics.stdev(accs) if len(accs) > 1 else 0.0, iqr=q3 - q1,
                       min=accs[0], max=accs[-1])
        else:
            row.update(mean=None, median=None, std=None, iqr=None, min=None, max=None)
        rows.append(row)
    # the model after the settings a KAN and its MLP-Wide share, so that they stand side by side;
    # the activation among them when the grid gave both the same ones (by default they differ)
    same_activations = bool({r["activation"] for r in rows if r["model"] == "kan"}
                            & {r["activation"] for r in rows if r["model"] == "mlp_wide"})
    shared = [c for c in SETTING_COLUMNS if c not in _SORTED_APART or (c == "activation" and same_activations)]
    rows.sort(key=lambda r: (r["dataset"], arch_order(r["depth"] or r["hidden_widths"]), r["trainer"],
                             tuple(str(r[c]) for c in shared), MODEL_ORDER.get(r["model"], 9),
                             tuple(str(r[c]) for c in SETTING_COLUMNS)))
    return rows


#: what the sort of sensitivity rows puts before or after the model: the leading columns, and what
#: a KAN and its parameter-matched MLP-Wide may hold differently (activation and dropout by default)
_SORTED_APART = ("dataset", "model", "depth", "hidden_widths", "trainer", "activation", "dropout", "wide_multiplier")


def unused_settings(setting: dict[str, Any]) -> tuple[str, ...]:
    """The settings a row's model and trainer do not use (``RunConfig.unused_fields``)."""
    from kanfarm.config import RunConfig

    return RunConfig(model=setting["model"], trainer=setting["trainer"],
                     wide_multiplier=setting.get("wide_multiplier")).unused_fields()


_DEPTH_ORDER = {"shallow": 0, "medium": 1, "deep": 2}


def arch_order(label: str | None) -> tuple:
    """Sort key of an architecture label (a depth preset's name, or hidden widths as "16,8" or
    "[16,8]"): shallow, medium, deep, then explicit widths by length and size (8 before 16)."""
    label = label or ""
    if label in _DEPTH_ORDER:
        return (0, _DEPTH_ORDER[label], ())
    widths = tuple(int(w) for w in label.strip("[]").split(",") if w.strip().isdigit())
    return (1, len(widths), widths)


REPORTS = {"summary": summary_table, "efficiency": efficiency_table, "gap": gap_table,
           "sensitivity": sensitivity_table}
#: each report's columns, in order: a CSV of no rows still has its header (a test keeps these
#: equal to the keys the functions produce).
REPORT_COLUMNS = {
    "summary": CONFIG_COLUMNS + ("best_test_acc", "best_epoch", "train_acc_at_best", "gap_at_best", "epochs_run",
                                 "efficiency"),
    "efficiency": CONFIG_COLUMNS + ("best_test_acc", "best_epoch", "intrinsic_dim", "efficiency"),
    "gap": CONFIG_COLUMNS + ("best_test_acc", "best_epoch", "train_acc_at_best", "gap_at_best", "mean_gap", "max_gap",
                             "overfit_onset_epoch"),
    "sensitivity": SETTING_COLUMNS + ("runs", "count", "divergence_rate", "mean", "median", "std", "iqr", "min",
                                      "max"),
}
