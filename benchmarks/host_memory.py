"""CPU training with and without ``KANFARM_KEEP_FREED_MEMORY`` (kanfarm.training.host_memory).

Each (model, layer, setting) trains in a fresh process: MNIST-shaped random data (784 features,
10 classes), batch 4096, Adam, ``--epochs`` epochs of ``--rows`` rows plus an evaluation pass on
10,000 rows per epoch (as a run evaluates). Printed per row: median epoch seconds over the epochs
after the first, resident memory (VmRSS) at the end, and minor page faults per epoch (median).

    python benchmarks/host_memory.py [--epochs 6] [--rows 16384] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROWS = [("shallow", [784, 32, 10], True), ("deep", [784, 128, 64, 32, 10], True),
        ("deep", [784, 128, 64, 32, 10], False)]


def child(widths: list[int], fast: bool, epochs: int, rows: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from kanfarm.models import KAN
    from kanfarm.training.host_memory import keep_freed_memory

    applied = keep_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.rand(rows, 784) * 2 - 1
    y = torch.randint(0, 10, (rows,))
    model = KAN(widths, fast=fast)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seconds, faults = [], []
    for _ in range(epochs):
        start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for first in range(0, rows, 4096):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[first:first + 4096]), y[first:first + 4096]).backward()
            optimizer.step()
        with torch.no_grad():
            model(x[:10_000]).argmax(1)
        seconds.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    return {"applied": applied, "s": statistics.median(seconds[1:]), "rss_mib": rss,
            "faults": statistics.median(faults[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        widths, fast = json.loads(args.child)
        print(json.dumps(child(widths, fast, args.epochs, args.rows, args.threads)))
        return
    print(f"cpu threads={args.threads} rows={args.rows} epochs={args.epochs} batch=4096 "
          f"loadavg={os.getloadavg()[0]:.2f}")
    print(f"{'model':>8} {'layer':>9} {'keep freed':>10} {'s/epoch':>8} {'RSS MiB':>8} {'faults/epoch':>13}")
    for name, widths, fast in ROWS:
        for setting in ("0", "1"):
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps([widths, fast]),
                                  "--epochs", str(args.epochs), "--rows", str(args.rows), "--threads", str(args.threads)],
                                 env={**os.environ, "KANFARM_KEEP_FREED_MEMORY": setting},
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            assert r["applied"] == (setting == "1"), r
            print(f"{name:>8} {'fast' if fast else 'reference':>9} {'on' if setting == '1' else 'off':>10} "
                  f"{r['s']:>8.2f} {r['rss_mib']:>8.0f} {r['faults']:>13.0f}")


if __name__ == "__main__":
    main()
