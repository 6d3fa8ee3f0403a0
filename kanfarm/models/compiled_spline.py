"""On the CPU, a KAN layer's closed-form bases (and slopes) as one compiled loop (torch.compile).

Why: eager PyTorch builds the ``(batch, G + k, in)`` bases and slopes of ``uniform_spline`` in
about 16 elementwise passes over memory; Inductor's C++ backend fuses them into one vectorised
loop that writes each output once. At batch 1024, 784 -> 256 on 2 cores that is 3.6 ms instead of
~20 ms in isolation; the layer's step went from 128 to 107 ms (benchmarks/RESULTS.md).

Costs, hence the conditions: a C++ compiler, and a compile per (G + k, k, slopes or not) and
process (``warm_up`` does it before a run's first timed epoch), up to ~25 s on a fresh machine (4-6 s once Inductor's on-disk cache holds it). It pays
back over a run (a shallow MNIST KAN's epoch at batch 4096 went from 2.41 to 1.79 s: ~60 s saved
over 100 epochs) but not over a few small steps, so it is used only for blocks of at least
``MIN_ELEMENTS``, in runs whose whole work reaches ``WORTH_ELEMENTS`` (``for_run``), and
``KANFARM_CPU_COMPILE=0`` turns it off. Any failure to compile (no compiler, an
unsupported platform) turns it off for the process with one warning: the eager path computes the
same values (within float32 rounding, ~2e-7).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Callable, Iterator

import torch

from kanfarm.settings import env_flag

log = logging.getLogger(__name__)

#: smallest ``batch * (G + k) * in`` compiled (4 MiB of float32: batch >= 168 at 784 inputs, G + k = 8)
MIN_ELEMENTS = 1 << 20
#: the least spline work (basis elements over all its epochs, ``run_elements``) for which a run
#: compiles: the compile takes 5-25 s per process, and the compiled loop saves about 1.5 ns per
#: element on 2 cores (a shallow MNIST KAN epoch at batch 4096, ~4e8 elements: 2.41 -> 1.79 s), so
#: this much work repays about 12 s. Small runs and small packs train eager from the start.
WORTH_ELEMENTS = 8e9

_compiled: dict[tuple[int, int, bool], Callable] = {}
_lock = threading.Lock()
_failed = False
_run = threading.local()  # ``worth``: set by ``for_run`` around a run's training, on its thread


def cpu_compile_wanted() -> bool:
    """``KANFARM_CPU_COMPILE`` (default on; 0/false/no/off turn it off, a typo is refused)."""
    return env_flag("KANFARM_CPU_COMPILE", True)


def applies(x: torch.Tensor, n_bases: int) -> bool:
    """True when ``compiled_bases`` should take ``x`` (2-D float32 CPU rows of one layer's input)."""
    return _applies(x.device, x.dtype, x.numel() * n_bases)


def _applies(device: torch.device, dtype: torch.dtype, elements: int) -> bool:
    return (not _failed and device.type == "cpu" and dtype == torch.float32 and elements >= MIN_ELEMENTS
            and getattr(_run, "worth", True) and cpu_compile_wanted())


def run_elements(config, n_features: int, n_classes: int, rows_per_epoch: int, members: int = 1) -> float:
    """Basis elements a KAN run (or a pack of ``members``, whose first layer computes its shared
    input's bases once) computes over all its epochs: ``rows_per_epoch`` (trained and evaluated)
    times each layer's inputs times G + k. For a single run fixed by its settings, not by where it
    resumes, so a resumed run takes the path it took before (the two differ within float32
    rounding); a pack's depends on which members train together, as its results do anyway."""
    from kanfarm.models.widths import model_widths

    if config.model != "kan":
        return 0.0
    widths = model_widths(config, n_features, n_classes)[:-1]
    inputs = widths[0] + members * sum(widths[1:])
    return float(config.max_epochs) * rows_per_epoch * inputs * (config.grid_size + config.spline_order)


@contextlib.contextmanager
def for_run(elements: float) -> Iterator[None]:
    """Within it (a run's training, on this thread), large blocks take the compiled path only if
    the run's ``elements`` reach ``WORTH_ELEMENTS``: a compile (seconds) must pay for itself."""
    before = getattr(_run, "worth", True)
    _run.worth = elements >= WORTH_ELEMENTS
    try:
        yield
    finally:
        _run.worth = before


def _bases_and_slopes(x: torch.Tensor, t0: torch.Tensor, inv_h: torch.Tensor, n_bases: int,
                      terms: list[tuple[float, float]], order: int,
                      with_slopes: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What ``uniform_spline.uniform_basis`` computes (``terms``: its ``_terms(order)``), written
    for the compiler to fuse. Not shared with that function: run eagerly, this functional form is
    2-4x slower than its in-place row chunks (measured at batch 128 and 1024, 784 inputs); the
    tests hold the two equal."""
    from kanfarm.models.uniform_spline import cell_coordinates

    centres = torch.arange(n_bases, dtype=x.dtype, device=x.device).view(-1, 1) + (order + 1) / 2
    cell, frac = cell_coordinates(x, t0, inv_h)
    offset = (cell.unsqueeze(1) - centres) + frac.unsqueeze(1)
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


def _function(n_bases: int, order: int, with_slopes: bool) -> Callable:
    """The compiled function of one (G + k, k, slopes or not), for any batch and input width (with
    G + k symbolic too the loop took 4.9 instead of 3.0 ms at batch 1024, 784 inputs)."""
    key = (n_bases, order, with_slopes)
    with _lock:
        if key not in _compiled:
            from kanfarm.models.uniform_spline import _terms

            terms = _terms(order)

            def fn(x, t0, inv_h):
                return _bases_and_slopes(x, t0, inv_h, n_bases, terms, order, with_slopes)
            # a code object of its own: Dynamo keeps graphs, and counts recompiles, per code object
            name = f"kan_bases_{n_bases}_k{order}{'_slopes' if with_slopes else ''}"
            fn.__code__ = fn.__code__.replace(co_name=name)
            _compiled[key] = torch.compile(fn, dynamic=True)
        return _compiled[key]


def _compile_settings() -> contextlib.ExitStack:
    """No duck sizing (a first call with batch == in would tie the two sizes and the next call
    recompile), and an error, not a silent run of the slow functional form, when a function
    has recompiled ``recompile_limit`` times."""
    import torch._dynamo.config as dynamo_config
    import torch.fx.experimental._config as fx_config

    stack = contextlib.ExitStack()
    stack.enter_context(dynamo_config.patch(fail_on_recompile_limit_hit=True))
    stack.enter_context(fx_config.patch(use_duck_shape=False))
    return stack


def compiled_bases(x: torch.Tensor, t0: torch.Tensor, inv_h: torch.Tensor, n_bases: int, order: int,
                   with_slopes: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bases (and slopes) as ``uniform_basis`` returns them, contiguous.

    When the compiled function fails (no C++ compiler, an unsupported platform, ...), the eager
    path computes them; if that succeeds, compiling is turned off for the process with one
    warning. If eager fails too, its error is the one raised (the input, not the compiler, is at
    fault: out of memory, say) and compiling stays on."""
    global _failed
    try:
        with _compile_settings():
            # detached, contiguous: one compiled graph for every call (Dynamo guards on both)
            bases, slopes = _function(n_bases, order, with_slopes)(x.detach().contiguous(), t0.contiguous(),
                                                                   inv_h.contiguous())
        return bases.contiguous(), (slopes.contiguous() if with_slopes else None)
    except Exception as exc:
        failure = exc
    from kanfarm.models.uniform_spline import uniform_basis

    result = uniform_basis(x, t0, inv_h, n_bases, order, with_slopes)
    _failed = True
    log.warning("compiling the KAN bases for the CPU failed (%s: %s); using eager PyTorch from now on "
                "(KANFARM_CPU_COMPILE=0 skips the attempt)", type(failure).__name__, str(failure)[:300],
                exc_info=failure if log.isEnabledFor(logging.DEBUG) else None)
    return result


def warm_up(model: torch.nn.Module, rows: int, input_grads: bool = True) -> None:
    """Compile now what ``model``'s fast KAN layers will compile for blocks of up to ``rows`` rows,
    so that the compile (seconds, once per process) does not land in a timed epoch. Slopes are
    compiled only where a layer passes a gradient back: not for the first layer (its input is
    data), nor at all without ``input_grads`` (HSIC detaches every layer's input)."""
    from kanfarm.models.kan import KANLinear
    from kanfarm.models.uniform_spline import grid_origin_and_scale

    layers = [m for m in model.modules() if isinstance(m, KANLinear) and m.uses_fast_path()]
    for i, layer in enumerate(layers):
        n_bases = layer.grid_size + layer.spline_order
        if not _applies(layer.base_weight.device, layer.base_weight.dtype, rows * layer.in_features * n_bases):
            continue
        t0, inv_h = grid_origin_and_scale(layer.grid)
        x = layer.base_weight.new_zeros(2, layer.in_features)
        for with_slopes in (False, True) if i and input_grads else (False,):
            with torch.no_grad():  # as in the layer's forward: grad mode is part of what was compiled
                compiled_bases(x, t0, inv_h, n_bases, layer.spline_order, with_slopes)
