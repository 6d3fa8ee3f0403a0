"""Runs per hour of paper-mnist-shaped work: one run at a time against packs of 9 and 27.

Data: MNIST-sized random rows (784 features uniform in [-1, 1], 10 random classes; only shapes
matter). Models: shallow KAN [784, 32, 10] (G = 5, k = 3) and shallow MLP [784, 32, 10] with
dropout. Members mix the paper's schemes (3 inits x 3 optimisers x 3 learning rates). Each
configuration trains 3 epochs through the real code paths (``kanfarm.training.train`` alone,
``kanfarm.packing.train_pack`` packed: evaluation, records and all, no checkpoints); the faster of
epochs 2 and 3 (wall time, so a shared machine's hiccups count less), scaled from the rows used to
60,000, gives runs/hour for 100-epoch runs.

    python benchmarks/packing.py [--quick] [--device cpu|cuda|all] [--threads 2] [--models kan,mlp] [--profile]
                                 [--trainer backprop|hsic] [--batches 4096,128]

On CUDA the pack step uses the Triton kernels (``kanfarm.packing.triton_pack``: optimiser update
and dropout masks, one launch each); ``KANFARM_TRITON=0`` runs the eager step instead, for a
before/after (it also turns off the KAN's fused spline kernels). ``--profile`` (CUDA) adds, for
the shallow MLP at batch 128, the CUDA kernels launched per training step and the wall time per
step, solo against a pack of 27, and the pack step's heaviest operators.

``--quick`` trains on a few batches per epoch (4 at batch 4096, 24 at batch 128) and evaluates
on 2,000 test rows, so the CPU run takes about two minutes. Its runs/hour scale the whole epoch,
evaluation included, to 60,000 rows, so they understate a real epoch's rate; the ratio to one run
at a time is what it is for.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kanfarm.config import RunConfig  # noqa: E402
from kanfarm.data.dataset import Dataset  # noqa: E402
from kanfarm.packing import Member, train_pack  # noqa: E402
from kanfarm.training import train  # noqa: E402

N_TRAIN, N_TEST, EPOCHS = 60_000, 10_000, 100
SCHEMES = list(itertools.product(["sgd", "sgd_momentum", "adam"], [0.05, 0.005, 0.0005],
                                 ["kaiming_normal", "kaiming_uniform", "orthogonal"]))


def data(n_train: int, n_test: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n_train + n_test, 784, generator=g) * 2 - 1
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    return Dataset("mnist-shaped", x[:n_train], y[:n_train], x[n_train:], y[n_train:], 10)


def configs(model: str, batch: int, n: int, trainer: str = "backprop") -> list[RunConfig]:
    base = RunConfig(dataset="mnist", model=model, depth="shallow", batch_size=batch, max_epochs=3, trainer=trainer,
                     dropout=0.0 if trainer == "hsic" else 0.2)  # as paper-hsic-mnist / paper-mnist
    return [dataclasses.replace(base, optimizer=o, lr=lr, init=i) for o, lr, i in SCHEMES[:n]]


def epoch_seconds(cfgs: list[RunConfig], d: Dataset, device: str) -> float:
    """Wall time of the faster of epochs 2 and 3 (training + evaluation), alone (one) or packed.
    A pack's member records its share of the pack's epoch time: the shares add up to it."""
    seconds: dict[int, float] = {}

    def sink(record) -> None:
        if record.epoch >= 2:
            seconds[record.epoch] = seconds.get(record.epoch, 0.0) + record.seconds

    if len(cfgs) == 1:
        train(cfgs[0], d, sink, device=device)
    else:
        train_pack([Member(c, sink) for c in cfgs], d, device=device)
    return min(seconds.values())


def profile_steps(device: str, batch: int = 128, steps: int = 20) -> None:
    """Kernels and wall time per step: one MLP (Adam) alone, then the 27-member pack step."""
    import time

    from torch.profiler import ProfilerActivity, profile

    from kanfarm.models import build_model
    from kanfarm.packing.optim import _ORDER, StackedOptimizer
    from kanfarm.packing.stacked import StackedNet, stream_key
    from kanfarm.packing.trainer import pack_step
    from kanfarm.training.backprop import backprop_step
    from kanfarm.training.optim import make_optimizer

    cfgs = sorted((c.normalised() for c in configs("mlp", batch, 27)), key=lambda c: _ORDER.index(c.optimizer))
    x = torch.rand(batch, 784, device=device) * 2 - 1
    y = torch.randint(0, 10, (batch,), device=device)
    solo = build_model(cfgs[-1], 784, 10).to(device)
    solo_opt = make_optimizer(cfgs[-1].optimizer, solo.parameters(), cfgs[-1].lr)
    net = StackedNet("mlp", [build_model(c, 784, 10) for c in cfgs], [c.activation for c in cfgs],
                     [c.dropout for c in cfgs], torch.device(device),
                     dropout_keys=[stream_key(c.config_hash()) for c in cfgs])
    opt = StackedOptimizer(net.params, [c.optimizer for c in cfgs], [c.lr for c in cfgs])
    gens = [torch.Generator(device=device).manual_seed(i) for i in range(len(cfgs))]
    alive = torch.ones(len(cfgs), dtype=torch.bool, device=device)
    loss_sum = torch.zeros(len(cfgs), device=device)
    rows = {"solo MLP (adam)": lambda: backprop_step(solo, solo_opt, x, y),
            f"pack of {len(cfgs)} MLPs": lambda: pack_step(net, opt, x, y, gens, alive, loss_sum)}
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    print(f"\n| step (batch {batch}, {device}) | CUDA kernels per step | ms per step |\n|---|---|---|")
    for name, fn in rows.items():
        for _ in range(3):
            fn()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        ms = (time.perf_counter() - start) / steps * 1e3
        with profile(activities=activities) as prof:
            for _ in range(steps):
                fn()
            sync()
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"| {name} | {kernels / steps if cuda else 'n/a'} | {ms:.2f} |", flush=True)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=12))
    if cuda:  # the launch-free floor: the same pack step replayed as one CUDA graph (timing only:
        # the step count, hence Adam's bias correction and the dropout stream, is frozen in the graph)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    rows[f"pack of {len(cfgs)} MLPs"]()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                rows[f"pack of {len(cfgs)} MLPs"]()
            graph.replay()
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                graph.replay()
            sync()
            print(f"| pack of {len(cfgs)} MLPs, replayed as a CUDA graph | 1 graph | "
                  f"{(time.perf_counter() - start) / steps * 1e3:.2f} |", flush=True)
        except Exception as exc:  # a diagnostic row: report, do not stop the benchmark
            print(f"CUDA graph capture of the pack step failed: {type(exc).__name__}: {exc}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--models", default="kan,mlp", help="comma-separated: kan, mlp")
    parser.add_argument("--profile", action="store_true", help="CUDA: kernels and time per step, solo vs pack")
    parser.add_argument("--trainer", default="backprop", choices=["backprop", "hsic"])
    parser.add_argument("--batches", default="4096,128", help="comma-separated batch sizes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")  # not an empty table that looks like a pass
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [dev for dev in devices if dev == "cpu" or torch.cuda.is_available()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"KANFARM_TRITON={os.environ.get('KANFARM_TRITON', '1')}, "
          f"cuda: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"trainer: {args.trainer}")
    print("| device | model | batch | rows/epoch used | runs in pack | s/epoch (pack) | runs/hour (100 ep) | x one-at-a-time |")
    print("|---|---|---|---|---|---|---|---|")
    for device in devices:
        if args.profile:
            profile_steps(device)
        for batch in map(int, args.batches.split(",")):
            n_train = (4 if batch == 4096 else 24) * batch if args.quick else N_TRAIN
            d = data(n_train, 2000 if args.quick else N_TEST)
            scale = N_TRAIN / n_train
            for model in args.models.split(","):
                base = None
                for size in (1, 9, 27):
                    s = epoch_seconds(configs(model, batch, size, args.trainer), d, device)
                    per_hour = size * 3600 / (s * scale * EPOCHS)
                    base = base or per_hour
                    print(f"| {device} | {model} | {batch} | {n_train} | {size} | {s:.3f} | {per_hour:.1f} | "
                          f"{per_hour / base:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
