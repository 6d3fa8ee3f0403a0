"""The epoch loop every trainer shares: seeding, evaluation, divergence, checkpoints, exact resume.

A trainer is a ``Method``: which optimisers it needs and how it trains one epoch from a stream
of batches. Everything around that (epoch 0 evaluation, records to the sink, early stopping,
checkpoint/resume with every RNG state) lives here once, so both trainers resume the same way.
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterator, Protocol

import torch
import torch.nn.functional as F

from kanfarm.config import RunConfig
from kanfarm.data.dataset import Dataset
from kanfarm.models import build_model, count_params
from kanfarm.models.compiled_spline import for_run, run_elements, warm_up
from kanfarm.training import rng
from kanfarm.training.checkpoint import CheckpointManager
from kanfarm.training.precision import matmul_precision
from kanfarm.training.records import EpochRecord, RunResult, ShouldStop, Sink

Batch = tuple[torch.Tensor, torch.Tensor]


class Method(Protocol):
    def optimizers(self, model: torch.nn.Module, config: RunConfig) -> dict[str, torch.optim.Optimizer]: ...

    def train_epoch(self, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                    batches: Iterator[Batch], epoch: int, config: RunConfig) -> torch.Tensor:
        """Train one epoch; return the summed training loss as a device tensor (NaN/inf = diverged)."""
        ...

    def extra(self, model: torch.nn.Module, data: Dataset, config: RunConfig) -> dict[str, Any]:
        """Method-specific metrics stored in ``epoch_metrics.extra``."""
        ...


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int,
                     order: torch.Generator, min_rows: int = 1) -> Iterator[Batch]:
    """One epoch of minibatches in an order drawn from ``order`` (a CPU generator, checkpointed).
    A last batch of fewer than ``min_rows`` rows is left out (batch norm needs two rows to train)."""
    perm = torch.randperm(x.shape[0], generator=order).to(x.device)
    for start in range(0, x.shape[0], batch_size):
        idx = perm[start:start + batch_size]
        if idx.shape[0] >= min_rows:
            yield x[idx], y[idx]


#: rows of one evaluation pass
EVAL_CHUNK = 8192


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = EVAL_CHUNK) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode (dropout off); the ``.item()`` calls are the
    epoch's host sync, so the epoch's wall time is read after them."""
    model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for start in range(0, x.shape[0], chunk):
        logits = model(x[start:start + chunk])
        target = y[start:start + chunk]
        loss += F.cross_entropy(logits.float(), target, reduction="sum")
        correct += (logits.argmax(dim=1) == target).sum()
    n = x.shape[0]
    return (loss / n).item(), (correct.float() / n).item()


def largest_block_rows(config: RunConfig, data: Dataset, x_eval: torch.Tensor) -> int:
    """Most rows one forward pass of a run takes: a training batch or an evaluation chunk."""
    return max(min(config.batch_size, data.x_train.shape[0]),
               min(EVAL_CHUNK, max(x_eval.shape[0], data.x_test.shape[0])))


def rows_per_epoch(config: RunConfig, data: Dataset) -> int:
    """Rows an epoch passes through the model: the training rows, then evaluation of the training
    subset (``train_eval_size``) and of the test rows."""
    n_train = data.x_train.shape[0]
    return n_train + min(config.train_eval_size or n_train, n_train) + data.x_test.shape[0]


