"""Forward + backward time and peak memory of one KAN layer: reference vs fast, against matmul floors.

Rows per shape (batch, in -> out), G = 5, k = 3, float32 (TF32 off, PyTorch's default):
  reference   KANLinear(fast=False): autograd through the Cox-de Boor recursion
  fast        KANLinear(fast=True): closed-form uniform bases, hand-written backward (on CUDA the
              bases and the input gradient come from the fused Triton kernels, on the CPU the
              bases and slopes of large blocks from one torch.compile'd loop)
  fast-eager  the fast layer with both off (KANFARM_TRITON=0, KANFARM_CPU_COMPILE=0): eager closed form
  matmuls     the bare products of the layer: F.linear(x, base_weight) + F.linear(bases, spline weight)
              on bases computed beforehand (weight gradients only): a floor for any KAN layer
  matmuls-dx  the bare products plus the gradient of the bases (bases.requires_grad): the floor
              for a layer that must pass a gradient back, i.e. the pair of ``fast``
  mlp         nn.Linear(in, out) + GELU of the same shape
The KAN and MLP rows also compute the input gradient (as every layer after the first must).
CUDA adds rows that pair each KAN row with its own floor:
  reference-tf32  the reference with TF32 matrix products: what ``fast-tf32`` is compared with
              when both take the opt-in
  fast-tf32   the fast layer with TF32 matrix products (what a run with matmul_precision = "tf32"
              gets; its error against the float32 reference is printed with the check)
  fast-nodx   the fast layer without the input gradient (a first layer: x is data)
  matmuls-dx-tf32  the same with TF32 products: the pair of ``fast-tf32``
and, per shape, checks that ``fast`` gives the reference's output and gradients (max error
relative to each tensor's largest value).

Time: median wall time of ``--repeats`` steps after two warm-up steps, the rows of a shape taking
turns within every repeat (fair to all rows when other processes load the machine).
Memory on CPU: every (row, shape) runs in a fresh process: warm-up steps at batch 8 and at full
size load the libraries (and compile what the row compiles), then peak RSS growth over one more
full-size step (VmHWM, reset through
/proc/self/clear_refs after malloc_trim just before, minus VmRSS at that moment),
in MiB. It counts everything the step allocates (activations, saved tensors, gradients), at page
granularity, as the OS sees it. On CUDA: ``torch.cuda.max_memory_allocated`` growth over one step.

    python benchmarks/kan_layer.py [--quick] [--device cpu|cuda] [--threads 2]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kanfarm.models import KANLinear  # noqa: E402
from kanfarm.training.precision import matmul_precision  # noqa: E402

ROWS = ("reference", "fast", "fast-eager", "matmuls", "matmuls-dx", "mlp")
CUDA_ROWS = ("reference", "fast", "fast-eager", "reference-tf32", "fast-tf32", "fast-nodx", "matmuls", "matmuls-dx",
             "matmuls-dx-tf32", "mlp")
CPU_SHAPES = [(256, 784, 256), (1024, 784, 256), (256, 256, 256), (1024, 256, 256)]
CUDA_SHAPES = [(8192, 784, 256), (8192, 1024, 1024)]


def make_step(row: str, batch: int, n_in: int, n_out: int, device: str):
    """A closure running one forward + backward of ``row`` at this shape."""
    torch.manual_seed(0)
    x = (torch.rand(batch, n_in, device=device) * 2 - 1)
    if row in ("reference", "reference-tf32", "fast", "fast-eager", "fast-tf32", "fast-nodx"):
        layer = KANLinear(n_in, n_out, fast=not row.startswith("reference")).to(device)
        x.requires_grad_(row != "fast-nodx")

        def eager(inp):
            before = {name: os.environ.get(name) for name in ("KANFARM_TRITON", "KANFARM_CPU_COMPILE")}
            os.environ.update(dict.fromkeys(before, "0"))
            try:
                return layer(inp)
            finally:
                for name, value in before.items():
                    if value is None:
                        del os.environ[name]
                    else:
                        os.environ[name] = value
        fn = eager if row == "fast-eager" else layer
    elif row == "mlp":
        layer = nn.Sequential(nn.Linear(n_in, n_out), nn.GELU()).to(device)
        x.requires_grad_(True)
        fn = layer
    else:
        layer = KANLinear(n_in, n_out).to(device)
        with torch.no_grad():
            bases = layer.spline_bases(x).reshape(batch, -1)
            spline = layer.scaled_spline_weight.reshape(n_out, -1).detach().clone().requires_grad_(True)
        base = layer.base_weight
        if row.startswith("matmuls-dx"):
            bases.requires_grad_(True)
            x.requires_grad_(True)

        def fn(inp):
            return F.linear(inp, base) + F.linear(bases, spline)

    def step():
        with matmul_precision("tf32" if row.endswith("-tf32") else "float32"):  # as a run sets it
            out = fn(x)
            out.backward(torch.ones_like(out))
            if device == "cuda":
                torch.cuda.synchronize()

    return step


def check_fast(batch: int, n_in: int, n_out: int, device: str, tf32: bool = False) -> float:
    """Largest error of the fast layer's output and gradients against the reference, each relative
    to that tensor's largest magnitude (O(1) spline coefficients, so the spline branch matters)."""
    torch.manual_seed(1)
    ref = KANLinear(n_in, n_out, fast=False).to(device)
    with torch.no_grad():
        ref.spline_weight.normal_()
        ref.spline_scaler.normal_()
    fast = KANLinear(n_in, n_out, fast=True).to(device)
    fast.load_state_dict(ref.state_dict())
    x = torch.rand(batch, n_in, device=device) * 2.4 - 1.2
    upstream = torch.randn(batch, n_out, device=device)
    results = []
    for layer in (ref, fast):
        with matmul_precision("tf32" if tf32 and layer is fast else "float32"):
            xi = x.clone().requires_grad_(True)
            out = layer(xi)
            grads = torch.autograd.grad(out, [xi, layer.base_weight, layer.spline_weight, layer.spline_scaler],
                                        upstream)
        results.append([out, *grads])
    return max(((a - b).abs().max() / b.abs().max()).item() for b, a in zip(*results))


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """Return freed heap pages to the OS, then reset VmHWM (peak RSS) to the current RSS (Linux)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_memory(row: str, batch: int, n_in: int, n_out: int, device: str) -> float:
    """Peak memory growth of one step in MiB (this process must be fresh on CPU)."""
    make_step(row, 8, n_in, n_out, device)()
    step = make_step(row, batch, n_in, n_out, device)
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    reset_peak_rss()
    before = _status_bytes("VmRSS")
    step()
    return max(0, _status_bytes("VmHWM") - before) / 2**20


def memory_in_subprocess(row: str, shape: tuple[int, int, int], device: str, threads: int) -> float:
    args = [sys.executable, os.path.abspath(__file__), "--memory-of", row, *map(str, shape),
            "--device", device, "--threads", str(threads)]
    return float(subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip())


def median_times(steps: dict, repeats: int) -> dict[str, float]:
    """Median ms per step; rows interleave within every repeat so that load from other processes
    falls on all of them alike."""
    for step in steps.values():
        step()
        step()
    times: dict[str, list[float]] = {row: [] for row in steps}
    for _ in range(repeats):
        for row, step in steps.items():
            start = time.perf_counter()
            step()
            times[row].append(time.perf_counter() - start)
    return {row: statistics.median(t) * 1e3 for row, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="3 repeats, batch-1024 CPU shapes only")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--memory-of", nargs=4, metavar=("ROW", "BATCH", "IN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        row, *shape = args.memory_of
        print(measure_memory(row, *map(int, shape), args.device))
        return
    shapes = CUDA_SHAPES if args.device == "cuda" else CPU_SHAPES
    rows_of = CUDA_ROWS if args.device == "cuda" else ROWS
    if args.quick and args.device == "cpu":
        shapes = [s for s in shapes if s[0] == 1024]
    repeats = args.repeats or (3 if args.quick else 20 if args.device == "cuda" else 7)
    print(f"device={args.device} threads={torch.get_num_threads()} repeats={repeats} G=5 k=3 float32"
          f" loadavg={os.getloadavg()[0]:.2f} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print(f"{'batch':>6} {'in->out':>10} {'row':>10} {'ms':>9} {'x ref':>7} {'MiB':>8} {'x ref':>7}")
    results = []
    for shape in shapes:
        tf32 = f"; fast-tf32 {check_fast(*shape, 'cuda', tf32=True):.2e}" if args.device == "cuda" else ""
        print(f"check {shape}: fast vs reference, max relative error {check_fast(*shape, args.device):.2e}{tf32}",
              flush=True)
        if args.device == "cuda":
            mib = {row: measure_memory(row, *shape, "cuda") for row in rows_of}  # in-process: peak stats reset
        else:
            mib = {row: memory_in_subprocess(row, shape, args.device, args.threads) for row in rows_of}
        times = median_times({row: make_step(row, *shape, args.device) for row in rows_of}, repeats)
        rows = {row: (times[row], mib[row]) for row in rows_of}
        ref_ms, ref_mib = rows["reference"]
        for row, (ms, mib) in rows.items():
            print(f"{shape[0]:>6} {f'{shape[1]}->{shape[2]}':>10} {row:>10} {ms:>9.1f} {ms / ref_ms:>7.2f}"
                  f" {mib:>8.1f} {mib / ref_mib if ref_mib else float('nan'):>7.2f}")
            results.append({"batch": shape[0], "in": shape[1], "out": shape[2], "row": row,
                            "ms": ms, "mib": mib})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
