"""The dataset registry: names, option checking, shapes, and the load path raw files -> cache -> Dataset.

Loading order: a cache file for (dataset, format version, options) is used when present and no raw
file beside it was replaced (size, mtime or ctime) since it was built; otherwise missing raw files are downloaded
(unless disabled), the loader module preprocesses them once, and the result is cached beside them.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from kanfarm.data import cifar10, digits, download, higgs, imdb, mnist, paths
from kanfarm.data.errors import DatasetFormatError, OptionError

if TYPE_CHECKING:
    from kanfarm.data.dataset import Dataset
from kanfarm.data.sources import SOURCES

#: dataset name -> loader module (N_CLASSES, FORMAT_VERSION, DEFAULTS, n_features(), build(), and
#: optionally check_options(resolved) for limits beyond "a positive integer").
LOADERS: dict[str, ModuleType] = {
    "digits": digits,
    "mnist": mnist,
    "fashion-mnist": mnist,
    "cifar10": cifar10,
    "imdb": imdb,
    "higgs": higgs,
}
DATASETS: tuple[str, ...] = tuple(LOADERS)


def _loader(name: str) -> ModuleType:
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return LOADERS[name]


def option_defaults(name: str) -> dict[str, Any]:
    """The options a dataset's loader accepts, with their defaults (empty: none)."""
    return dict(_loader(name).DEFAULTS)


#: options are stored in 32-bit integer columns' range, as every other integer of a run
MAX_OPTION = 2**31 - 1


def resolve_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The dataset's defaults overridden by ``options``; unknown or non-positive values (and
    combinations the loader refuses, e.g. more HIGGS rows than the file has) raise OptionError."""
    loader = _loader(name)
    defaults = loader.DEFAULTS
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        allowed = ", ".join(sorted(defaults)) or "none"
        raise OptionError(unknown[0], f"dataset {name!r} has no option(s) {', '.join(unknown)}; allowed: {allowed}")
    resolved = {**defaults, **options}
    for key, value in sorted(resolved.items()):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_OPTION:
            raise OptionError(key, f"dataset {name!r}: option {key} must be a positive integer up to "
                                   f"{MAX_OPTION}, got {value!r}")
    check = getattr(loader, "check_options", None)
    if check is not None:
        check(resolved)
    return resolved


def dataset_shape(name: str, **options: Any) -> tuple[int, int]:
    """(n_features, n_classes) of a dataset, without reading any file."""
    options.pop("download", None)
    loader = _loader(name)
    return loader.n_features(resolve_options(name, options)), loader.N_CLASSES


def load_dataset(name: str, data_dir: str | Path | None = None, **options: Any) -> Dataset:
    """Load a dataset as CPU tensors: float32 features in [-1, 1], int64 labels.

    ``download=False`` (or env ``KANFARM_OFFLINE=1``) never downloads: missing files raise
    DatasetUnavailable at once. Other options are per dataset (``vocab_size``, ``n_train``, ``n_test``).
    """
    from kanfarm.data import cache  # torch: imported by loading, not by names and shapes
    from kanfarm.data.dataset import Dataset

    allow_download = bool(options.pop("download", True)) and not paths.offline()
    loader = _loader(name)
    resolved = resolve_options(name, options)
    folder = Path(data_dir if data_dir is not None else paths.data_dir()).expanduser() / name
    path = cache.cache_path(folder, name, loader.FORMAT_VERSION, resolved)
    filenames = [f.filename for f in SOURCES[name]]
    shape = (loader.n_features(resolved), loader.N_CLASSES)
    tensors = cache.read(path, cache.source_stamps(folder, filenames), *shape)
    if tensors is None:
        download.ensure_files(name, folder, SOURCES[name], allow_download)
        stamps = cache.source_stamps(folder, filenames)  # before the build: a file replaced meanwhile is stale
        tensors = loader.build(folder, resolved)
        why = cache.problem(tensors, *shape)
        if why is not None:  # e.g. an archive of empty batches: say so rather than train on nothing
            raise DatasetFormatError(f"{folder}: dataset {name!r} built from these files is unusable: {why}")
        cache.write(path, tensors, stamps)
    return Dataset(name, tensors["x_train"], tensors["y_train"], tensors["x_test"], tensors["y_test"],
                   loader.N_CLASSES)
