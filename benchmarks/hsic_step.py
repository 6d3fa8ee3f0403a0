"""Time one HSIC Bottleneck step against one backprop step at batch 2048 (MLP and KAN, 784-64-32-10).

Variants, all computing the same loss (sum over hidden layers of -beta * nHSIC(Z_i, Y)) and taking
one optimiser step per block:

* plain: the formula as written: explicit centring matrix H (two m x m matmuls per kernel), a
  Cholesky solve for R of each kernel, the label kernel rebuilt and refactorised for every layer,
  trace(R_z R_y) from the two full R.
* eigh: R = U diag(l / (l + eps m)) U^T from one eigendecomposition per kernel (label kernel once
  per batch); trace(R_z R_y) = a^T (U^T V)^2 b. Gradient through eigh.
* fast: the trainer (``kanfarm.training.hsic.hsic_step``): mean-subtraction centring, layers
  batched, one Cholesky per layer, low-rank label target (solve with C right-hand sides),
  closed-form gradients.

Also prints how far eigh's gradient lies from the Cholesky one (eigh's backward divides by
eigenvalue gaps). A second table times the factorisation alone, the two float64 m x m Cholesky
factors of one step, as one batched call and one matrix at a time (the trainer's choice on CUDA),
and the solve with them for the label target's 10 columns: by triangular solves, and through the
factors' inverses (``tril_inverse``, then two products: the trainer's choice on CUDA).
It also counts the operators each step dispatches (``dispatched_ops``). The main table's last
column is the host's share of the backprop and fast steps (``host_time``): on CUDA, a step whose
host time is about its step time is bound by launching kernels, not by running them.
``--profile`` adds the operators that take the fast MLP step's time (torch.profiler, top 15).
Usage: python benchmarks/hsic_step.py [--batch 2048] [--reps 5] [--threads 2] [--device cpu|cuda|all] [--profile]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kanfarm.config import RunConfig  # noqa: E402
from kanfarm.models import build_model  # noqa: E402
from kanfarm.training.backprop import backprop_step  # noqa: E402
from kanfarm.training.hsic import HSICBottleneck, HSICSettings, hsic_step  # noqa: E402
from kanfarm.training.hsic_kernels import WORK_DTYPE, _cholesky_ex, gaussian_kernel, tril_inverse  # noqa: E402

BETA, SIGMA, EPS = 100.0, 10.0, 1e-5


def _hidden(model, x):
    zs, h = [], x
    for block in list(model.blocks)[:-1]:
        h = block(h.detach())
        zs.append(h)
    return zs, h


def plain_loss(model, x, y, n_classes):
    zs, _ = _hidden(model, x)
    m = x.shape[0]
    eye = torch.eye(m, dtype=WORK_DTYPE, device=x.device)
    h = eye - 1.0 / m

    def r(k):
        kc = h @ k @ h
        return torch.cholesky_solve(kc, torch.linalg.cholesky(kc + EPS * m * eye))

    total = 0.0
    for z in zs:
        ky = gaussian_kernel(F.one_hot(y, n_classes).to(WORK_DTYPE), SIGMA)  # rebuilt per layer
        total = total - BETA * torch.trace(r(gaussian_kernel(z, SIGMA)) @ r(ky))
    return total


def eigh_loss(model, x, y, n_classes):
    from kanfarm.training.hsic_kernels import centre
    zs, _ = _hidden(model, x)
    m = x.shape[0]
    ly, v = torch.linalg.eigh(centre(gaussian_kernel(F.one_hot(y, n_classes).to(WORK_DTYPE), SIGMA)))
    b = ly.clamp_min(0) / (ly.clamp_min(0) + EPS * m)
    kz = torch.stack([centre(gaussian_kernel(z, SIGMA)) for z in zs])  # differentiable, for eigh's gradient
    lz, u = torch.linalg.eigh(kz)
    a = lz.clamp_min(0) / (lz.clamp_min(0) + EPS * m)
    w = u.transpose(-1, -2) @ v
    return -BETA * torch.einsum("li,lij,j->", a, w * w, b)


def step_with(loss_fn, model, opts, x, y, n_classes):
    model.train()
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    loss = loss_fn(model, x, y, n_classes)
    _, h = _hidden(model, x)
    loss = loss + F.cross_entropy(model.blocks[-1](h.detach()), y)
    loss.backward()
    for o in opts.values():
        o.step()
    return loss.detach()


def timed(fn, reps, device):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def host_time(fn, reps, device):
    """Median seconds until ``fn`` returns, the device idle at the call and not waited for after it:
    the host's share of a step. Where it is about the step's time, the step is bound by the host
    issuing kernels, not by the device running them."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return statistics.median(times)


#: operators that only make views or metadata: they launch no kernel
VIEW_OPS = {"view", "_unsafe_view", "as_strided", "transpose", "t", "expand", "unsqueeze", "squeeze", "reshape",
            "detach", "alias", "select", "slice", "diagonal", "permute", "unflatten", "movedim", "_reshape_alias",
            "empty", "empty_like", "empty_strided", "split", "unbind", "new_empty", "new_empty_strided",
            "resolve_conj", "resolve_neg", "is_same_size", "_local_scalar_dense"}


