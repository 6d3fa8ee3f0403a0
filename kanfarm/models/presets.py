"""Hidden-layer widths of the study's shallow/medium/deep architectures, per dataset (FACTS.md)."""
from __future__ import annotations

_SMALL = {"shallow": (32,), "medium": (64, 32), "deep": (128, 64, 32)}
_LARGE = {"shallow": (256,), "medium": (512, 256), "deep": (1024, 512, 256)}

#: dataset name -> depth name -> hidden widths. ``digits`` (8x8 images) uses MNIST's small widths.
DEPTH_WIDTHS: dict[str, dict[str, tuple[int, ...]]] = {
    "digits": _SMALL,
    "mnist": _SMALL,
    "fashion-mnist": _SMALL,
    "imdb": _SMALL,
    "cifar10": _LARGE,
    "higgs": _LARGE,
}


def hidden_widths_for(dataset: str, depth: str | None) -> tuple[int, ...]:
    from kanfarm.config import ConfigError

    if dataset not in DEPTH_WIDTHS:
        raise ConfigError("dataset", f"{dataset!r} has no depth presets; known: {', '.join(DEPTH_WIDTHS)}"
                          " (or give hidden_widths explicitly)")
    if depth not in DEPTH_WIDTHS[dataset]:
        raise ConfigError("depth", f"{depth!r} is not one of {', '.join(DEPTH_WIDTHS[dataset])}")
    return DEPTH_WIDTHS[dataset][depth]
