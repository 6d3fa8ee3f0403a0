"""Grid specs: a researcher's TOML grid, validated and expanded into normalised RunConfigs.

Validation happens up front, field by field, so a typo fails at ``kanfarm grid show`` with the
field's name instead of hours later in a worker. See docs/grid-spec.md for the format.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from kanfarm.config import (
    ACTIVATIONS,
    DEPTHS,
    INITS,
    MATMUL_PRECISIONS,
    MAX_STORED_INT,
    MODELS,
    OPTIMIZERS,
    TRAINERS,
    ConfigError,
    RunConfig,
    canonical_dataset_options,
    check_grid_name,
    check_hsic_sigma,
    check_widths_text,
)
from kanfarm.reports.efficiency import KNOWN_INTRINSIC_DIM  # one table: d_int90 where known (FACTS.md)


#: A guard against a typo that multiplies a grid into millions of runs.
MAX_CELLS = 100_000

_RUN_DEFAULTS = RunConfig()

#: axis key -> (element kind, allowed values or None, required). Order = expansion order.
_AXES: dict[str, tuple[str, tuple[str, ...] | None, bool]] = {
    "datasets": ("str", None, True),  # allowed: kanfarm.models.presets.DEPTH_WIDTHS (lazy import)
    "models": ("str", MODELS, True),
    "depths": ("str", DEPTHS, False),
    "widths": ("widths", None, False),
    "trainers": ("str", TRAINERS, False),
    "activations": ("str", ACTIVATIONS, False),
    "spline_orders": ("posint", None, False),
    "grid_sizes": ("posint", None, False),
    "inits": ("str", INITS, True),
    "optimizers": ("str", OPTIMIZERS, True),
    "learning_rates": ("lr", None, True),
    "seeds": ("seed", None, False),
}
_AXIS_DEFAULTS: dict[str, list[Any]] = {
    "depths": [],
    "widths": [],
    "trainers": ["backprop"],
    "activations": [],
    "spline_orders": [_RUN_DEFAULTS.spline_order],
    "grid_sizes": [_RUN_DEFAULTS.grid_size],
    "seeds": [0],
}
#: empty means "none of these" (depths/widths: the other one gives the architectures) or, for
#: activations, "each model's default activation".
_MAY_BE_EMPTY = ("depths", "widths", "activations")
_SCALARS = ("batch_size", "epochs", "patience", "dropout", "wide_multiplier", "train_eval_size",
            "matmul_precision", "batch_norm")
_TABLES = ("intrinsic_dim", "hsic", "dataset_options")
_HSIC_KEYS = ("beta", "sigma", "x_term", "format_epochs")
ALLOWED_KEYS: tuple[str, ...] = ("name", "description", *_AXES, *_SCALARS, *_TABLES)


def _known_datasets() -> tuple[str, ...]:
    from kanfarm.models.presets import DEPTH_WIDTHS  # lazy: keeps `kanfarm grid show` light

    return tuple(DEPTH_WIDTHS)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if _is_int(value):
        return abs(value) < 1e300  # float() of a larger int overflows
    return isinstance(value, float) and math.isfinite(value)


def _pos_int(fld: str, value: Any, allow_none: bool = False) -> int | None:
    """Capped at MAX_STORED_INT: the store's integer columns are 32-bit on PostgreSQL."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or not 1 <= value <= MAX_STORED_INT:
        raise ConfigError(fld, f"{value!r} must be a positive integer up to {MAX_STORED_INT}"
                          + (" or unset" if allow_none else ""))
    return value


