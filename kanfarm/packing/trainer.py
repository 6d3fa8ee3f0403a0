"""The packed epoch loop: many runs of one shape trained as one stacked model, each keeping its
own records, status, checkpoints and random streams.

Per member it does what ``kanfarm.training.loop.fit`` does for one run (seeding, epoch-0
evaluation, divergence, patience, checkpoint/resume), so a member's rows equal its solo run's and
its checkpoints load in the single-run path and back. Members resumed at different epochs are
trained as separate sub-packs (they need different batch orders). Both trainers pack: backprop
(``pack_step``) and the HSIC Bottleneck (``hsic_pack_step``: every member's layer kernels are
factorised as one batch, and its optimisers keep the single run's names, ``hidden0``, ..., ``output``).
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kanfarm.config import RunConfig
from kanfarm.data.dataset import Dataset
from kanfarm.models import build_model, count_params
from kanfarm.models.compiled_spline import for_run, run_elements, warm_up
from kanfarm.packing.optim import _ORDER, StackedOptimizer, batches_per_epoch
from kanfarm.packing.planner import pack_key, packable
from kanfarm.packing.stacked import StackedNet, stream_key
from kanfarm.training import rng
from kanfarm.training.checkpoint import CheckpointManager
from kanfarm.training.hsic import HSICSettings, extra_rows, hsic_terms, layer_nhsic, phase
from kanfarm.training.loop import (EVAL_CHUNK, _train_eval_subset, best_restarts, largest_block_rows,
                                   patience_exhausted, rows_per_epoch, shuffled_batches)
from kanfarm.training.precision import matmul_precision
from kanfarm.training.records import EpochRecord, RunResult, ShouldStop, Sink


@dataclass
class Member:
    """One run of a pack: its config, where its records go, its checkpoints, when it must stop,
    and ``on_end``, told the member's result as soon as it ends (the pack trains on).

    ``on_error`` is told an exception raised by this member's own work (its sink, its checkpoints,
    resuming it); returning True means the member was failed and the pack trains on without it
    (its result is ``failed`` and ``on_end`` is not called). Without it, or on False, the
    exception ends the pack, as does any error of the pack itself (a step, out of memory).

    ``epoch_end`` is called once every member's record of an epoch has gone to its sink, before
    any member ends or is checkpointed: a sink may hold its record until then (the runner writes
    a pack's rows in one transaction). Its errors are the member's own, as the sink's are."""

    config: RunConfig
    sink: Sink
    checkpoints: CheckpointManager | None = None
    should_stop: ShouldStop | None = None
    on_end: Callable[[RunResult], None] | None = None
    on_error: Callable[[BaseException], bool] | None = None
    epoch_end: Callable[[], None] | None = None


@dataclass
class _Slot:
    """A member's running state inside the pack."""

    index: int
    member: Member
    config: RunConfig
    model: torch.nn.Module  # the single model: template for state dicts
    n_params: int
    rng: dict[str, Any]  # rng.capture() layout; "torch" and "order" refreshed at save time
    generator: torch.Generator
    epoch: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    saved: dict[str, Any] | None = None

    def patience_exhausted(self, epoch: int) -> bool:
        return patience_exhausted(self.config, epoch, self.best_epoch)


def train_pack(members: list[Member], data: Dataset, *, device: str | torch.device = "cpu") -> list[RunResult]:
    """Train every member to its end; results in ``members`` order.

    Members must share :func:`pack_key` (dataset, widths, batch size, epochs, trainer, seed,
    matmul precision...).
    """
    if not members:
        return []
    configs = [m.config.normalised() for m in members]
    if not all(map(packable, configs)):
        raise ValueError("runs with batch norm cannot be packed: train them alone (training.train)")
    keys = {pack_key(c) for c in configs}
    if len(keys) != 1:
        raise ValueError("members of a pack must share dataset, model shape, batch size, epochs, seed, "
                         "trainer and its settings, and matmul precision")
    with matmul_precision(configs[0].matmul_precision):
        return _train_pack(members, configs, data, torch.device(device))


def _member_failed(member: Member, exc: BaseException) -> bool:
    """Whether ``member``'s own error was handled by failing it alone (see ``Member.on_error``)."""
    return member.on_error is not None and member.on_error(exc)


def _train_pack(members: list[Member], configs: list[RunConfig], data: Dataset,
                device: torch.device) -> list[RunResult]:
    results: list[RunResult | None] = [None] * len(members)
    slots = []
    for i, (m, c) in enumerate(zip(members, configs)):
        try:
            slots.append(_make_slot(i, m, c, data, device))
        except Exception as exc:
            if not _member_failed(m, exc):
                raise
            results[i] = RunResult("failed", 0, 0)
    # a sub-pack per resume epoch and per buffers (a KAN's knots): the stack holds one set of them
    by_start: dict[tuple[int, str], list[_Slot]] = {}
    for slot in slots:
        by_start.setdefault((slot.epoch, _buffers_digest(slot.model)), []).append(slot)
    data = data.to(device)
    for (start, _), same in sorted(by_start.items(), key=lambda item: item[0]):
        group = sorted(same, key=lambda s: (_ORDER.index(s.config.optimizer), s.config.activation, s.index))
        config = group[0].config
        rows = rows_per_epoch(config, data)
        with for_run(run_elements(config, data.n_features, data.n_classes, rows, members=len(group))):
            for slot, result in _train_group(group, data, device, start):
                results[slot.index] = result
                if slot.member.on_end is not None and result.status != "failed":
                    slot.member.on_end(result)
    return results  # type: ignore[return-value]


def _buffers_digest(model: torch.nn.Module) -> str:
    """What a member's buffers hold. Under kanfarm's trainers every member of a pack has the same
    (knots never move), but a checkpoint from ``update_grid`` would carry its own."""
    digest = hashlib.sha256()
    for name, buffer in model.named_buffers():
        digest.update(name.encode())
        digest.update(buffer.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def pack_step(net: StackedNet, opt: StackedOptimizer, x: torch.Tensor, y: torch.Tensor,
              generators: list[torch.Generator] | None, alive: torch.Tensor, loss_sum: torch.Tensor) -> None:
    """One update of every member on the batch ``(x, y)``: a function of (stacked model, optimiser
    state, batch). ``alive`` (bool per member) turns False where a loss is non-finite (that member
    is frozen from then on); ``loss_sum`` accumulates each member's summed loss. No host sync."""
    logits = net.forward(x, generators, step=opt.steps)
    members, n, classes = logits.shape
    losses = F.cross_entropy(logits.reshape(-1, classes), y.repeat(members), reduction="none").view(members, n).mean(dim=1)
    grads = torch.autograd.grad(losses.sum(), list(net.params.values()))  # members never mix: separate params
    alive &= torch.isfinite(losses.detach())
    opt.step(net.params, dict(zip(net.params, grads)), alive)
    loss_sum += losses.detach() * n


def hsic_pack_step(net: StackedNet, opt: StackedOptimizer, x: torch.Tensor, y: torch.Tensor,
                   generators: list[torch.Generator] | None, alive: torch.Tensor, loss_sum: torch.Tensor,
                   settings: HSICSettings, train_hidden: bool, train_output: bool) -> None:
    """One HSIC Bottleneck update of every member, as ``training.hsic.hsic_step`` does for one run:
    hidden blocks on their layer losses (inputs detached), the output block on cross-entropy, only
    the groups this phase trains. Same ``alive`` and ``loss_sum`` contract as ``pack_step``."""
    zs, logits = net.forward_blocks(x, generators if train_hidden else None, step=opt.steps,
                                    hidden_grad=train_hidden, output_grad=train_output)
    members, n, classes = logits.shape
    total = torch.zeros(members, dtype=torch.float64, device=x.device)
    if train_output:
        total = total + F.cross_entropy(logits.reshape(-1, classes), y.repeat(members), reduction="none").view(members, n).mean(dim=1)
    if train_hidden and zs:
        total = total + hsic_terms(zs, x, y, classes, settings).sum(dim=0)
    names = [name for group, group_names in opt.groups.items()
             if (train_output if group == "output" else train_hidden) for name in group_names]
    grads = torch.autograd.grad(total.sum(), [net.params[name] for name in names])
    alive &= torch.isfinite(total.detach())
    opt.step(net.params, dict(zip(names, grads)), alive)
    loss_sum += total.detach() * n


def _optimizer_groups(config: RunConfig, model: torch.nn.Module) -> dict[str, list[str]]:
    """The single run's optimisers by name, each with its parameters' names: asked of the run's
    trainer (``Method.optimizers``), so member checkpoints keep the single run's layout."""
    from kanfarm.training import method_for

    names = {id(p): name for name, p in model.named_parameters()}
    optimizers = method_for(config.trainer).optimizers(model, config)
    return {key: [names[id(p)] for group in opt.param_groups for p in group["params"]]
            for key, opt in optimizers.items()}


def _group_steps(config: RunConfig, groups: dict[str, list[str]], epochs: int, per_epoch: int) -> dict[str, int]:
    """Updates each optimiser has taken after ``epochs`` epochs (HSIC trains its blocks in phases)."""
    if config.trainer != "hsic":
        return {group: epochs * per_epoch for group in groups}
    hidden = sum(phase(e, config)[0] for e in range(1, epochs + 1)) * per_epoch
    output = sum(phase(e, config)[1] for e in range(1, epochs + 1)) * per_epoch
    return {group: output if group == "output" else hidden for group in groups}


@torch.no_grad()
def _extras(net: StackedNet, data: Dataset, config: RunConfig) -> list[dict[str, Any]]:
    """Each member's ``epoch_metrics.extra``, as its trainer's ``Method.extra`` computes it."""
    if config.trainer != "hsic":
        return [{} for _ in range(net.size)]
    x, y = extra_rows(data, config.seed)
    zs, _ = net.forward_blocks(x, hidden_grad=False, output_grad=False)
    if not zs:
        return [{"nhsic_x": [], "nhsic_y": []} for _ in range(net.size)]
    nx, ny = layer_nhsic(zs, x, y, data.n_classes, float(config.hsic_sigma))
    return [{"nhsic_x": a, "nhsic_y": b} for a, b in zip(nx.t().tolist(), ny.t().tolist())]


def _make_slot(index: int, member: Member, config: RunConfig, data: Dataset, device: torch.device) -> _Slot:
    """Build the member exactly as ``fit`` does (same seeding, same init draws) and resume it."""
    rng.seed_everything(config.seed)
    model = build_model(config, data.n_features, data.n_classes)
    state = rng.capture(torch.Generator().manual_seed(config.seed))
    generator = torch.Generator(device=device)
    if device.type == "cpu":
        generator.set_state(state["torch"])
    else:  # the solo run's dropout draws from the CUDA generator seeded by manual_seed(seed)
        generator.manual_seed(config.seed)
    slot = _Slot(index, member, config, model.to(device), count_params(model), state, generator)
    resumed = None
    if member.checkpoints is not None:
        member.checkpoints.check_owner(config.config_hash())
        resumed = member.checkpoints.load_latest(map_location=device)
    if resumed is not None:
        slot.epoch, saved = resumed
        model.load_state_dict(saved["model"])
        slot.saved = saved
        slot.rng = dict(saved["rng"])
        if device.type == "cpu":
            generator.set_state(saved["rng"]["torch"].cpu())
        elif "cuda" in saved["rng"]:
            generator.set_state(saved["rng"]["cuda"][0].cpu())
        slot.best_acc = saved["progress"]["best_acc"]
        slot.best_epoch = saved["progress"]["best_epoch"]
    return slot


def _state(slot: _Slot, m: int, net: StackedNet, opt: StackedOptimizer, order: torch.Generator) -> dict[str, Any]:
    """Member ``m``'s checkpoint in ``fit``'s layout."""
    state_rng = dict(slot.rng, order=order.get_state())
    if slot.generator.device.type == "cpu":
        state_rng["torch"] = slot.generator.get_state()
    else:
        state_rng["cuda"] = [slot.generator.get_state()]
    slot.model.load_state_dict(net.member_state_dict(m))
    return {"model": slot.model.state_dict(),
            "optimizers": opt.member_state_dict(m, slot.model),
            "rng": state_rng,
            "progress": {"best_acc": slot.best_acc, "best_epoch": slot.best_epoch}}


@torch.no_grad()
def _evaluate(net: StackedNet, x: torch.Tensor, y: torch.Tensor, chunk: int = EVAL_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member mean cross-entropy and accuracy (dropout off), as device tensors."""
    loss = torch.zeros(net.size, device=x.device)
    correct = torch.zeros(net.size, device=x.device, dtype=torch.long)
    for start in range(0, x.shape[0], chunk):
        logits = net.forward(x[start:start + chunk])
        target = y[start:start + chunk]
        members, n, classes = logits.shape
        ce = F.cross_entropy(logits.float().reshape(-1, classes), target.repeat(members), reduction="none")
        loss += ce.view(members, n).sum(dim=1)
        correct += (logits.argmax(dim=2) == target).sum(dim=1)
    n = x.shape[0]
    return loss / n, correct.float() / n


def _train_group(group: list[_Slot], data: Dataset, device: torch.device, start: int):
    """Yield (slot, RunResult) as members end; all members of ``group`` resume at ``start``."""
    config = group[0].config
    order = torch.Generator().manual_seed(config.seed)
    if start > 0:
        order.set_state(group[0].saved["rng"]["order"].cpu())
    x_eval, y_eval = _train_eval_subset(data, config.train_eval_size, config.seed)
    # later layers take every member's rows at once; compiles stay out of the epochs' seconds
    warm_up(group[0].model, len(group) * largest_block_rows(config, data, x_eval),
            input_grads=config.trainer == "backprop")
    net = StackedNet(config.model, [s.model for s in group], [s.config.activation for s in group],
                     [s.config.dropout for s in group], device,
                     dropout_keys=[stream_key(s.config.config_hash()) for s in group])
    per_epoch = batches_per_epoch(data.x_train.shape[0], config.batch_size)
    groups = _optimizer_groups(config, group[0].model)
    opt = StackedOptimizer(net.params, [s.config.optimizer for s in group], [s.config.lr for s in group],
                           start * per_epoch, groups=groups, group_steps=_group_steps(config, groups, start, per_epoch))
    active = list(group)
    failed: list[_Slot] = []  # members whose own work raised, failed by their on_error

    def guarded(slot: _Slot, work: Callable[[], Any]) -> None:
        """Run one member's own work (its sink, a checkpoint); its error fails that member alone
        when its ``on_error`` says so (it leaves the pack at the next ``end_failed``)."""
        try:
            work()
        except Exception as exc:
            if not _member_failed(slot.member, exc):
                raise
            failed.append(slot)

    def end_failed(epoch: int):
        ended = [s for i, s in enumerate(failed) if all(s is not t for t in failed[:i])]
        failed.clear()
        for slot in ended:
            yield slot, RunResult("failed", epoch, slot.n_params)
        drop(ended)

    def drop(ended: list[_Slot]) -> None:
        nonlocal active
        if ended:
            keep = [m for m, s in enumerate(active) if s not in ended]
            active = [active[m] for m in keep]
            if active:
                net.keep(keep)
                opt.keep(keep)

    def record(epoch: int, started: float, loss_sum: torch.Tensor | None, alive: torch.Tensor | None):
        """Evaluate every member, emit its record; returns the members that diverged."""
        train_loss, train_acc = _evaluate(net, x_eval, y_eval)
        test_loss, test_acc = _evaluate(net, data.x_test, data.y_test)
        rows = [train_loss, train_acc, test_loss, test_acc]
        if loss_sum is not None:
            rows += [loss_sum, alive.float()]
        values = torch.stack(rows).t().tolist()  # one host sync for the whole pack
        extras = _extras(net, data, config)
        # each member's share of the pack's epoch: summed over runs, the device time they took
        # (``kanfarm status`` multiplies it by the epochs left), not the pack's time once per member
        seconds = (time.perf_counter() - started) / len(active)
        diverged = []
        for slot, v, extra in zip(active, values, extras):
            finite = all(math.isfinite(x) for x in (v[0], v[2]))
            if loss_sum is not None:
                finite = finite and math.isfinite(v[4]) and v[5] == 1.0
            if not finite:
                guarded(slot, lambda: slot.member.sink(EpochRecord(epoch, None, None, None, None, seconds, {},
                                                                   diverged=True)))
                if all(slot is not f for f in failed):
                    diverged.append(slot)
                continue
            rec = EpochRecord(epoch, v[0], v[1], v[2], v[3], seconds, extra)
            guarded(slot, lambda: (rec.validate(), slot.member.sink(rec)))  # a bad record is its member's
            if v[3] > slot.best_acc or best_restarts(slot.config, epoch):
                slot.best_acc, slot.best_epoch = v[3], epoch
        for slot in active:
            if slot.member.epoch_end is not None and all(slot is not f for f in failed):
                guarded(slot, slot.member.epoch_end)
        return [s for s in diverged if all(s is not f for f in failed)]  # a failed member is failed

    for m, slot in enumerate(group):  # a member whose optimiser state does not load fails alone
        if slot.saved is not None:
            guarded(slot, lambda: opt.load_member(m, slot.model, slot.saved["optimizers"]))
    yield from end_failed(start)
    epoch = start
    if start == 0:
        for slot in record(0, time.perf_counter(), None, None):
            yield slot, RunResult("diverged", 0, slot.n_params)
            drop([slot])
        yield from end_failed(0)
        for m, slot in enumerate(active):
            if slot.member.checkpoints is not None:
                state = _state(slot, m, net, opt, order)  # the pack's work: its errors are the pack's
                guarded(slot, lambda: slot.member.checkpoints.save(0, state))
        yield from end_failed(0)

    while active:
        ended = []
        for m, slot in enumerate(active):
            if epoch >= slot.config.max_epochs or slot.patience_exhausted(epoch):
                ended.append(slot)
                yield slot, RunResult("completed", epoch, slot.n_params)
            elif slot.member.should_stop is not None and slot.member.should_stop():
                ckpt = slot.member.checkpoints
                if ckpt is not None and ckpt.saved_epoch != epoch:
                    state = _state(slot, m, net, opt, order)
                    guarded(slot, lambda: ckpt.save(epoch, state))
                if any(slot is f for f in failed):
                    continue
                ended.append(slot)
                yield slot, RunResult("stopped", epoch, slot.n_params)
        drop(ended)
        yield from end_failed(epoch)
        if not active:
            break
        started = time.perf_counter()
        epoch += 1
        alive = torch.ones(net.size, dtype=torch.bool, device=device)
        loss_sum = torch.zeros(net.size, dtype=torch.float64, device=device)
        generators = [s.generator for s in active]
        batches = shuffled_batches(data.x_train, data.y_train, config.batch_size, order)
        if config.trainer == "hsic":
            settings, (train_hidden, train_output) = HSICSettings.from_config(config), phase(epoch, config)
            for x, y in batches:
                hsic_pack_step(net, opt, x, y, generators, alive, loss_sum, settings, train_hidden, train_output)
        else:
            for x, y in batches:
                pack_step(net, opt, x, y, generators, alive, loss_sum)
        diverged = record(epoch, started, loss_sum, alive)
        for slot in diverged:
            yield slot, RunResult("diverged", epoch, slot.n_params)
        drop(diverged)
        yield from end_failed(epoch)
        # Checkpoint all members together: at their last epoch, else when any manager is due
        # (its min_interval_s keeps tiny models from spending their time writing checkpoints).
        final = [epoch == s.config.max_epochs or s.patience_exhausted(epoch) for s in active]
        due = any(s.member.checkpoints is not None and s.member.checkpoints.due(epoch) for s in active)
        for m, slot in enumerate(active):
            if slot.member.checkpoints is not None and (due or final[m]):
                state = _state(slot, m, net, opt, order)
                guarded(slot, lambda: slot.member.checkpoints.save(epoch, state))
        yield from end_failed(epoch)
