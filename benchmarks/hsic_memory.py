"""Peak memory of the HSIC layer terms and their gradients, in float64 m x m matrices per hidden
layer: what ``kanfarm.packing.planner.HSIC_MATRICES`` must cover when it sizes packs.

Measured on the CPU as the growth of the process's peak resident memory over one ``hsic_terms``
forward and backward (each case in a fresh process, since the peak only grows), for both ways of
solving: the CPU's triangular solves, and CUDA's inverse factors and one-at-a-time factorisation
(forced on the CPU). The input term's target R_x is a stand-in matrix made beforehand: it is one
matrix per batch, not per layer.
Usage: python benchmarks/hsic_memory.py [--m 4096] [--layers 2]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def measure(m: int, layers: int, x_term: bool, cuda_path: bool) -> float:
    import torch

    from kanfarm.training import hsic as hsic_module
    from kanfarm.training import hsic_kernels
    from kanfarm.training.hsic_kernels import Target

    torch.set_num_threads(2)
    if cuda_path:
        hsic_kernels._by_inverse = lambda factor: True
        hsic_kernels._one_at_a_time = lambda a, looped: True
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(m, 64 // 2 ** i, generator=g).relu().requires_grad_(True) for i in range(layers)]
    x, y = torch.rand(m, 8, generator=g), torch.randint(0, 10, (m,), generator=g)
    stand_in = Target(r=torch.eye(m, dtype=torch.float64))
    hsic_module.full_target = lambda *args, **kwargs: stand_in
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    terms = hsic_module.hsic_terms(zs, x, y, 10, hsic_module.HSICSettings(x_term=x_term))
    terms.sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (after - before) / (8 * m * m) / layers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # one measurement, in a child process
    args = ap.parse_args()
    if args.case:
        x_term, cuda_path = (v == "1" for v in args.case.split(","))
        print(measure(args.m, args.layers, x_term, cuda_path))
        return
    from kanfarm.packing.planner import HSIC_MATRICES
    print(f"m = {args.m}, {args.layers} hidden layers; HSIC_MATRICES = {HSIC_MATRICES}")
    print("| solves | input term | peak m x m float64 matrices per layer |\n|---|---|---|")
    for cuda_path in (False, True):
        for x_term in (False, True):
            out = subprocess.run([sys.executable, __file__, "--m", str(args.m), "--layers", str(args.layers),
                                  "--case", f"{int(x_term)},{int(cuda_path)}"],
                                 capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": ROOT})
            solves = "inverse factors, one at a time (CUDA's)" if cuda_path else "triangular (CPU's)"
            print(f"| {solves} | {'on' if x_term else 'off'} | {float(out.stdout.strip().splitlines()[-1]):.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
