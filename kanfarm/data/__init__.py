"""Datasets of the study, loaded as CPU tensors with features scaled into the KAN grid range [-1, 1].

``load_dataset(name, data_dir=None, **options)`` returns a :class:`Dataset`. Raw files are looked for
in ``<data_dir>/<name>/`` (``data_dir()``: ``$KANFARM_DATA_DIR``, default ``~/.cache/kanfarm/data``),
downloaded from the canonical source when missing (skip with ``download=False`` or
``KANFARM_OFFLINE=1``; failure raises :class:`DatasetUnavailable`), preprocessed once and cached as
``<name>/cache-<key>.pt`` so later loads take well under a second.

| name | raw files | features | classes | scaling into [-1, 1] | split (train / test) |
|---|---|---|---|---|---|
| digits | bundled with scikit-learn | 64 | 10 | pixel 0..16: p/16*2-1 | stratified 25% test, random_state 0: 1,347 / 450 |
| mnist | 4 IDX .gz files | 784 | 10 | pixel 0..255: p/255*2-1 | official 60,000 / 10,000 |
| fashion-mnist | 4 IDX .gz files | 784 | 10 | pixel 0..255: p/255*2-1 | official 60,000 / 10,000 |
| cifar10 | cifar-10-binary.tar.gz | 3072 (R, G, B planes) | 10 | pixel 0..255: p/255*2-1 | 50,000 / 10,000 |
| imdb | aclImdb_v1.tar.gz | vocab_size (5000) | 2 | word presence: +1 present, -1 absent | 25,000 / 25,000 |
| higgs | HIGGS.csv.gz | 28 | 2 | train-standardised, clipped at +-3 std, /3 | first n_train / next n_test rows (50,000 / 50,000) |

Options: ``vocab_size`` (imdb), ``n_train`` and ``n_test`` (higgs; together at most the file's
11,000,000 rows), ``download`` (all). Each loader module's docstring gives the details. An option the
loader does not accept raises :class:`OptionError` (a ``ValueError``; ``option`` names it). A run
sets them with ``RunConfig.dataset_options``, a grid with its ``[dataset_options.<dataset>]`` tables.
"""
from kanfarm.data.errors import DatasetFormatError, DatasetUnavailable, OptionError
from kanfarm.data.paths import data_dir

#: names this package gives from the modules that need torch, imported when first asked for: a
#: command that only reads the store (``status``, reports) does not pay torch's import (seconds)
_LAZY = {"Dataset": "kanfarm.data.dataset", "DATASETS": "kanfarm.data.registry",
         "dataset_shape": "kanfarm.data.registry", "load_dataset": "kanfarm.data.registry"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["DATASETS", "Dataset", "DatasetFormatError", "DatasetUnavailable", "OptionError", "data_dir",
           "dataset_shape", "load_dataset"]