def _pos_float(fld: str, value: Any, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if not _is_number(value) or value <= 0:
        raise ConfigError(fld, f"{value!r} must be a positive number" + (" or unset" if allow_none else ""))
    return float(value)


def _element(fld: str, kind: str, allowed: tuple[str, ...] | None, value: Any) -> Any:
    """Validate one axis value; returns it in canonical form (floats, tuples)."""
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(fld, f"{value!r} must be a string")
        if allowed is not None and value not in allowed:
            raise ConfigError(fld, f"{value!r} is not one of {', '.join(allowed)}")
        return value
    if kind == "posint":
        return _pos_int(fld, value)
    if kind == "seed":
        return _non_negative_int(fld, value)
    if kind == "lr":
        if not _is_number(value) or not 0 < value < 1e3:
            raise ConfigError(fld, f"{value!r} must be a positive number below 1000")
        return float(value)
    # widths: one architecture, a non-empty list of positive hidden widths
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(fld, f"{value!r} must be a non-empty list of hidden widths, e.g. [64, 32]")
    widths = tuple(_pos_int(f"{fld}[{j}]", w) for j, w in enumerate(value))
    check_widths_text(fld, widths)
    return widths


def _axis(key: str, data: dict[str, Any]) -> tuple[Any, ...]:
    kind, allowed, required = _AXES[key]
    if key == "datasets":
        allowed = _known_datasets()
    if key not in data:
        if required:
            raise ConfigError(key, "is required: give a non-empty list")
        return tuple(_AXIS_DEFAULTS[key])
    values = data[key]
    if not isinstance(values, (list, tuple)):
        raise ConfigError(key, f"{values!r} must be a list")
    if not values and key not in _MAY_BE_EMPTY:
        raise ConfigError(key, "must be a non-empty list")
    out: list[Any] = []
    seen: set[Any] = set()
    for i, value in enumerate(values):
        value = _element(f"{key}[{i}]", kind, allowed, value)
        if value in seen:
            raise ConfigError(f"{key}[{i}]", f"{value!r} appears twice")
        seen.add(value)
        out.append(value)
    return tuple(out)


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"{value!r} must be true or false")
    return value


def _dataset_table(key: str, table: Any, allow_default: bool, check) -> dict[str, Any]:
    """A ``{dataset = value}`` table, keys checked against the known datasets."""
    if not isinstance(table, dict):
        raise ConfigError(key, f"{table!r} must be a table of dataset = value")
    known = _known_datasets() + (("default",) if allow_default else ())
    out = {}
    for name, value in table.items():
        if name not in known:
            raise ConfigError(f"{key}.{name}", f"unknown dataset (known: {', '.join(known)})")
        out[name] = check(f"{key}.{name}", value)
    return dict(sorted(out.items()))


def _dataset_options(table: Any) -> dict[str, dict[str, int]]:
    """``[dataset_options.<dataset>]`` tables: each checked against what that dataset's loader
    accepts; kept as written (sorted), empty tables dropped."""
    if not isinstance(table, dict):
        raise ConfigError("dataset_options", f"{table!r} must hold one table per dataset, "
                                             "e.g. [dataset_options.imdb] vocab_size = 2000")
    known = _known_datasets()
    out = {}
    for name, options in table.items():
        fld = f"dataset_options.{name}"
        if name not in known:
            raise ConfigError(fld, f"unknown dataset (known: {', '.join(known)})")
        if not isinstance(options, dict):
            raise ConfigError(fld, f"{options!r} must be a table of option = value")
        canonical_dataset_options(name, options, fld)
        if options:
            out[name] = dict(sorted(options.items()))
    return dict(sorted(out.items()))


def _non_negative_int(fld: str, value: Any) -> int:
    if not _is_int(value) or not 0 <= value <= MAX_STORED_INT:
        raise ConfigError(fld, f"{value!r} must be a non-negative integer up to {MAX_STORED_INT}")
    return value


