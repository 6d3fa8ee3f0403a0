"""Writes a grid's cells into the store: validate and size every cell first, then one transaction.

Nothing is written when any cell is invalid, so a bad spec leaves the database untouched.
"""
from __future__ import annotations

from kanfarm.data import dataset_shape
from kanfarm.grids import GridSpec
from kanfarm.models import param_count
from kanfarm.store import Store


def sized_cells(spec: GridSpec):
    """(config, n_params, intrinsic_dim) for every cell of ``spec``, validated."""
    cells = []
    for config in spec.expand():
        n_features, n_classes = dataset_shape(config.dataset, **config.dataset_options)
        cells.append((config, param_count(config, n_features, n_classes), spec.intrinsic_dim(config.dataset)))
    return cells


def submit(store: Store, spec: GridSpec):
    """Idempotent: cells already stored (by config hash) are linked, not added again."""
    return store.submit_grid(spec.name, spec.to_dict(), sized_cells(spec))