def _train_eval_subset(data: Dataset, size: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if size is None or size >= data.x_train.shape[0]:
        return data.x_train, data.y_train
    g = torch.Generator().manual_seed(seed + 7919)
    idx = torch.randperm(data.x_train.shape[0], generator=g)[:size].to(data.x_train.device)
    return data.x_train[idx], data.y_train[idx]


def _format_stage_start(config: RunConfig) -> int:
    """The last epoch before an HSIC run's format stage (0: no stage, or the whole run is one)."""
    if config.trainer == "hsic" and config.hsic_format_epochs is not None:
        return max(config.max_epochs - config.hsic_format_epochs, 0)
    return 0


def patience_exhausted(config: RunConfig, epoch: int, best_epoch: int) -> bool:
    """True when ``config.patience`` epochs have passed since the best test accuracy.

    For an HSIC run with a format stage, patience counts from that stage's start: before it the
    output layer is untrained and test accuracy sits near chance, so stopping there would end the
    run before its classifier ever trained (``best_restarts`` makes the best one of the stage)."""
    if config.patience is None:
        return False
    return epoch - max(best_epoch, _format_stage_start(config)) >= config.patience


def best_restarts(config: RunConfig, epoch: int) -> bool:
    """Whether the best accuracy patience waits on starts again at ``epoch``: at an HSIC format
    stage's first epoch. The chance-level accuracies before it (an untrained output layer; epoch
    0's may be the highest) would otherwise stop a classifier that improves within the stage."""
    start = _format_stage_start(config)
    return start > 0 and epoch == start + 1


def fit(config: RunConfig, data: Dataset, sink: Sink, method: Method, *,
        checkpoints: CheckpointManager | None = None, device: str | torch.device = "cpu",
        should_stop: ShouldStop | None = None) -> RunResult:
    """Train ``config`` on ``data``, emitting an ``EpochRecord`` per epoch (0 = before training).

    Resumes from the newest verified checkpoint when ``checkpoints`` has one; epochs after it are
    trained again and emit identical records. Products run at ``config.matmul_precision``.
    """
    config = config.normalised()
    elements = run_elements(config, data.n_features, data.n_classes, rows_per_epoch(config, data))
    with matmul_precision(config.matmul_precision), for_run(elements):
        return _fit(config, data, sink, method, checkpoints, device, should_stop)


def _fit(config: RunConfig, data: Dataset, sink: Sink, method: Method, checkpoints: CheckpointManager | None,
         device: str | torch.device, should_stop: ShouldStop | None) -> RunResult:
    device = torch.device(device)
    rng.seed_everything(config.seed)
    model = build_model(config, data.n_features, data.n_classes).to(device)
    n_params = count_params(model)
    optimizers = method.optimizers(model, config)
    order = torch.Generator().manual_seed(config.seed)
    data = data.to(device)
    x_eval, y_eval = _train_eval_subset(data, config.train_eval_size, config.seed)
    # compiles stay out of the epochs' seconds
    warm_up(model, largest_block_rows(config, data, x_eval), input_grads=config.trainer == "backprop")
    best_acc, best_epoch, epoch = -1.0, 0, 0

    def state() -> dict[str, Any]:
        return {"model": model.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "rng": rng.capture(order),
                "progress": {"best_acc": best_acc, "best_epoch": best_epoch}}

    resumed = None
    if checkpoints is not None:
        checkpoints.check_owner(config.config_hash())
        # to host memory: load_state_dict moves the weights and moments to the parameters' device, and
        # torch.optim keeps each ``step`` counter where it was loaded (a CUDA one syncs every step)
        resumed = checkpoints.load_latest(map_location="cpu")
    if resumed is not None:
        epoch, saved = resumed
        model.load_state_dict(saved["model"])
        for name, opt in optimizers.items():
            opt.load_state_dict(saved["optimizers"][name])
        rng.restore(saved["rng"], order)
        best_acc, best_epoch = saved["progress"]["best_acc"], saved["progress"]["best_epoch"]

    def record(train_loss_sum: torch.Tensor | None, started: float) -> EpochRecord | None:
        """Evaluate and emit; None when the run diverged at this epoch."""
        nonlocal best_acc, best_epoch
        train_loss, train_acc = evaluate(model, x_eval, y_eval)
        test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
        finite = all(math.isfinite(v) for v in (train_loss, test_loss))
        if train_loss_sum is not None:
            finite = finite and bool(torch.isfinite(train_loss_sum))
        seconds = time.perf_counter() - started
        if not finite:
            sink(EpochRecord(epoch, None, None, None, None, seconds, {}, diverged=True))
            return None
        extra = method.extra(model, data, config)
        rec = EpochRecord(epoch, train_loss, train_acc, test_loss, test_acc, seconds, extra)
        rec.validate()
        sink(rec)
        if test_acc > best_acc or best_restarts(config, epoch):
            best_acc, best_epoch = test_acc, epoch
        return rec

    if resumed is None:
        if record(None, time.perf_counter()) is None:
            return RunResult("diverged", 0, n_params)
        if checkpoints is not None:
            checkpoints.save(0, state())

    while epoch < config.max_epochs and not patience_exhausted(config, epoch, best_epoch):
        if should_stop is not None and should_stop():
            if checkpoints is not None and checkpoints.saved_epoch != epoch:
                checkpoints.save(epoch, state())
            return RunResult("stopped", epoch, n_params)
        started = time.perf_counter()
        epoch += 1
        batches = shuffled_batches(data.x_train, data.y_train, config.batch_size, order,
                                   min_rows=2 if config.batch_norm else 1)
        loss_sum = method.train_epoch(model, optimizers, batches, epoch, config)
        if record(loss_sum, started) is None:
            return RunResult("diverged", epoch, n_params)
        if checkpoints is not None:
            final = epoch == config.max_epochs or patience_exhausted(config, epoch, best_epoch)
            if checkpoints.due(epoch, final=final):
                checkpoints.save(epoch, state())
    return RunResult("completed", epoch, n_params)