@dataclass(frozen=True)
class GridSpec:
    """A validated grid. Axes are tuples in the user's order; that order fixes expansion order."""

    name: str
    datasets: tuple[str, ...]
    models: tuple[str, ...]
    inits: tuple[str, ...]
    optimizers: tuple[str, ...]
    learning_rates: tuple[float, ...]
    depths: tuple[str, ...] = ()
    widths: tuple[tuple[int, ...], ...] = ()
    trainers: tuple[str, ...] = ("backprop",)
    activations: tuple[str, ...] = ()
    spline_orders: tuple[int, ...] = (3,)
    grid_sizes: tuple[int, ...] = (5,)
    seeds: tuple[int, ...] = (0,)
    batch_size: int | dict[str, int] = field(default=64, hash=False)
    epochs: int = 10
    patience: int | None = None
    dropout: float = 0.2
    wide_multiplier: float | None = None
    train_eval_size: int | None = None
    intrinsic_dims: dict[str, int] = field(default_factory=dict, hash=False)
    hsic_beta: float = 100.0
    hsic_sigma: float = 10.0
    hsic_x_term: bool = False
    hsic_format_epochs: int | None = None
    dataset_options: dict[str, dict[str, int]] = field(default_factory=dict, hash=False)
    matmul_precision: str = "float32"
    batch_norm: bool | dict[str, bool] = field(default=False, hash=False)
    description: str = ""

    def batch_size_for(self, dataset: str) -> int:
        if isinstance(self.batch_size, int):
            return self.batch_size
        if dataset in self.batch_size:
            return self.batch_size[dataset]
        if "default" in self.batch_size:
            return self.batch_size["default"]
        raise ConfigError(f"batch_size.{dataset}", "no batch size for this dataset and no default")

    def batch_norm_for(self, dataset: str) -> bool:
        if isinstance(self.batch_norm, bool):
            return self.batch_norm
        return self.batch_norm.get(dataset, self.batch_norm.get("default", False))

    def intrinsic_dim(self, dataset: str) -> int | None:
        """The spec's override, else the known value, else None (efficiency then undefined)."""
        if dataset in self.intrinsic_dims:
            return self.intrinsic_dims[dataset]
        return KNOWN_INTRINSIC_DIM.get(dataset)

    def _architectures(self) -> list[tuple[str | None, tuple[int, ...]]]:
        return [(d, ()) for d in self.depths] + [(None, w) for w in self.widths]

    def cell_count_bound(self) -> int:
        """Cells as ``expand`` makes them, before deduplication: an upper bound (exact unless two
        cells are the same run), cheap to compute. Models without splines count one spline setting."""
        splines = len(self.spline_orders) * len(self.grid_sizes)
        per_model = sum(1 if self._splineless(model) else splines for model in self.models)
        sizes = [len(self.datasets), per_model, len(self._architectures()), len(self.trainers),
                 max(1, len(self.activations)), len(self.inits), len(self.optimizers), len(self.learning_rates),
                 len(self.seeds)]
        return math.prod(sizes)

    def _splineless(self, model: str) -> bool:
        """A plain MLP, or an MLP-Wide scaled by ``wide_multiplier`` (it matches no KAN): the rule
        of ``RunConfig.unused_fields``, asked of a cell of this model."""
        wide = self.wide_multiplier if model == "mlp_wide" else None
        return "spline_order" in RunConfig(model=model, wide_multiplier=wide).unused_fields()

    def _cell(self, dataset, model, arch, trainer, activation, order, grid, init, opt, lr, seed) -> RunConfig:
        """One cell. Fields that cannot affect this cell keep RunConfig's defaults, so the same
        run from any grid (whatever its other axes or hsic/wide settings) has one hash."""
        depth, widths = arch
        hsic = trainer == "hsic"
        return RunConfig(
            dataset=dataset, model=model, depth=depth, hidden_widths=widths, init=init,
            optimizer=opt, lr=lr, trainer=trainer, activation=activation,
            spline_order=order, grid_size=grid, batch_size=self.batch_size_for(dataset),
            max_epochs=self.epochs, seed=seed, patience=self.patience, dropout=self.dropout,
            wide_multiplier=self.wide_multiplier if model == "mlp_wide" else None,
            train_eval_size=self.train_eval_size,
            hsic_beta=self.hsic_beta if hsic else _RUN_DEFAULTS.hsic_beta,
            hsic_sigma=self.hsic_sigma if hsic else _RUN_DEFAULTS.hsic_sigma,
            hsic_x_term=self.hsic_x_term if hsic else _RUN_DEFAULTS.hsic_x_term,
            hsic_format_epochs=self.hsic_format_epochs if hsic else _RUN_DEFAULTS.hsic_format_epochs,
            dataset_options=self.dataset_options.get(dataset, {}),
            matmul_precision=self.matmul_precision,
            batch_norm=self.batch_norm_for(dataset),
        ).normalised()

    def expand(self) -> list[RunConfig]:
        """Every cell, normalised, outermost axis first, duplicates (by config_hash) dropped.

        Plain MLPs have no splines: they get RunConfig's default spline order and grid size
        once instead of one identical cell per spline_orders x grid_sizes value; so is an MLP-Wide
        scaled by a ``wide_multiplier`` (it matches no KAN). Computed once per
        spec (validation, submission and the CLI all ask; a large grid takes seconds)."""
        return list(self._cells)

    @functools.cached_property
    def _cells(self) -> tuple[RunConfig, ...]:
        cells: list[RunConfig] = []
        seen: set[str] = set()
        # a `widths` entry equal to a listed depth's widths is that depth's network: one cell, the
        # depth's (depth cells come first), not a second run of the same network under another label
        overlap = bool(self.depths and self.widths)
        networks: set[str] = set()
        for dataset, model, arch, trainer, activation in itertools.product(
            self.datasets, self.models, self._architectures(), self.trainers, self.activations or (None,)
        ):
            if self._splineless(model):
                orders, grids = (_RUN_DEFAULTS.spline_order,), (_RUN_DEFAULTS.grid_size,)
            else:
                orders, grids = self.spline_orders, self.grid_sizes
            for rest in itertools.product(orders, grids, self.inits, self.optimizers,
                                          self.learning_rates, self.seeds):
                try:
                    cell = self._cell(dataset, model, arch, trainer, activation, *rest)
                except ConfigError as exc:  # name the spec's per-dataset entry, not the run's field
                    table = {"batch_size": self.batch_size, "batch_norm": self.batch_norm}.get(exc.field)
                    if isinstance(table, dict):
                        entry = dataset if dataset in table else "default"
                        raise ConfigError(f"{exc.field}.{entry}", str(exc).split(": ", 1)[1]) from None
                    raise
                key = cell.normalised_hash()  # _cell normalised it
                if overlap and cell.depth is not None:
                    networks.add(dataclasses.replace(cell, depth=None).config_hash())
                elif overlap and key in networks:
                    continue
                if key not in seen:
                    seen.add(key)
                    cells.append(cell)
        return tuple(cells)

    def to_dict(self) -> dict[str, Any]:
        """The normalised spec (JSON-serialisable, every default filled in); parse_spec reads it back."""
        return {
            "name": self.name,
            "description": self.description,
            **{key: [list(v) if isinstance(v, tuple) else v for v in getattr(self, key)] for key in _AXES},
            "batch_size": self.batch_size if isinstance(self.batch_size, int) else dict(self.batch_size),
            "epochs": self.epochs,
            "patience": self.patience,
            "dropout": self.dropout,
            "wide_multiplier": self.wide_multiplier,
            "train_eval_size": self.train_eval_size,
            "matmul_precision": self.matmul_precision,
            "batch_norm": self.batch_norm if isinstance(self.batch_norm, bool) else dict(self.batch_norm),
            "intrinsic_dim": dict(self.intrinsic_dims),
            "hsic": {"beta": self.hsic_beta, "sigma": self.hsic_sigma, "x_term": self.hsic_x_term,
                     "format_epochs": self.hsic_format_epochs},
            "dataset_options": {name: dict(options) for name, options in self.dataset_options.items()},
        }

    def to_toml(self) -> str:
        """The normalised spec as TOML (unset options left out): a starting point for a new grid."""
        top, tables = [], []
        for key, value in self.to_dict().items():
            if key == "dataset_options":  # a table of tables: [dataset_options.imdb]
                tables += [f"\n[{key}.{_toml_key(name)}]\n" + "\n".join(
                    f"{_toml_key(k)} = {_toml_value(v)}" for k, v in options.items()) + "\n"
                    for name, options in value.items()]
            elif isinstance(value, dict):
                body = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None]
                if body:
                    tables.append(f"\n[{key}]\n" + "\n".join(body) + "\n")
            elif value is not None:
                top.append(f"{key} = {_toml_value(value)}")
        return "\n".join(top) + "\n" + "".join(tables)

    def describe(self, sample: int = 5) -> dict[str, Any]:
        """Summary for `kanfarm grid show`: sizes, per-model counts and a spread-out sample of cells."""
        cells = self.expand()
        per_model = {m: 0 for m in self.models}
        per_dataset = {d: 0 for d in self.datasets}
        for cell in cells:
            per_model[cell.model] += 1
            per_dataset[cell.dataset] += 1
        n = min(max(sample, 0), len(cells))
        picks = sorted({round(i * (len(cells) - 1) / max(n - 1, 1)) for i in range(n)}) if n else []
        return {
            "name": self.name,
            "description": self.description,
            "cells": len(cells),
            "axes": {key: len(getattr(self, key)) for key in _AXES},
            "per_model": per_model,
            "per_dataset": per_dataset,
            "batch_size": {d: self.batch_size_for(d) for d in self.datasets},
            "intrinsic_dim": {d: self.intrinsic_dim(d) for d in self.datasets},
            "dataset_options": {d: self.dataset_options[d] for d in self.datasets if d in self.dataset_options},
            "sample": [{**cells[i].to_dict(), **dict.fromkeys(cells[i].unused_fields())} for i in picks],
        }


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, but characters beyond the BMP stay as they
    are (JSON would write surrogate pairs, which TOML refuses) and DEL is escaped (TOML refuses it raw)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # finite by validation; repr of a float is valid TOML
    if isinstance(value, str):
        return _toml_string(value)
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def parse_spec(data: dict[str, Any], name: str | None = None) -> GridSpec:
    """Validate a parsed spec (from TOML, or a stored to_dict()); ``name`` is used if it has none."""
    if not isinstance(data, dict):
        raise ConfigError("spec", f"must be a table of keys, got {type(data).__name__}")
    unknown = [k for k in data if k not in ALLOWED_KEYS]
    if unknown:
        raise ConfigError(str(unknown[0]), f"unknown key (allowed: {', '.join(ALLOWED_KEYS)})")

    spec_name = check_grid_name(data.get("name", name))
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ConfigError("description", f"{description!r} must be a string")
    if "\0" in description:  # PostgreSQL's text cannot hold it
        raise ConfigError("description", "holds a NUL character")
    axes = {key: _axis(key, data) for key in _AXES}
    if not axes["depths"] and not axes["widths"]:
        raise ConfigError("depths", "give depths and/or widths (at least one architecture)")

    batch_size = data.get("batch_size", _RUN_DEFAULTS.batch_size)
    if isinstance(batch_size, dict):
        batch_size = _dataset_table("batch_size", batch_size, True, _pos_int)
        for dataset in axes["datasets"]:
            if dataset not in batch_size and "default" not in batch_size:
                raise ConfigError(f"batch_size.{dataset}", "no batch size for this dataset and no default")
    else:
        batch_size = _pos_int("batch_size", batch_size)

    dropout = data.get("dropout", _RUN_DEFAULTS.dropout)
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise ConfigError("dropout", f"{dropout!r} must be a number in [0, 1)")

    precision = _element("matmul_precision", "str", MATMUL_PRECISIONS,
                         data.get("matmul_precision", _RUN_DEFAULTS.matmul_precision))

    batch_norm = data.get("batch_norm", _RUN_DEFAULTS.batch_norm)
    if isinstance(batch_norm, dict):
        batch_norm = _dataset_table("batch_norm", batch_norm, True, _boolean)
    else:
        batch_norm = _boolean("batch_norm", batch_norm)

    hsic = data.get("hsic", {})
    if not isinstance(hsic, dict):
        raise ConfigError("hsic", f"{hsic!r} must be a table with keys {', '.join(_HSIC_KEYS)}")
    for key in hsic:
        if key not in _HSIC_KEYS:
            raise ConfigError(f"hsic.{key}", f"unknown key (allowed: {', '.join(_HSIC_KEYS)})")
    x_term = hsic.get("x_term", _RUN_DEFAULTS.hsic_x_term)
    if not isinstance(x_term, bool):
        raise ConfigError("hsic.x_term", f"{x_term!r} must be true or false")

    spec = GridSpec(
        name=spec_name.strip(),
        description=description,
        **axes,
        batch_size=batch_size,
        epochs=_pos_int("epochs", data.get("epochs", _RUN_DEFAULTS.max_epochs)),
        patience=_pos_int("patience", data.get("patience"), allow_none=True),
        dropout=float(dropout),
        wide_multiplier=_pos_float("wide_multiplier", data.get("wide_multiplier"), allow_none=True),
        train_eval_size=_pos_int("train_eval_size", data.get("train_eval_size"), allow_none=True),
        intrinsic_dims=_dataset_table("intrinsic_dim", data.get("intrinsic_dim", {}), False, _non_negative_int),
        hsic_beta=_pos_float("hsic.beta", hsic.get("beta", _RUN_DEFAULTS.hsic_beta)),
        hsic_sigma=check_hsic_sigma("hsic.sigma", _pos_float("hsic.sigma", hsic.get("sigma", _RUN_DEFAULTS.hsic_sigma))),
        hsic_x_term=x_term,
        hsic_format_epochs=_pos_int("hsic.format_epochs", hsic.get("format_epochs"), allow_none=True),
        dataset_options=_dataset_options(data.get("dataset_options", {})),
        matmul_precision=precision,
        batch_norm=batch_norm,
    )
    if ("hsic" in spec.trainers and spec.hsic_format_epochs is not None
            and spec.hsic_format_epochs >= spec.epochs):
        raise ConfigError("hsic.format_epochs", f"{spec.hsic_format_epochs} format epochs of {spec.epochs} leave "
                                                "no epoch of HSIC training: must be fewer than epochs")
    if spec.cell_count_bound() > MAX_CELLS:
        raise ConfigError("spec", f"{spec.cell_count_bound()} cells is more than {MAX_CELLS}; split the grid")
    spec.expand()  # every cell through RunConfig.normalised(): a bad cell fails here, not in a worker
    return spec


