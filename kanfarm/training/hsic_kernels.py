"""Gaussian kernels and normalised HSIC (NOCCO, Ma et al. 2020) for the HSIC Bottleneck trainer.

nHSIC(X, Y) = trace(R_x R_y), R = K~ (K~ + eps*m*I)^-1, K~ = HKH (both-sided centring).

Numerics: K~ + eps*m*I is symmetric positive definite with smallest eigenvalue >= eps*m, so a
Cholesky factor always exists and solves replace the inverse. Everything past the feature
matrices runs in float64: Gaussian kernels with the study's wide width (sigma = 10, scaled by d)
sit within ~1e-3 of 1, so centring in float32 would keep only 3-4 significant digits. Centring
uses ``expm1`` (K - 1) instead of K: HKH is blind to constant shifts, and K - 1 keeps full
relative precision where K ~ 1.

Why Cholesky rather than an eigendecomposition: R's eigenvectors are those of K~, whose spectrum
has one exact zero and a long tail of tiny, nearly equal eigenvalues; eigh's backward divides by
eigenvalue gaps and blows up there, while the Cholesky route only needs K~ + eps*m*I to be well
conditioned (condition number <= (m + eps*m) / (eps*m)). benchmarks/hsic_step.py measures both.

The trainer's path (``layer_terms``) does less work than the formula as written:

* the label kernel of one-hot labels is low rank: K_y = e*11^T + (1 - e)*YY^T, so K~_y = F F^T
  with F = sqrt(1 - e)*(Y - mean(Y)), m x C. By the push-through identity
  R_y = F (F^T F + eps*m*I)^-1 F^T, and trace(R_z R_y) needs R_z applied to C columns only: one
  Cholesky of an m x m matrix per hidden layer plus O(m^2 C) work;
* all hidden layers go through each step as one batch (features zero-padded to the widest);
* gradients are closed-form, computed with the values and handed to autograd at the layer
  outputs: no autograd graph over the m x m float64 matrices, whose every node would cost a
  kernel launch (at the study's batch the step is bound by launches, not by arithmetic).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

WORK_DTYPE = torch.float64


def _squared_distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise |a - b|^2 with the expansion |a|^2 + |b|^2 - 2ab, clamped at 0, exact 0 diagonal.

    The columns are centred first: distances do not change, and the expansion no longer cancels
    catastrophically when all rows share a large offset (|a|^2 >> |a - b|^2)."""
    x = x - x.mean(dim=-2, keepdim=True)
    sq = (x * x).sum(dim=-1)
    d = sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2.0 * (x @ x.transpose(-1, -2))
    d = d.clamp_min(0.0)
    eye = torch.eye(x.shape[-2], dtype=torch.bool, device=x.device)
    return d.masked_fill(eye, 0.0)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def gaussian_kernel(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(m, m) kernel exp(-|a - b|^2 / (2 sigma^2 d)) over the rows of ``x`` (d = features per row),
    computed in float64 (see module docstring)."""
    x = _flat(x).to(WORK_DTYPE)
    d = x.shape[1]
    return torch.exp(-_squared_distances(x) / (2.0 * sigma * sigma * d))


def centre(k: torch.Tensor) -> torch.Tensor:
    """HKH by subtracting row, column and grand means (O(m^2), no H matmuls)."""
    row = k.mean(dim=-1, keepdim=True)
    col = k.mean(dim=-2, keepdim=True)
    return (k - row).sub_(col - row.mean(dim=-2, keepdim=True))


def _features(zs: list[torch.Tensor], sigma: float) -> tuple[torch.Tensor, list[float]]:
    """Hidden outputs ``zs`` (each ``(*lead, m, d_l)``) as one float64 batch ``(L, *lead, m, d)``,
    d the widest layer, and the scale 1 / sqrt(2 sigma^2 d_l) each layer was multiplied by.

    Scaled, a squared distance is already divided by the kernel's width; zero-padded columns add
    nothing to a distance; centred over rows, the distance expansion does not cancel when every
    row shares a large offset (|a|^2 >> |a - b|^2). A few outlier rows still make it cancel for
    the others (see ``Factors.failed``)."""
    scales = [1.0 / math.sqrt(2.0 * sigma * sigma * z.shape[-1]) for z in zs]
    x = torch.zeros(len(zs), *zs[0].shape[:-1], max(z.shape[-1] for z in zs), dtype=WORK_DTYPE,
                    device=zs[0].device)
    for layer, z, scale in zip(x, zs, scales):
        layer[..., :z.shape[-1]].add_(z, alpha=scale)  # computed in float64
    return x - x.mean(dim=-2, keepdim=True), scales


def _kernel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, K~) for scaled, centred features ``x`` (..., m, d): E = K - 1 = expm1(-|a - b|^2), with
    an exact 0 diagonal, and K~ = H E H (= H K H)."""
    sq = (x * x).sum(dim=-1)
    e = (-sq).unsqueeze(-1) - sq.unsqueeze(-2)
    e.view(-1, *e.shape[-2:]).baddbmm_(x.view(-1, *x.shape[-2:]), x.view(-1, *x.shape[-2:]).transpose(-1, -2),
                                       alpha=2.0)  # -|a - b|^2 = 2ab - |a|^2 - |b|^2
    e.clamp_max_(0.0).diagonal(dim1=-2, dim2=-1).zero_()
    e = e.expm1_()
    return e, centre(e)


def _kernel_grad(g: torch.Tensor, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """dL/dX for dL/dK~ = ``g`` (..., m, m), where K~ = H E H, E = expm1(-D), D_ij = |x_i - x_j|^2,
    and ``g`` is centred (H g H = g) and symmetric, as every ``Target.nhsic`` gradient is.

    dL/dE = H g H = g (centring is self-adjoint); dE/dD = -(E + 1); with Q = g o (E + 1),
    dL/dx_i = -sum_j (Q_ij + Q_ji) * 2 (x_i - x_j), so dL/dX = 4 (Q X - diag(Q 1) X): one
    m x m x d product per layer, and no pass over E's graph."""
    q = torch.addcmul(g, g, e)  # g o (E + 1)
    return torch.addcmul(q @ x, q.sum(dim=-1, keepdim=True), x, value=-1.0).mul_(4.0)


@torch.no_grad()
def centred_gaussian_kernel(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """H K H for ``gaussian_kernel(z, sigma)`` (float64, batched over the leading dims of a (..., m, d)
    input), from K - 1 = expm1(.) for precision. Data only: no gradient flows back to ``z`` (the
    trainer's gradients are closed-form, ``layer_terms``)."""
    x, _ = _features([z], sigma)
    return _kernel(x)[1][0]


def nhsic(kx: torch.Tensor, ky: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Normalised HSIC trace(R_x R_y) of two (m, m) kernel matrices (uncentred), float64 scalar.

    General form: both kernels are centred and each R is obtained by a Cholesky solve."""
    kx, ky = centre(kx.to(WORK_DTYPE)), centre(ky.to(WORK_DTYPE))
    rx, ry = _resolvent(kx, eps), _resolvent(ky, eps)
    return (rx * ry.transpose(-1, -2)).sum(dim=(-1, -2))


#: On CUDA a batch of matrices at least this large is factorised, and solved with, one matrix at a
#: time (``_cholesky_ex``, ``_cholesky_solve``); the value follows the cross-over reported for
#: cuSOLVER's batched routine.
LOOPED_CHOLESKY_MIN = 256

#: On CUDA, factors at least this large are solved with through their inverse (``Factors``). On an
#: H200, the inverse and two products against 10 columns took 0.98 ms at 2048 and 1.82 ms at 4096,
#: the triangular solve 1.19 and 2.80 ms; below 2048 the triangular solve was faster (0.25 against
#: 0.51 ms at 256, 0.80 against 1.14 ms at 1024).
INVERSE_SOLVE_MIN = 2048


def _on_cuda_from(a: torch.Tensor, size: int, override: bool | None) -> bool:
    if override is None:
        return a.device.type == "cuda" and a.shape[-1] >= size
    return override


def _one_at_a_time(a: torch.Tensor, looped: bool | None) -> bool:
    return _on_cuda_from(a, LOOPED_CHOLESKY_MIN, looped)


def _cholesky_ex(a: torch.Tensor, looped: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.cholesky_ex`` over a batch, choosing how the batch is factorised.

    For a batch of CUDA matrices torch calls cuSOLVER's ``potrfBatched``, a routine made for many
    small matrices; a few 2048 x 2048 kernels (one per pack member) are what the single-matrix,
    blocked ``potrf`` is for, so large CUDA matrices go one at a time. The result is the same
    factorisation either way; ``benchmarks/hsic_step.py`` times both. ``looped`` overrides the choice."""
    if not _one_at_a_time(a, looped) or a.dim() == 2:
        return torch.linalg.cholesky_ex(a)
    flat = a.reshape(-1, *a.shape[-2:])
    parts = [torch.linalg.cholesky_ex(mat) for mat in flat.unbind(0)]
    factor = torch.stack([f for f, _ in parts]).reshape(a.shape)
    info = torch.stack([i for _, i in parts]).reshape(a.shape[:-2])
    return factor, info


def _cholesky_solve(b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``torch.cholesky_solve(b, factor)`` over a batch, one matrix at a time where ``_cholesky_ex``
    factorises so: a batch of CUDA matrices goes to batched triangular-solve kernels (64 launches
    for two 2048 x 2048 factors on an H200, 30% of an MLP HSIC step's device time)."""
    b = b.expand(*factor.shape[:-2], *b.shape[-2:])
    if not _one_at_a_time(factor, None) or factor.dim() == 2:
        return torch.cholesky_solve(b, factor)
    flat_b, flat_f = b.reshape(-1, *b.shape[-2:]), factor.reshape(-1, *factor.shape[-2:])
    return torch.stack([torch.cholesky_solve(x, f) for x, f in zip(flat_b.unbind(0), flat_f.unbind(0))]
                       ).reshape(b.shape)


#: Diagonal blocks of ``tril_inverse`` are inverted by a triangular solve up to this size.
TRIL_LEAF = 128


def tril_inverse(l: torch.Tensor, leaf: int = TRIL_LEAF) -> torch.Tensor:
    """Inverse of lower-triangular ``l`` (..., n, n) by recursive doubling, as batched products.

    Why: cuBLAS's triangular solve walks the diagonal one panel after another; with the 10 columns
    of a label target it took 1.1 ms per 2048 x 2048 factor on an H200, longer than the
    factorisation. Here the diagonal blocks are inverted as one batch, then pairs of neighbouring
    blocks are joined with [[A, 0], [C, B]]^-1 = [[A^-1, 0], [-B^-1 C A^-1, B^-1]], all pairs of a
    level at once: log2(n / leaf) levels of two batched products each, from blocks of
    ceil(n / 2^levels) <= leaf. A matrix whose size 2^levels does not divide is padded with an
    identity block, whose inverse is itself.

    Accuracy: this inverts the factor, not A; cond(L) = sqrt(cond(A)) <= ~316 at the trainer's
    eps, and L^-T (L^-1 b) matched the triangular solve to 2e-15 (relative) on an H200 at sizes
    128-4096 (``benchmarks/hsic_solves.py``)."""
    n, lead = l.shape[-1], l.shape[:-2]
    levels = max(0, math.ceil(math.log2(n / leaf)))
    size = -(-n // (1 << levels))  # ceil: blocks of the first level
    padded = size << levels
    if padded != n:
        grown = torch.zeros(*lead, padded, padded, dtype=l.dtype, device=l.device)
        grown[..., :n, :n] = l
        grown[..., n:, n:].diagonal(dim1=-2, dim2=-1).fill_(1.0)
        l = grown
    out = torch.zeros_like(l)
    eye = torch.eye(size, dtype=l.dtype, device=l.device)
    _blocks(out, size).copy_(torch.linalg.solve_triangular(_blocks(l, size), eye, upper=False))
    while size < padded:
        pairs_l, pairs_out = _blocks(l, 2 * size), _blocks(out, 2 * size)
        a_inv, b_inv = pairs_out[..., :size, :size], pairs_out[..., size:, size:]
        pairs_out[..., size:, :size].sub_((b_inv @ pairs_l[..., size:, :size]) @ a_inv)
        size *= 2
    return out[..., :n, :n] if padded != n else out


def _blocks(a: torch.Tensor, size: int) -> torch.Tensor:
    """The (size x size) diagonal blocks of ``a`` (..., n, n) as a (..., n / size, size, size) view."""
    count = a.shape[-1] // size
    grid = a.unflatten(-1, (count, size)).unflatten(-3, (count, size))  # (..., count, size, count, size)
    return grid.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)


def _shifted(kc: torch.Tensor, eps: float) -> torch.Tensor:
    """K~ + eps*m*I as a new tensor (batched), adding to the diagonal only."""
    a = kc.clone()
    a.diagonal(dim1=-2, dim2=-1).add_(eps * kc.shape[-1])
    return a


def _resolvent(kc: torch.Tensor, eps: float) -> torch.Tensor:
    """R = (K~ + eps m I)^-1 K~ (= K~ (K~ + eps m I)^-1; they commute) for a centred kernel;
    differentiable, for the general ``nhsic``."""
    factor, info = _cholesky_ex(_shifted(kc, eps))
    return torch.cholesky_solve(kc, factor) + _failures(info)[..., None, None]


def _failures(info: torch.Tensor) -> torch.Tensor:
    """0 where a factorisation succeeded and NaN where it did not (``info`` != 0), in float64: added
    to a result it makes a matrix with no factor give NaN rather than raise or give finite garbage,
    with no host sync waiting for ``info`` on a GPU."""
    return torch.where(info == 0, 0.0, math.nan).to(WORK_DTYPE)


class Factors(NamedTuple):
    """What solving with A = K~ + eps m I needs, computed once per kernel and shared by targets:
    the Cholesky factor ``l`` or, where solving by products is faster (``INVERSE_SOLVE_MIN``), only
    its inverse ``l_inv`` (``tril_inverse``; the factor is not kept: one m x m matrix less).

    ``failed`` is ``_failures`` per matrix: added to a value or gradient it makes that run's (or
    pack member's) loss non-finite, so the run is marked diverged as under backprop. A is
    positive definite in exact arithmetic, but a diverging layer's outlier activations (one at
    1e10 among values near 1) wipe out the other rows' distances in the expansion, leave K~ with
    negative eigenvalues beyond eps m, and a factorisation that stops part way: its solves are
    finite and wrong (an nHSIC of -2e12), not NaN."""

    l: torch.Tensor | None
    l_inv: torch.Tensor | None
    failed: torch.Tensor

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """A^-1 b."""
        if self.l_inv is None:
            return _cholesky_solve(b, self.l)
        return self.l_inv.transpose(-1, -2) @ (self.l_inv @ b)


def _by_inverse(factor: torch.Tensor) -> bool:
    return _on_cuda_from(factor, INVERSE_SOLVE_MIN, None)


@torch.no_grad()
def hsic_factors(kc: torch.Tensor, eps: float = 1e-5) -> Factors:
    """``Factors`` of K~ + eps m I (batched)."""
    factor, info = _cholesky_ex(_shifted(kc, eps))
    failed = _failures(info)
    return Factors(None, tril_inverse(factor), failed) if _by_inverse(factor) else Factors(factor, None, failed)


@dataclass(frozen=True)
class Target:
    """A variable that hidden layers are compared against, prepared once per batch (data: no
    gradient flows into it). Either low rank, R_t = F M F^T (``f``, ``fm`` = F M, ``mat`` = M), or
    full, ``r`` = R_t."""

    f: torch.Tensor | None = None
    fm: torch.Tensor | None = None
    mat: torch.Tensor | None = None
    r: torch.Tensor | None = None

    def nhsic(self, kc: torch.Tensor, factors: Factors, eps: float,
              weight: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """trace(R_z R_t) for centred kernels ``kc`` (..., m, m), and, given a ``weight`` w, the
        gradient of w * trace(R_z R_t) with respect to K~_z (else None).

        With A = K~ + cI (c = eps m), K~ A^-1 = I - c A^-1, so d trace(K~ A^-1 T) = c trace(dK~ A^-1 T A^-1):
        the gradient is c A^-1 T A^-1, which is centred and symmetric like T. Low rank, it is the
        rank-C product c S M S^T with S = A^-1 F, solved for in the value already."""
        c = eps * kc.shape[-1]
        if self.r is None:
            s = factors.solve(self.f)  # A^-1 F
            value = ((kc @ s) * self.fm).sum(dim=(-1, -2))  # trace(F^T R_z F M), R_z F = K~ A^-1 F
            grad = None if weight is None else (s @ (self.mat * (c * weight))) @ s.transpose(-1, -2)
            return value, grad
        p = factors.solve(self.r)  # A^-1 R_t; trace(K~ A^-1 R_t) = sum((A^-1 R_t) o K~), all symmetric
        value = (p * kc).sum(dim=(-1, -2))
        grad = None if weight is None else factors.solve(p.transpose(-1, -2)).mul_(c * weight)
        return value, grad


def label_target(y: torch.Tensor, n_classes: int, sigma: float, eps: float = 1e-5) -> Target:
    """Target for integer labels ``y`` under the Gaussian kernel on their one-hot codes (d = C).

    One-hot rows are at squared distance 0 or 2, so K_y = e 11^T + (1 - e) Y Y^T with
    e = exp(-1 / (sigma^2 C)); centring removes e 11^T. M = (F^T F + eps m I)^-1 is C x C."""
    m = y.shape[0]
    onehot = torch.nn.functional.one_hot(y, n_classes).to(WORK_DTYPE)
    scale = math.sqrt(-math.expm1(-1.0 / (sigma * sigma * n_classes)))
    f = scale * (onehot - onehot.mean(dim=0, keepdim=True))
    g = f.T @ f + (eps * m) * torch.eye(n_classes, dtype=WORK_DTYPE, device=y.device)
    # g >= eps*m*I is positive definite for any labels: cholesky_ex skips the error check, which
    # on a GPU would wait for the device (a host sync in every training step)
    mat = torch.cholesky_inverse(torch.linalg.cholesky_ex(g).L)
    return Target(f=f, fm=f @ mat, mat=mat)


@torch.no_grad()
def full_target(x: torch.Tensor, sigma: float, eps: float = 1e-5) -> Target:
    """Target for a full-rank variable (the network input X): R_x, computed once per batch."""
    kc = centred_gaussian_kernel(_flat(x), sigma)
    factors = hsic_factors(kc, eps)
    return Target(r=factors.solve(kc) + factors.failed[..., None, None])


def layer_terms(zs: list[torch.Tensor], targets: list[Target], sigma: float, eps: float = 1e-5,
                weights: list[float] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """nHSIC of hidden outputs ``zs`` (each ``(*lead, m, d_l)``) against each target, per target a
    tensor ``(L, *lead)``; and, given ``weights`` (one per target), the gradient of
    sum_t w_t * sum(values_t) with respect to each z, in z's dtype (else None).

    The layers go through as one batch: one kernel, factorisation and solve per layer, shared by
    the targets. Gradients are closed-form (``Target.nhsic``, ``_kernel_grad``)."""
    x, scales = _features(zs, sigma)
    e, kc = _kernel(x)
    factors = hsic_factors(kc, eps)
    values, grad = [], None
    for i, target in enumerate(targets):
        value, g = target.nhsic(kc, factors, eps, None if weights is None else weights[i])
        values.append(value + factors.failed)
        grad = g if grad is None else grad.add_(g)
    if weights is None:
        return values, None
    dx = _kernel_grad(grad, x, e).add_(factors.failed[..., None, None])
    return values, [(layer[..., :z.shape[-1]] * scale).to(z.dtype) for layer, z, scale in zip(dx, zs, scales)]
