"""One run's configuration: the cell of a grid, normalised so that equal runs hash equally.

Everything that can change a run's result lives here; nothing about where or how it executes
(device, worker, checkpoint folder) does, so the same cell on a GPU worker and a laptop has one hash.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODELS = ("kan", "mlp", "mlp_wide")
DEPTHS = ("shallow", "medium", "deep")
INITS = ("kaiming_normal", "kaiming_uniform", "orthogonal")
OPTIMIZERS = ("sgd", "sgd_momentum", "adam")
TRAINERS = ("backprop", "hsic")
ACTIVATIONS = ("relu", "gelu", "silu", "elu", "cos")
#: float32 matrix products: "float32" exact (PyTorch's default), "tf32" TensorFloat-32 on CUDA
#: GPUs that have it (10-bit mantissa inputs, float32 accumulation): faster, less exact, opt-in.
MATMUL_PRECISIONS = ("float32", "tf32")

#: activation used when a config leaves it unset: the study's defaults.
DEFAULT_ACTIVATION = {"kan": "gelu", "mlp": "relu", "mlp_wide": "relu"}

#: largest integer a run may hold in a field the store keeps: PostgreSQL's ``integer`` is 32-bit.
MAX_STORED_INT = 2**31 - 1
#: the longest grid name, and widths written as text ("64,32"), the store's columns hold
MAX_STORED_TEXT = 200
#: the HSIC kernel width's range: sigma^2 times a feature count stays a normal float64 inside it
#: (1e-200 made sigma^2 underflow to 0, failing every run; 1e300 made every kernel 1, no signal).
HSIC_SIGMA_RANGE = (1e-6, 1e6)
#: largest parameter count the store can hold (``n_params`` is a 64-bit ``bigint``).
MAX_PARAMS = 2**63 - 1


class ConfigError(ValueError):
    """A bad value in a run or grid configuration; ``field`` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


#: Unicode categories of characters that do not print: control (a newline would split messages, an
#: ESC drive the terminal), format (zero-width, bidi overrides: two names printing alike, or a name
#: printing as nothing), line and paragraph separators. A grid name may not hold them; the CLI
#: writes them as escapes.
UNSEEN_CATEGORIES = frozenset(("Cc", "Cf", "Zl", "Zp"))


def grid_name(name: str) -> str:
    """A grid name as stored and looked up: NFC, so "café" typed precomposed or with a combining
    accent (a macOS file name) is one grid."""
    return unicodedata.normalize("NFC", name)


def check_grid_name(name: Any) -> str:
    """``name`` as stored (``grid_name``), or a ConfigError naming ``name``: a non-empty string
    the store's column holds, with no unseen character. Asked by specs and by the store itself,
    so that names written through the library reach terminals and pages as safely."""
    if isinstance(name, str):
        name = grid_name(name)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("name", f"{name!r}: give the grid a non-empty name")
    if len(name) > MAX_STORED_TEXT:
        raise ConfigError("name", f"{len(name)} characters: at most {MAX_STORED_TEXT}")
    if any(unicodedata.category(ch) in UNSEEN_CATEGORIES for ch in name):
        raise ConfigError("name", f"{name!r} holds a control, format or line-separator character")
    return name


def check_hsic_sigma(name: str, value: float) -> float:
    """``value`` if it lies in ``HSIC_SIGMA_RANGE``, else a ConfigError naming ``name``."""
    low, high = HSIC_SIGMA_RANGE
    if not low <= value <= high:
        raise ConfigError(name, f"{value!r} must lie in [{low:g}, {high:g}]")
    return value


def check_widths_text(name: str, widths: tuple[int, ...]) -> None:
    """Hidden widths written out as text (``64,32``) must fit the store's column."""
    if len(",".join(map(str, widths))) > MAX_STORED_TEXT:
        raise ConfigError(name, f"{len(widths)} layers: written out as text the widths "
                          f"must fit {MAX_STORED_TEXT} characters (the store's column)")


def check_folder(name: str, path: Path) -> None:
    """``path`` (from variable ``name``) is a folder, or can become one: its nearest existing
    ancestor is a folder. A ConfigError otherwise, before anything is written under it."""
    for where in (path, *path.parents):
        if where.exists():
            if not where.is_dir():
                what = "is" if where == path else f"lies below {str(where)!r}, which is"
                raise ConfigError(name, f"{str(path)!r} {what} a file, not a folder")
            return