def _preset_dir():
    from importlib.resources import files

    return files("kanfarm.grids").joinpath("presets")


def preset_names() -> tuple[str, ...]:
    """Names of the spec files shipped in kanfarm/grids/presets/."""
    return tuple(sorted(p.name[: -len(".toml")] for p in _preset_dir().iterdir() if p.name.endswith(".toml")))


def _load_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("spec", f"{where}: not valid TOML: {exc}") from None
    except ValueError as exc:  # an integer literal longer than Python converts (4300 digits)
        raise ConfigError("spec", f"{where}: unreadable value: {exc}") from None
    except RecursionError:
        raise ConfigError("spec", f"{where}: arrays or tables nested too deeply") from None


def load_spec(path_or_preset: str) -> GridSpec:
    """A TOML file or a preset name. A preset name wins over a same-named file in the working
    directory unless the argument looks like a path (has a '/' or ends in .toml)."""
    arg = str(path_or_preset)
    presets = preset_names()
    looks_like_path = "/" in arg or "\\" in arg or arg.endswith(".toml")
    if not looks_like_path and arg in presets:
        text = _preset_dir().joinpath(f"{arg}.toml").read_text(encoding="utf-8")
        return parse_spec(_load_toml(text, f"preset {arg}"), name=arg)
    path = Path(arg)
    if not path.is_file():
        raise ConfigError("spec", f"{arg!r} is neither a spec file nor a preset (presets: {', '.join(presets)})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("spec", f"{arg}: cannot read: {exc}") from None
    return parse_spec(_load_toml(text, arg), name=path.stem)
