"""Gaussian kernels and normalised HSIC (NOCCO, Ma et al. 2020) for the HSIC Bottleneck trainer.

nHSIC(X, Y) = trace(R_x R_y), R = K~ (K~ + eps*m*I)^-1, K~ = HKH (both-sided centring).

Numerics: K~ + eps*m*I is symmetric positive definite with smallest eigenvalue >= eps*m, so a
Cholesky factor always exists and ``cholesky_solve`` replaces the inverse. Everything past the
feature matrices runs in float64: Gaussian kernels with the study's wide width (sigma = 10, scaled
by d) sit within ~1e-3 of 1, so centring in float32 would keep only 3-4 significant digits.
Centring uses ``expm1`` (K - 1) instead of K: HKH is blind to constant shifts, and K - 1 keeps full
relative precision where K ~ 1.

Why Cholesky rather than an eigendecomposition: R's eigenvectors are those of K~, whose spectrum
has one exact zero and a long tail of tiny, nearly equal eigenvalues; eigh's backward divides by
eigenvalue gaps and blows up there, while Cholesky's backward only needs K~ + eps*m*I to be well
conditioned (condition number <= (m + eps*m) / (eps*m)). benchmarks/hsic_step.py measures both.

The trainer's fast path (``nhsic_against``) exploits that the label kernel of one-hot labels is
low rank: K_y = e*11^T + (1 - e)*YY^T, so K~_y = F F^T with F = sqrt(1 - e)*(Y - mean(Y)), m x C.
By the push-through identity R_y = F (F^T F + eps*m*I)^-1 F^T, and trace(R_z R_y) needs R_z
applied to C columns only: one Cholesky of an m x m matrix per hidden layer (batched over layers)
plus O(m^2 C) work, instead of factorising and solving two full m x m systems per layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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
    return k - row - col + row.mean(dim=-2, keepdim=True)


def centred_gaussian_kernel(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """H K H for ``gaussian_kernel(x, sigma)``, from K - 1 = expm1(.) for precision; batched over
    leading dims of a (..., m, d) input."""
    x = x.to(WORK_DTYPE)
    d = x.shape[-1]
    return centre(torch.expm1(-_squared_distances(x) / (2.0 * sigma * sigma * d)))


def nhsic(kx: torch.Tensor, ky: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Normalised HSIC trace(R_x R_y) of two (m, m) kernel matrices (uncentred), float64 scalar.

    General form: both kernels are centred and each R is obtained by a Cholesky solve."""
    kx, ky = centre(kx.to(WORK_DTYPE)), centre(ky.to(WORK_DTYPE))
    rx, ry = _resolvent(kx, eps), _resolvent(ky, eps)
    return (rx * ry.transpose(-1, -2)).sum(dim=(-1, -2))


#: On CUDA a batch of matrices at least this large is factorised, and solved with, one matrix at a
#: time (see ``_cholesky_ex``); the value follows the cross-over reported for cuSOLVER's batched routine.
LOOPED_CHOLESKY_MIN = 256


def _one_at_a_time(a: torch.Tensor, looped: bool | None) -> bool:
    if looped is None:
        return a.device.type == "cuda" and a.shape[-1] >= LOOPED_CHOLESKY_MIN
    return looped