def canonical_dataset_options(dataset: str, options: Any, fld: str = "dataset_options") -> dict[str, int]:
    """``options`` checked against what the dataset's loader accepts (``kanfarm.data.registry``),
    in canonical form: sorted, options equal to the loader's default left out, so
    ``{"vocab_size": 5000}`` on imdb is the same run as ``{}``. Errors name ``<fld>.<option>``."""
    if not isinstance(options, dict):
        raise ConfigError(fld, f"{options!r} must be a table of option = value")
    if not options:
        return {}  # no registry import: configs without options stay light
    from kanfarm.data.registry import OptionError, option_defaults, resolve_options  # local: imports torch

    try:
        defaults = option_defaults(dataset)
    except ValueError as exc:
        raise ConfigError("dataset", str(exc)) from None
    for key in options:
        if not isinstance(key, str):
            raise ConfigError(fld, f"option name {key!r} must be a string")
    try:
        resolve_options(dataset, options)
    except OptionError as exc:
        raise ConfigError(f"{fld}.{exc.option}", str(exc)) from None
    return {key: options[key] for key in sorted(options) if options[key] != defaults[key]}


@dataclass(frozen=True)
class RunConfig:
    """A single training run. ``hidden_widths`` are the *base* widths (for ``mlp_wide`` the
    widths are scaled at model build time to match the KAN's parameter count)."""

    dataset: str = "digits"
    model: str = "kan"
    depth: str | None = "shallow"
    hidden_widths: tuple[int, ...] = ()
    init: str = "kaiming_normal"
    optimizer: str = "adam"
    lr: float = 1e-3
    trainer: str = "backprop"
    activation: str | None = None
    spline_order: int = 3
    grid_size: int = 5
    batch_size: int = 64
    max_epochs: int = 10
    seed: int = 0
    patience: int | None = None
    dropout: float = 0.2
    wide_multiplier: float | None = None
    train_eval_size: int | None = None
    hsic_beta: float = 100.0
    hsic_sigma: float = 10.0
    hsic_x_term: bool = False
    hsic_format_epochs: int | None = None
    #: ``MATMUL_PRECISIONS``; hashed only when not "float32", so existing runs keep their ids.
    matmul_precision: str = "float32"
    #: batch normalisation after each hidden layer (the study used it on CIFAR-10, FACTS.md);
    #: hashed only when true.
    batch_norm: bool = False
    #: options of the dataset's loader (imdb ``vocab_size``, higgs ``n_train``/``n_test``); only
    #: non-default ones are kept, and the hash covers the field only when it is non-empty.
    dataset_options: dict[str, int] = field(default_factory=dict, hash=False, compare=True)
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)

    def normalised(self) -> "RunConfig":
        """Validate and fill derived fields (activation, widths); idempotent."""
        from kanfarm.models.presets import hidden_widths_for  # local: keeps config import light

        def choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                raise ConfigError(name, f"{value!r} is not one of {', '.join(allowed)}")

        choice("model", self.model, MODELS)
        choice("init", self.init, INITS)
        choice("optimizer", self.optimizer, OPTIMIZERS)
        choice("trainer", self.trainer, TRAINERS)
        choice("matmul_precision", self.matmul_precision, MATMUL_PRECISIONS)
        activation = self.activation or DEFAULT_ACTIVATION[self.model]
        choice("activation", activation, ACTIVATIONS)
        if not (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool)
                and 0 < float(self.lr) < float("inf")):
            raise ConfigError("lr", f"{self.lr!r} must be a positive number")

        def bounded(name: str, value: Any, low: int, optional: bool = False) -> None:
            """An integer in [low, MAX_STORED_INT]: larger ones would not fit the store's columns."""
            if optional and value is None:
                return
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_STORED_INT:
                kind = "a positive" if low == 1 else "a non-negative"
                raise ConfigError(name, f"{value!r} must be {kind} integer up to {MAX_STORED_INT}"
                                  + (" or unset" if optional else ""))

        for name in ("batch_size", "max_epochs", "grid_size", "spline_order"):
            bounded(name, getattr(self, name), 1)
        bounded("seed", self.seed, 0)
        bounded("patience", self.patience, 1, optional=True)
        bounded("train_eval_size", self.train_eval_size, 1, optional=True)
        if self.trainer == "hsic":
            bounded("hsic_format_epochs", self.hsic_format_epochs, 1, optional=True)
            for name in ("hsic_beta", "hsic_sigma"):
                value = getattr(self, name)
                if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                        and 0 < float(value) < float("inf")):
                    raise ConfigError(name, f"{value!r} must be a positive number")
            check_hsic_sigma("hsic_sigma", float(self.hsic_sigma))
            if not isinstance(self.hsic_x_term, bool):
                raise ConfigError("hsic_x_term", f"{self.hsic_x_term!r} must be true or false")
        if not isinstance(self.batch_norm, bool):
            raise ConfigError("batch_norm", f"{self.batch_norm!r} must be true or false")
        if self.batch_norm and self.batch_size < 2:
            raise ConfigError("batch_size", f"{self.batch_size} row per batch: batch norm needs at least 2")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError("dropout", f"{self.dropout!r} must lie in [0, 1)")
        if self.wide_multiplier is not None and not 0 < float(self.wide_multiplier) < float("inf"):
            raise ConfigError("wide_multiplier", f"{self.wide_multiplier!r} must be a positive number")
        dataset_options = canonical_dataset_options(self.dataset, self.dataset_options)
        if self.hidden_widths:
            widths = tuple(int(w) for w in self.hidden_widths)
            if any(not 1 <= w <= MAX_STORED_INT for w in widths):
                raise ConfigError("hidden_widths", f"{list(widths)} must be positive integers up to {MAX_STORED_INT}")
            check_widths_text("hidden_widths", widths)
            depth = self.depth if self.depth in DEPTHS else None
        else:
            choice("depth", self.depth, DEPTHS)
            widths = hidden_widths_for(self.dataset, self.depth)
            depth = self.depth
        if self.model == "mlp_wide" and self.wide_multiplier is not None:
            # scaled widths are built, and counted at submission: refuse absurd ones here, cheaply
            if max(widths) * float(self.wide_multiplier) > MAX_STORED_INT:
                raise ConfigError("wide_multiplier", f"{self.wide_multiplier!r} scales hidden width {max(widths)} "
                                  f"beyond {MAX_STORED_INT}")
        # Settings a cell does not use stay at their defaults, so one network has one hash. An
        # MLP-Wide scaled by hand keeps its spline settings in its hash (runs stored before they
        # were known to be unused are hashed with them); a grid gives it one cell instead.
        reset = [name for name in self.unused_fields() if self.model != "mlp_wide" or name not in _SPLINE_FIELDS]
        base = dataclasses.replace(self, **{name: _DEFAULT_FIELDS[name] for name in reset})
        return dataclasses.replace(
            base,
            activation=activation,
            hidden_widths=widths,
            depth=depth,
            lr=float(self.lr),
            dropout=float(base.dropout),
            wide_multiplier=None if base.wide_multiplier is None else float(base.wide_multiplier),
            hsic_beta=float(base.hsic_beta),
            hsic_sigma=float(base.hsic_sigma),
            dataset_options=dataset_options,
            extra=dict(sorted(self.extra.items())),
        )

    def unused_fields(self) -> tuple[str, ...]:
        """The fields this cell's model and trainer do not use: ``normalised`` keeps them at their
        defaults (one network, one hash; but see there for an MLP-Wide), reports show them empty."""
        unused: list[str] = []
        if self.model == "mlp" or (self.model == "mlp_wide" and self.wide_multiplier is not None):
            unused += _SPLINE_FIELDS  # an MLP-Wide scaled by hand matches no KAN
        if self.model == "kan":  # the study's code applied dropout to MLPs only
            unused.append("dropout")
        if self.model != "mlp_wide":
            unused.append("wide_multiplier")
        if self.trainer != "hsic":
            unused += ["hsic_beta", "hsic_sigma", "hsic_x_term", "hsic_format_epochs"]
        return tuple(unused)

    def check_new(self) -> None:
        """Rules for runs submitted from now on, beyond ``normalised`` (which runs stored by earlier
        versions must keep passing, or they could no longer be loaded, hashed or packed)."""
        if (self.trainer == "hsic" and self.hsic_format_epochs is not None
                and self.hsic_format_epochs >= self.max_epochs):
            raise ConfigError("hsic_format_epochs", f"{self.hsic_format_epochs} format epochs of {self.max_epochs} "
                                                    "leave no epoch of HSIC training: must be fewer than max_epochs")

    def to_dict(self) -> dict[str, Any]:
        """Every field, as ``dataclasses.asdict`` gives them (hidden widths as a list), built
        directly: asdict deep-copies field by field, a third of a large grid's submission time."""
        d = {name: getattr(self, name) for name in _FIELD_NAMES}
        d["hidden_widths"] = list(self.hidden_widths)
        d["dataset_options"] = dict(self.dataset_options)
        d["extra"] = copy.deepcopy(self.extra)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown field (known: {', '.join(sorted(known))})")
        values = dict(data)
        if "hidden_widths" in values and values["hidden_widths"] is not None:
            values["hidden_widths"] = tuple(values["hidden_widths"])
        return cls(**values)

    def config_hash(self) -> str:
        """sha256 over the normalised config as canonical JSON: the run's identity.

        ``dataset_options`` enters only when it holds a non-default option, ``matmul_precision``
        only when it is not "float32" and ``batch_norm`` only when true, so runs that use the
        defaults keep the hash they had before these fields existed."""
        return self.normalised().normalised_hash()

    def normalised_hash(self) -> str:
        """``config_hash`` of a config that ``normalised`` returned (a submission hashes each of
        thousands of cells once, without normalising it again)."""
        data = self.to_dict()
        if not data["dataset_options"]:
            del data["dataset_options"]
        if data["matmul_precision"] == "float32":
            del data["matmul_precision"]
        if not data["batch_norm"]:
            del data["batch_norm"]
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(RunConfig))
#: the fields only a KAN (and the MLP-Wide matched to it) uses
_SPLINE_FIELDS = ("spline_order", "grid_size")
#: RunConfig's defaults, what ``normalised`` puts in the fields a cell does not use
_DEFAULT_FIELDS = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
