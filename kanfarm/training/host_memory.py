"""Opt-in: a training process keeps the host memory it frees, for the next step (glibc malloc).

Why: a training step on the CPU allocates the same large tensors every step (a KAN layer's bases
are batch x (G + k) x in floats: 100 MB at batch 4096 and 784 inputs). glibc hands out blocks
above its mmap threshold (which adapts up to 32 MiB) as fresh pages and unmaps them on free, so
every step page-faults its working set in again. With higher mmap and trim thresholds freed blocks
stay in the heap and later steps reuse them. Measured on a 2-core VM (benchmarks/RESULTS.md, "Host
memory"): epochs 1.2-1.4x faster for the fast KAN layer and 3.8x for the Cox-de Boor reference,
but the heap fragments (``posix_memalign`` requests do not fit the blocks just freed) and resident
memory grew 1.5x (fast) to 3.5x (reference). Off by default for that reason. Threads share the
main heap (``M_ARENA_MAX`` 1): a thread's own arena is capped at 64 MiB, so it would map a large
block afresh whatever the threshold; set before a training thread starts (``local``).

``KANFARM_KEEP_FREED_MEMORY=1`` turns it on for run-executing processes. Elsewhere than glibc: nothing.
"""
from __future__ import annotations

import ctypes
import logging
import platform

from kanfarm.settings import env_flag

#: glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
#: blocks up to 1 GiB come from the heap; the heap's top is returned only beyond 2 GiB free
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1

log = logging.getLogger(__name__)

_applied: bool | None = None  # None: not tried yet in this process


def keep_freed_memory_wanted() -> bool:
    """``KANFARM_KEEP_FREED_MEMORY`` (default off; 1/true/yes/on turn it on, a typo is refused)."""
    return env_flag("KANFARM_KEEP_FREED_MEMORY", False)


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds and share its main heap, for this process, once
    (when ``KANFARM_KEEP_FREED_MEMORY`` is on); True when they are set."""
    global _applied
    if _applied is not None or not keep_freed_memory_wanted():
        return bool(_applied)
    libc = ctypes.CDLL(None) if platform.libc_ver()[0] == "glibc" else None
    _applied = libc is not None and all(libc.mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    if not _applied:
        log.warning("KANFARM_KEEP_FREED_MEMORY is on but has no effect here (it needs glibc's malloc)")
    return _applied