def dispatched_ops(fn) -> int:
    """Operators one call of ``fn`` dispatches that are not views: a device-independent count of the
    kernel launches the host must issue (what bounds a small step on a fast GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in VIEW_OPS:
                Count.n += 1
            return func(*args, **(kwargs or {}))
    with Count():
        fn()
    return Count.n


def grad_of(loss_fn, model, x, y):
    model.zero_grad(set_to_none=True)
    model.train()
    loss_fn(model, x, y, 10).backward()
    return torch.cat([p.grad.flatten() for p in model.blocks[0].parameters()])


def factorisation_rows(devices, m, reps, threads):
    """Batched against one-at-a-time Cholesky of two SPD float64 m x m matrices per device, and
    the solve with their factors for 10 right-hand sides (the label target's, one per class): by
    triangular solves, and by the inverse factors (computed in the timing) and two products."""
    print()
    print("| device | 2 x float64 m x m | factorise: batched ms | one at a time ms | solve 10 columns: batched triangular ms | by inverse factors ms |")
    print("|---|---|---|---|---|---|")
    for device in devices:
        g = torch.Generator(device=device).manual_seed(0)
        z = torch.randn(2, m, 64, generator=g, device=device, dtype=WORK_DTYPE)
        a = z @ z.transpose(-1, -2) / 64 + 1e-2 * torch.eye(m, device=device, dtype=WORK_DTYPE)
        batched = timed(lambda: _cholesky_ex(a, looped=False), reps, device)
        looped = timed(lambda: _cholesky_ex(a, looped=True), reps, device)
        factor, _ = _cholesky_ex(a)
        b = torch.randn(m, 10, generator=g, device=device, dtype=WORK_DTYPE)
        triangular = timed(lambda: torch.cholesky_solve(b.expand(2, m, 10), factor), reps, device)
        by_inverse = timed(lambda: (lambda inv: inv.transpose(-1, -2) @ (inv @ b))(tril_inverse(factor)), reps, device)
        name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{threads} threads"
        print(f"| {name} | m = {m} | {batched * 1e3:.2f} | {looped * 1e3:.2f} | {triangular * 1e3:.2f} "
              f"| {by_inverse * 1e3:.2f} |", flush=True)


def profile_fast_step(device, batch, steps=5):
    """Where the fast MLP HSIC step spends its time, by operator (self time, device then CPU)."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    config = RunConfig(dataset="mnist", model="mlp", trainer="hsic", hidden_widths=(64, 32),
                       dropout=0.0, batch_size=batch).normalised()
    model = build_model(config, 784, 10).to(device)
    x = torch.rand(batch, 784, device=device) * 2 - 1
    y = torch.randint(0, 10, (batch,), device=device)
    opts = HSICBottleneck().optimizers(model, config)
    settings = HSICSettings.from_config(config)
    hsic_step(model, opts, x, y, settings)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            hsic_step(model, opts, x, y, settings)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nProfile of {steps} fast MLP HSIC steps on {device} (batch {batch}), sorted by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=15))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--plain-reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")  # not an empty table that looks like a pass
    devices = [torch.device(d) for d in (["cpu", "cuda"] if args.device == "all" else [args.device])
               if d == "cpu" or torch.cuda.is_available()]
    print("| device | model | backprop ms | plain HSIC ms | eigh HSIC ms | fast HSIC ms | plain/bp | eigh/bp | fast/bp "
          "| eigh-vs-chol grad rel. diff | host ms: backprop, fast |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ops = {}
    for device in devices:
        for kind in ("mlp", "kan"):
            torch.manual_seed(0)
            config = RunConfig(dataset="mnist", model=kind, trainer="hsic", hidden_widths=(64, 32),
                               dropout=0.0, batch_size=args.batch).normalised()
            model = build_model(config, 784, 10).to(device)
            x = torch.rand(args.batch, 784, device=device) * 2 - 1
            y = torch.randint(0, 10, (args.batch,), device=device)
            opts = HSICBottleneck().optimizers(model, config)
            settings = HSICSettings.from_config(config)
            bp_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            bp = timed(lambda: backprop_step(model, bp_opt, x, y), args.reps, device)
            plain = timed(lambda: step_with(plain_loss, model, opts, x, y, 10), args.plain_reps, device)
            eig = timed(lambda: step_with(eigh_loss, model, opts, x, y, 10), args.plain_reps, device)
            fast = timed(lambda: hsic_step(model, opts, x, y, settings), args.reps, device)
            ops[kind] = (dispatched_ops(lambda: backprop_step(model, bp_opt, x, y)),
                         dispatched_ops(lambda: hsic_step(model, opts, x, y, settings)))
            host_bp = host_time(lambda: backprop_step(model, bp_opt, x, y), args.reps, device)
            host_fast = host_time(lambda: hsic_step(model, opts, x, y, settings), args.reps, device)
            g_eig, g_fast = grad_of(eigh_loss, model, x, y), grad_of(plain_loss, model, x, y)
            diff = float((g_eig - g_fast).norm() / g_fast.norm())
            name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{args.threads} threads"
            print(f"| {name} | {kind} | {bp * 1e3:.1f} | {plain * 1e3:.0f} | {eig * 1e3:.0f} | {fast * 1e3:.1f} "
                  f"| {plain / bp:.0f}x | {eig / bp:.0f}x | {fast / bp:.1f}x | {diff:.1e} "
                  f"| {host_bp * 1e3:.1f}, {host_fast * 1e3:.1f} |", flush=True)
    print("\nOperators dispatched per step, not views (last device; Adam as it runs there: a loop over "
          "parameters on the CPU, foreach on CUDA): "
          + "; ".join(f"{kind}: backprop {bp_ops}, fast HSIC {fast_ops}" for kind, (bp_ops, fast_ops) in ops.items()))
    factorisation_rows(devices, args.batch, args.reps, args.threads)
    if args.profile:
        for device in devices:
            profile_fast_step(device, args.batch)


if __name__ == "__main__":
    main()
