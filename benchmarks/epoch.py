"""One training epoch of MNIST-shaped KANs, reference layers vs fast layers, after a warm-up.

Data: 60,000 random rows of 784 features uniform in [-1, 1], 10 random classes (only the shapes
matter). Models: shallow [784, 32, 10] and deep [784, 128, 64, 32, 10] KANs, G = 5, k = 3, GELU,
batch 4096, Adam (lr 1e-3), cross-entropy. Both variants start from the same weights and see the
same batches, so their final losses must agree (printed as a check). Before the timed epoch each
variant trains once on one batch (on CUDA: a whole epoch) so that kernel compilation (Triton on
CUDA, torch.compile on the CPU) and library loading stay out of the figure; the fast variant's
warm-up seconds are printed apart (what a run pays once per process).

    python benchmarks/epoch.py [--quick] [--device cpu|cuda] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kanfarm.models import KAN  # noqa: E402

ARCHITECTURES = {"shallow": [784, 32, 10], "deep": [784, 128, 64, 32, 10]}


def epoch(widths: list[int], fast: bool, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float]:
    """Seconds for one epoch and the last batch's loss."""
    torch.manual_seed(0)
    model = KAN(widths, fast=fast).to(x.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1)).to(x.device)
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for first in range(0, x.shape[0], batch):
        idx = order[first:first + batch]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
    last = loss.item()  # synchronises on CUDA
    return time.perf_counter() - start, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="12,288 rows (3 batches)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = 3 * args.batch if args.quick else args.rows
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(rows, 784, generator=g) * 2 - 1).to(args.device)
    y = torch.randint(0, 10, (rows,), generator=g).to(args.device)
    print(f"device={args.device} threads={torch.get_num_threads()} rows={rows} batch={args.batch} Adam G=5 k=3"
          f" loadavg={os.getloadavg()[0]:.2f} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print(f"{'model':>8} {'reference s':>12} {'fast s':>8} {'speed-up':>9} {'ref loss':>10} {'fast loss':>10}"
          f" {'fast warm-up s':>15}")
    warm = slice(None) if x.is_cuda else slice(0, args.batch)
    for name, widths in ARCHITECTURES.items():
        epoch(widths, False, x[warm], y[warm], args.batch)
        warm_s, _ = epoch(widths, True, x[warm], y[warm], args.batch)
        ref_s, ref_loss = epoch(widths, False, x, y, args.batch)
        fast_s, fast_loss = epoch(widths, True, x, y, args.batch)
        print(f"{name:>8} {ref_s:>12.3f} {fast_s:>8.3f} {ref_s / fast_s:>8.2f}x {ref_loss:>10.5f} {fast_loss:>10.5f}"
              f" {warm_s:>15.2f}")


if __name__ == "__main__":
    main()
