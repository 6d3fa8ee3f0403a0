"""Triton kernels for a pack's training step on CUDA (float32): the optimiser update and the
dropout masks, each one launch for the whole pack.

Why: a pack of small models is bound by kernel launches, not arithmetic. The eager
``StackedOptimizer.step`` takes a dozen elementwise ops per parameter and optimiser kind (SGD,
momentum, Adam side by side, each with a masked commit); ``fused_step`` does a whole stacked
parameter in one launch: each program reads its member's kind, learning rate and live flag, and a
dead member's program writes nothing, so its parameters and state stay frozen. The arithmetic
follows the eager step (torch.optim's single-tensor formulas) op for op; the compiler may contract
a product and a sum into one fused multiply-add, so a member can differ from the eager step in the
last bits.

The eager pack draws each member's dropout mask with its own ``bernoulli_`` call (one launch per
member and layer); ``dropout_noise`` draws all of them at once from counter-based Philox streams:
member m's mask at (step, layer) is a function of (key_m, step, layer, element) only, with key_m
taken from the member's config hash. So a member's masks do not depend on which pack it trains
in, and resuming at an epoch reproduces them without storing any random state (the step count is
restored with the optimiser). On the CPU the pack keeps the eager draws, which equal a solo run's.

Imported only when a CUDA pack trains, or by tests, which run the kernels on the CPU under
``TRITON_INTERPRET=1`` (tests/test_triton_pack.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit(do_not_specialize=["first_step"])  # the same compiled kernel at step 1 and after
def _member_step(p_ptr, g_ptr, buf_ptr, m_ptr, v_ptr, kind_ptr, neg_lr_ptr, neg_step_ptr, alive_ptr,
                 n, first_step, bc2_sqrt, momentum, beta1_weight, beta2, one_minus_beta2, eps,
                 BLOCK_N: tl.constexpr):
    member = tl.program_id(0)
    if tl.load(alive_ptr + member) != 0:
        offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = offs < n
        idx = member.to(tl.int64) * n + offs
        kind = tl.load(kind_ptr + member)
        neg_lr = tl.load(neg_lr_ptr + member)
        p = tl.load(p_ptr + idx, mask=ok)
        g = tl.load(g_ptr + idx, mask=ok)
        if kind == 0:
            tl.store(p_ptr + idx, p + g * neg_lr, mask=ok)
        elif kind == 1:
            if first_step != 0:
                buf = g
            else:
                buf = tl.load(buf_ptr + idx, mask=ok) * momentum + g
            tl.store(buf_ptr + idx, buf, mask=ok)
            tl.store(p_ptr + idx, p + (g + buf * momentum) * neg_lr, mask=ok)
        else:
            m = tl.load(m_ptr + idx, mask=ok)
            v = tl.load(v_ptr + idx, mask=ok)
            m = m + beta1_weight * (g - m)  # torch.lerp(m, g, w) for w < 0.5
            v = v * beta2 + one_minus_beta2 * g * g  # addcmul_'s (value * t1) * t2
            tl.store(m_ptr + idx, m, mask=ok)
            tl.store(v_ptr + idx, v, mask=ok)
            denom = tl.sqrt_rn(v) / bc2_sqrt + eps
            tl.store(p_ptr + idx, p + (tl.load(neg_step_ptr + member) * m) / denom, mask=ok)


def fused_step(p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], kinds: torch.Tensor,
               neg_lr: torch.Tensor, neg_step: torch.Tensor, alive: torch.Tensor, *, first_step: bool,
               bc2_sqrt: float, momentum: float, betas: tuple[float, float], eps: float) -> None:
    """Update the stacked parameter ``p`` ``(M, ...)`` and its ``state`` in place from ``g``.

    ``kinds`` (int32, M) holds each member's index in ``optim._ORDER`` (0 sgd, 1 sgd_momentum,
    2 adam); ``neg_lr`` and ``neg_step`` (float32,
    M) are ``-lr`` and Adam's ``-lr / (1 - beta1^t)``; ``alive`` (bool, M) False freezes a member."""
    members = p.shape[0]
    n = p.numel() // members
    g = g.contiguous()
    tensors = (p, g, state["momentum_buffer"], state["exp_avg"], state["exp_avg_sq"])
    if any(not t.is_contiguous() or t.shape != p.shape or t.dtype != torch.float32 for t in tensors):
        raise ValueError("fused_step needs contiguous float32 tensors of the parameter's shape")
    grid = (members, triton.cdiv(n, BLOCK))
    _member_step[grid](*tensors, kinds, neg_lr, neg_step, alive.view(torch.uint8),
                       n, int(first_step), bc2_sqrt, momentum, 1 - betas[0], betas[1], 1 - betas[1], eps,
                       BLOCK_N=BLOCK)


@triton.jit(do_not_specialize=["step", "layer"])
def _member_noise(noise_ptr, key_ptr, keep_ptr, scale_ptr, n, step, layer, BLOCK_N: tl.constexpr):
    member = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < n
    key = tl.load(key_ptr + member)
    bits, _, _, _ = tl.philox(key, offs, tl.zeros_like(offs) + step, tl.zeros_like(offs) + layer,
                              tl.zeros_like(offs))
    u = tl.uint_to_uniform_float(bits)
    keep = tl.load(keep_ptr + member)
    noise = tl.where(u < keep, tl.load(scale_ptr + member), 0.0)
    tl.store(noise_ptr + member.to(tl.int64) * n + offs, noise, mask=ok)


def dropout_noise(like: torch.Tensor, keys: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor,
                  step: int, layer: int) -> torch.Tensor:
    """Noise ``(M, ...)`` shaped as ``like``: member m's elements are ``scale[m]`` with probability
    ``keep[m]`` and 0 otherwise, from the stream (``keys[m]`` int64, ``step``, ``layer``). A member
    with ``keep`` 1 gets ``scale`` everywhere (uniforms lie in [0, 1))."""
    members = like.shape[0]
    n = like.numel() // members
    if n >= 2 ** 31 or not 0 <= step < 2 ** 31 or not 0 <= layer < 2 ** 31:
        raise ValueError("dropout_noise: counters must fit in 31 bits")
    noise = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    _member_noise[(members, triton.cdiv(n, BLOCK))](noise, keys, keep, scale, n, step, layer, BLOCK_N=BLOCK)
    return noise