def _cholesky_ex(a: torch.Tensor, looped: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.cholesky_ex`` over a batch, choosing how the batch is factorised.

    For a batch of CUDA matrices torch calls cuSOLVER's ``potrfBatched``, a routine made for many
    small matrices; a few 2048 x 2048 kernels (one per hidden layer) are what the single-matrix,
    blocked ``potrf`` is for, so large CUDA matrices go one at a time (L is 1-3 layers). The result
    is the same factorisation either way; ``benchmarks/hsic_step.py`` times both. ``looped``
    overrides the choice."""
    if not _one_at_a_time(a, looped) or a.dim() == 2:
        return torch.linalg.cholesky_ex(a)
    flat = a.reshape(-1, *a.shape[-2:])
    parts = [torch.linalg.cholesky_ex(mat) for mat in flat.unbind(0)]
    factor = torch.stack([f for f, _ in parts]).reshape(a.shape)
    info = torch.stack([i for _, i in parts]).reshape(a.shape[:-2])
    return factor, info


def _cholesky_solve(b: torch.Tensor, factor: torch.Tensor, looped: bool | None = None) -> torch.Tensor:
    """``torch.cholesky_solve(b, factor)`` over a batch, one matrix at a time where ``_cholesky_ex``
    factorises so: a batch of CUDA matrices goes to batched triangular-solve kernels (64 launches
    for two 2048 x 2048 factors on an H200, 30% of an MLP HSIC step's device time)."""
    if not _one_at_a_time(factor, looped) or factor.dim() == 2:
        return torch.cholesky_solve(b, factor)
    b = b.expand(*factor.shape[:-2], *b.shape[-2:])
    flat_b, flat_f = b.reshape(-1, *b.shape[-2:]), factor.reshape(-1, *factor.shape[-2:])
    return torch.stack([torch.cholesky_solve(x, f) for x, f in zip(flat_b.unbind(0), flat_f.unbind(0))]
                       ).reshape(b.shape)


def _chol(kc: torch.Tensor, eps: float) -> torch.Tensor:
    """Cholesky factor of K~ + eps*m*I (batched)."""
    m = kc.shape[-1]
    eye = torch.eye(m, dtype=kc.dtype, device=kc.device)
    factor, info = _cholesky_ex(kc + (eps * m) * eye)
    # A kernel with no factor comes from non-finite activations (a diverging layer): NaN makes the
    # loss non-finite, so the run is marked diverged as under backprop, not failed by an exception;
    # and no host sync waits for ``info`` on a GPU.
    return torch.where((info == 0)[..., None, None], factor, torch.nan)


def _resolvent(kc: torch.Tensor, eps: float) -> torch.Tensor:
    """R = (K~ + eps m I)^-1 K~ (= K~ (K~ + eps m I)^-1; they commute) for a centred kernel."""
    return _cholesky_solve(kc, _chol(kc, eps))


@dataclass(frozen=True)
class Target:
    """A variable that hidden layers are compared against, prepared once per batch.

    Either low rank, R_t = F M F^T (``f``, ``fm`` = F M), or full, ``r`` = R_t. No gradient flows
    into a target (labels and inputs are data)."""

    f: torch.Tensor | None = None
    fm: torch.Tensor | None = None
    mat: torch.Tensor | None = None
    r: torch.Tensor | None = None


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


def full_target(x: torch.Tensor, sigma: float, eps: float = 1e-5) -> Target:
    """Target for a full-rank variable (the network input X): R_x, computed once per batch."""
    with torch.no_grad():
        return Target(r=_resolvent(centred_gaussian_kernel(_flat(x), sigma), eps))


def nhsic_against(kz: torch.Tensor, target: Target, eps: float = 1e-5,
                  chol: torch.Tensor | None = None) -> torch.Tensor:
    """nHSIC between centred kernels ``kz`` (L, m, m) and one ``target``: a tensor of L values.

    ``chol`` (Cholesky factors of kz + eps m I) may be passed to share them between targets."""
    if chol is None:
        chol = _chol(kz, eps)
    if target.r is not None:
        # trace(R_z R_t) = sum((A_z^-1 R_t) * K~_z), A_z symmetric; R_t, K~_z symmetric.
        return (_cholesky_solve(target.r.expand_as(kz), chol) * kz).sum(dim=(-1, -2))
    return _LowRankNHSIC.apply(kz, chol, target.f, target.fm, target.mat, eps)


class _LowRankNHSIC(torch.autograd.Function):
    """trace(R_z F M F^T) with a closed-form gradient, so no m^3 Cholesky backward is needed.

    With A = K~ + cI (c = eps m) and T = F M F^T:  trace(K~ A^-1 T) = trace(T) - c trace(A^-1 T), so
    d/dK~ = c A^-1 T A^-1 = c S M S^T with S = A^-1 F, already solved for in the forward pass:
    the backward is a rank-C outer product, O(m^2 C)."""

    @staticmethod
    def forward(ctx, kz, chol, f, fm, mat, eps):
        s = _cholesky_solve(f.expand(kz.shape[0], *f.shape), chol)  # A^-1 F
        ctx.save_for_backward(s, mat)
        ctx.c = eps * kz.shape[-1]
        return ((kz @ s) * fm).sum(dim=(-1, -2))  # trace(F^T R_z F M), R_z F = K~ A^-1 F

    @staticmethod
    def backward(ctx, grad):
        s, mat = ctx.saved_tensors
        g = (s @ mat) @ s.transpose(-1, -2)
        return (ctx.c * grad)[:, None, None] * g, None, None, None, None, None


def hsic_factors(kz: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Cholesky factors of K~_z + eps m I, to share between the label and input terms."""
    return _chol(kz, eps)
