"""Solving with the HSIC kernel's Cholesky factor, by size: triangular solves against the inverse
factor (``tril_inverse``) and products. Chooses ``hsic_kernels.INVERSE_SOLVE_MIN`` on CUDA.

A = K~ + eps m I is built from a real centred Gaussian kernel (ReLU features, sigma = 10), F is a
label target's 10 columns. Per size m: the factorisation, the solve for F both ways (the inverse
computed inside the timing), the solve for an m x m right-hand side (the input target) both ways
(the inverse computed beforehand), and their relative differences from the triangular solve.
Times are medians over ``--reps`` calls between CUDA events (host launch gaps included).
Usage: python benchmarks/hsic_solves.py [--device cuda|cpu] [--sizes 256,2048,4096] [--reps 20]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hsic_step import timed  # noqa: E402
from kanfarm.training.hsic_kernels import centred_gaussian_kernel, label_target, tril_inverse  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", default="128,256,512,608,1024,2048,4096")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, median of {args.reps}")
    print("| m | factorise ms | solve 10 columns: triangular ms | inverse + 2 products ms | rel. diff "
          "| solve m columns: triangular ms | 2 products ms | rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator(device=device).manual_seed(0)
    for m in (int(v) for v in args.sizes.split(",")):
        kc = centred_gaussian_kernel(torch.relu(torch.randn(m, 64, generator=g, device=device)), 10.0)
        a = kc.clone()
        a.diagonal().add_(1e-5 * m)
        f = label_target(torch.randint(0, 10, (m,), generator=g, device=device), 10, 10.0).f
        factor = torch.linalg.cholesky(a)
        inverse = tril_inverse(factor)

        def by_inverse(b, inv):
            return inv.transpose(-1, -2) @ (inv @ b)
        diff_f = float((by_inverse(f, inverse) - torch.cholesky_solve(f, factor)).norm()
                       / torch.cholesky_solve(f, factor).norm())
        diff_m = float((by_inverse(kc, inverse) - torch.cholesky_solve(kc, factor)).norm()
                       / torch.cholesky_solve(kc, factor).norm())
        t = [1e3 * timed(fn, args.reps, device) for fn in (
            lambda: torch.linalg.cholesky_ex(a), lambda: torch.cholesky_solve(f, factor),
            lambda: by_inverse(f, tril_inverse(factor)), lambda: torch.cholesky_solve(kc, factor),
            lambda: by_inverse(kc, inverse))]
        print(f"| {m} | {t[0]:.3f} | {t[1]:.3f} | {t[2]:.3f} | {diff_f:.1e} | {t[3]:.3f} | {t[4]:.3f} | {diff_m:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
