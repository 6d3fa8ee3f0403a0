"""Writes a grid's cells into the store: validate and size every cell first, then one transaction.

Nothing is written when any cell is invalid, so a bad spec leaves the database untouched.
"""
from __future__ import annotations

import dataclasses

from kanfarm.config import MAX_PARAMS, ConfigError, RunConfig
from kanfarm.data import dataset_shape
from kanfarm.grids import GridSpec
from kanfarm.models import param_count
from kanfarm.store import Store


def checked_param_count(config: RunConfig, n_features: int, n_classes: int) -> int:
    """``param_count``, refused (ConfigError naming the spec field that caused it) when the store's
    64-bit ``n_params`` could not hold it; counted from widths, nothing is built."""
    n_params = param_count(config, n_features, n_classes)
    if n_params <= MAX_PARAMS:
        return n_params
    if config.model == "mlp_wide" and config.wide_multiplier is not None:
        fld = "wide_multiplier"
    elif param_count(dataclasses.replace(config, grid_size=1, spline_order=1), n_features, n_classes) <= MAX_PARAMS:
        # The widths alone fit with the smallest spline grid: the grid size or spline order is too large.
        fld = "grid_sizes" if config.grid_size >= config.spline_order else "spline_orders"
    else:
        fld = "widths"
    raise ConfigError(fld, f"{config.model} on {config.dataset} with hidden widths {list(config.hidden_widths)}, "
                           f"grid size {config.grid_size} and spline order {config.spline_order} "
                           f"has {n_params} parameters, more than the store holds ({MAX_PARAMS})")


#: what fixes a cell's parameter count, with its dataset options (its input width): cells that
#: differ in anything else (scheme, seed, trainer, epochs...) share one count, counted once
SHAPE_FIELDS = ("dataset", "model", "depth", "hidden_widths", "wide_multiplier", "grid_size", "spline_order",
                "batch_norm")


def sized_cells(spec: GridSpec):
    """(config, n_params, intrinsic_dim) for every cell of ``spec``, validated. Counted once per
    shape: a 97,200-cell grid of 9 architectures spent 50 s counting the same parameters."""
    cells, counts = [], {}
    for config in spec.expand():
        config.check_new()
        shape = (*(getattr(config, f) for f in SHAPE_FIELDS), tuple(sorted(config.dataset_options.items())))
        if shape not in counts:
            n_features, n_classes = dataset_shape(config.dataset, **config.dataset_options)
            counts[shape] = checked_param_count(config, n_features, n_classes)
        cells.append((config, counts[shape], spec.intrinsic_dim(config.dataset)))
    return cells


def runs_beyond_spec(store: Store, spec: GridSpec) -> int:
    """Runs stored under ``spec``'s name that are not its cells: cells of an earlier version of it
    (a grid keeps every cell it was given; the stored spec is the latest)."""
    return len(store.config_hashes(spec.name) - {c.normalised_hash() for c in spec.expand()})


def submit(store: Store, spec: GridSpec):
    """Idempotent: cells already stored (by config hash) are linked, not added again."""
    return store.submit_grid(spec.name, spec.to_dict(), sized_cells(spec), dict(spec.intrinsic_dims))
