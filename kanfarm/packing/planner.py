"""Which runs can share a pack, and how many fit on a device.

Runs pack together when everything that sets tensor shapes or the data stream is equal: dataset
and its options (imdb vocabulary size, higgs split), model family and widths (KAN grid size and
spline order; for MLP-Wide, what sets its widths), batch size, epochs, seed (the batch order),
train-eval subset, matmul precision, and the trainer with its settings (HSIC's beta, sigma, X term
and format epochs). Members may differ in init, optimiser, learning rate, activation, dropout and
patience. Runs with batch norm train alone: the stacked model has no per-member running statistics.
"""
from __future__ import annotations

import json
from typing import Callable, Hashable, Sequence, TypeVar

from kanfarm.config import RunConfig

#: fields a pack's members may differ in: none of them changes a tensor shape or the batch order.
MEMBER_FIELDS = ("init", "optimizer", "lr", "activation", "dropout", "patience")
#: most members one pack takes (``auto`` included): beyond it the gain is small and a crash costs more.
MAX_PACK = 64

Id = TypeVar("Id", bound=Hashable)


def packable(config: RunConfig) -> bool:
    return not config.batch_norm


def pack_key(config: RunConfig) -> str:
    """Equal keys can share a pack (every run has one: both trainers pack); a run that is not
    ``packable`` has a key of its own, so its packs hold only it."""
    config = config.normalised()
    if not packable(config):
        return json.dumps({"alone": config.config_hash()})
    shared = {k: v for k, v in config.to_dict().items() if k not in MEMBER_FIELDS}
    return json.dumps(shared, sort_keys=True)


def plan_packs(runs: Sequence[tuple[Id, RunConfig]], pack_size: int | Callable[[RunConfig], int]) -> list[list[Id]]:
    """Group ``(id, config)`` pairs into packs of at most ``pack_size`` members, in first-seen
    order; ``pack_size`` 1 gives packs of one. A callable gives the size for the first config of
    each pack key (``auto`` sizes differ between model shapes)."""
    size_of = pack_size if callable(pack_size) else (lambda config: pack_size)
    if not callable(pack_size) and pack_size < 1:
        raise ValueError("pack_size must be at least 1")
    if pack_size == 1:
        return [[run_id] for run_id, _ in runs]
    groups: dict[str, list[Id]] = {}
    sizes: dict[str, int] = {}
    packs: list[list[Id]] = []
    for run_id, config in runs:
        key = pack_key(config)
        if key not in sizes:
            sizes[key] = max(1, size_of(config))
        group = groups.setdefault(key, [])
        if not group:
            packs.append(group)
        group.append(run_id)
        if len(group) == sizes[key]:
            del groups[key]  # full: the next run of this key starts a new pack
    return packs


#: float64 (m, m) matrices alive per hidden layer in an HSIC step (kernel, its centring and
#: regularised copy, Cholesky factor, and their gradients): a deliberate over-estimate.
HSIC_MATRICES = 8


def member_bytes(config: RunConfig, n_features: int, n_classes: int) -> int:
    """Rough device memory of one member while training: parameters with gradient and three
    optimiser buffers, plus activations (a KAN keeps bases and slopes of every hidden input), plus,
    for HSIC, the float64 batch x batch kernel matrices of every hidden layer."""
    from kanfarm.models import model_widths, param_count

    config = config.normalised()
    widths = model_widths(config, n_features, n_classes)
    per_value = config.grid_size + config.spline_order if config.model == "kan" else 1
    activations = config.batch_size * sum(widths[1:]) * (2 * per_value + 4)
    kernels = 0
    if config.trainer == "hsic":
        kernels = 2 * HSIC_MATRICES * (len(widths) - 2) * config.batch_size ** 2  # float64: 2 x 4 bytes
    return 4 * (6 * param_count(config, n_features, n_classes) + activations + kernels)


def auto_pack_size(config: RunConfig, n_features: int, n_classes: int, device: str = "cpu") -> int:
    """Members that fit in half the free memory of a CUDA device; 8 on CPU (no gain beyond)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return 8
    free, _ = torch.cuda.mem_get_info(dev)
    return max(1, min(MAX_PACK, int(free * 0.5) // member_bytes(config, n_features, n_classes)))
