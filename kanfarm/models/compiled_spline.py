"""On the CPU, a KAN layer's closed-form bases (and slopes) as one compiled loop (torch.compile).

Why: eager PyTorch builds the ``(batch, G + k, in)`` bases and slopes of ``uniform_spline`` in
about 16 elementwise passes over memory; Inductor's C++ backend fuses them into one vectorised
loop that writes each output once. At batch 1024, 784 -> 256 on 2 cores that is 3.6 ms instead of
~20 ms in isolation; the layer's step went from 128 to 107 ms (benchmarks/RESULTS.md).

Costs, hence the conditions: a C++ compiler, and a compile per (G + k, k, slopes or not) and
process, up to ~25 s on a fresh machine (4-6 s once Inductor's on-disk cache holds it). It pays
back over a run (a shallow MNIST KAN's epoch at batch 4096 went from 2.41 to 1.79 s: ~60 s saved
over 100 epochs) but not over a few small steps, so it is used only for blocks of at least
``MIN_ELEMENTS``, and ``KANFARM_CPU_COMPILE=0`` turns it off. Any failure to compile (no compiler, an
unsupported platform) turns it off for the process with one warning: the eager path computes the
same values (within float32 rounding, ~2e-7).
"""
from __future__ import annotations

import logging
import threading

import torch

from kanfarm.config import env_flag

log = logging.getLogger(__name__)

#: smallest ``batch * (G + k) * in`` compiled (4 MiB of float32: batch >= 168 at 784 inputs, G + k = 8)
MIN_ELEMENTS = 1 << 20

_compiled: dict[tuple[int, int, bool], object] = {}
_lock = threading.Lock()
_failed = False


def cpu_compile_wanted() -> bool:
    """``KANFARM_CPU_COMPILE`` (default on; 0/false/no/off turn it off, a typo is refused)."""
    return env_flag("KANFARM_CPU_COMPILE", True)


def applies(x: torch.Tensor, n_bases: int) -> bool:
    """True when ``compiled_bases`` should take ``x`` (2-D float32 CPU rows of one layer's input)."""
    return (not _failed and x.device.type == "cpu" and x.dtype == torch.float32
            and x.numel() * n_bases >= MIN_ELEMENTS and cpu_compile_wanted())


def _bases_and_slopes(x: torch.Tensor, t0: torch.Tensor, inv_h: torch.Tensor, n_bases: int, order: int,
                      terms: list[tuple[float, float]], with_slopes: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What ``uniform_spline.uniform_basis`` computes (``terms``: its ``_terms(order)``), written
    for the compiler to fuse. Not shared with that function: run eagerly, this functional form is
    2-4x slower than its in-place row chunks (measured at batch 128 and 1024, 784 inputs); the
    tests hold the two equal."""
    centres = torch.arange(n_bases, dtype=x.dtype, device=x.device).view(-1, 1) + (order + 1) / 2
    offset = ((x - t0) * inv_h).unsqueeze(1) - centres
    r = offset.abs()
    bases = slopes = None
    for shift, coef in terms:
        q = (shift - r).clamp(min=0)
        power = q
        for _ in range(order - 2):  # q ** (order - 1) as products: a traced power is a generic pow()
            power = power * q
        bases = coef * power * q if bases is None else bases + coef * power * q
        if with_slopes:
            slopes = coef * order * power if slopes is None else slopes + coef * order * power
    return bases, (slopes * offset.sign() if with_slopes else None)


def _function(n_bases: int, order: int, with_slopes: bool):
    key = (n_bases, order, with_slopes)
    with _lock:
        if key not in _compiled:
            from kanfarm.models.uniform_spline import _terms

            terms = _terms(order)

            def fn(x, t0, inv_h):
                return _bases_and_slopes(x, t0, inv_h, n_bases, order, terms, with_slopes)
            _compiled[key] = torch.compile(fn, dynamic=True)
        return _compiled[key]


def compiled_bases(x: torch.Tensor, t0: torch.Tensor, inv_h: torch.Tensor, n_bases: int, order: int,
                   with_slopes: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Bases (and slopes) as ``uniform_basis`` returns them, or None when compiling failed (then
    never tried again in this process)."""
    global _failed
    try:
        return _function(n_bases, order, with_slopes)(x, t0, inv_h)
    except Exception as exc:  # no compiler, unsupported platform, ...: eager computes the same
        _failed = True
        log.warning("compiling the KAN bases for the CPU failed (%s: %s); using eager PyTorch "
                    "(set KANFARM_CPU_COMPILE=0 to skip the attempt)", type(exc).__name__, str(exc)[:300])
        return None
