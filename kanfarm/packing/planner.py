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
from pathlib import Path
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


#: float64 (m, m) matrices alive at once per hidden layer in an HSIC step: K - 1 and its
#: centring, the Cholesky factor (or, on CUDA, its inverse), the gradient and, with the input term,
#: two solves against that target. ``benchmarks/hsic_memory.py`` measured a peak of 5.3 per layer
#: on CUDA's solve path, 7.3 with the input term (5.2 and 7.1 on the CPU's): 8 covers both. The
#: input target R_x itself, one matrix per batch that a pack's members share, comes on top once.
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


#: most members ``auto`` packs on a CPU: packing there saves little beyond (it is compute bound)
CPU_PACK = 8


def host_available_bytes(meminfo: Path = Path("/proc/meminfo"),
                         cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Memory a new allocation can have on this host: ``MemAvailable``, and no more than what a
    container's limit (cgroup v2 ``memory.max`` - ``memory.current``, less the page cache the
    kernel drops first, ``inactive_file`` of ``memory.stat``: read datasets sit there) leaves;
    None when unknown."""
    available = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            try:
                stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
                used -= int(stat.get("inactive_file", 0))
            except (OSError, ValueError):
                pass
            left = max(0, int(limit) - used)
            available = left if available is None else min(available, left)
    except (OSError, ValueError):
        pass
    return available


def auto_pack_size(config: RunConfig, n_features: int, n_classes: int, device: str = "cpu") -> int:
    """Members that fit in half the memory free for them (``member_bytes`` each), at most ``MAX_PACK``.

    On a CUDA device: what the driver reports free plus what this process's caching allocator
    holds unused (blocks it reuses; the driver counts them as taken, so a long-lived worker's later
    packs came out smaller). On a CPU: ``host_available_bytes``, and at most ``CPU_PACK``."""
    import torch

    per_member = member_bytes(config, n_features, n_classes)
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return max(1, min(MAX_PACK, int(free * 0.5) // per_member))
    available = host_available_bytes()
    if available is None:
        return CPU_PACK
    return max(1, min(CPU_PACK, int(available * 0.5) // per_member))
