"""HSIC Bottleneck training (Ma et al. 2020) for any model with ``blocks`` (MLP, MLP-Wide, KAN).

Each hidden block i minimises  x_term * nHSIC(Z_i, X) - beta * nHSIC(Z_i, Y)  on its own detached
input, so no gradient crosses blocks; the output block (logits) is trained with cross-entropy on
the detached last hidden output, the "format" stage. ``config.hsic_format_epochs``:

* ``None`` (interleaved): every batch takes an HSIC step on every hidden block and a CE step on the
  output block. Accuracy is meaningful from epoch 1.
* ``F`` (1 <= F < max_epochs): epochs 1 .. max_epochs - F train only the hidden blocks with HSIC
  (the output block stays at its initialisation, so accuracy stays near chance); the last F epochs
  train only the output block, as in the study. Early stopping (patience) counts from the start of
  the format stage (``training.loop.patience_exhausted``).

Every block has its own optimiser (``hidden0``, ``hidden1``, ..., ``output``), all built with
``config.optimizer`` and ``config.lr``; the loop checkpoints them by name, so resume is exact.
All block losses are summed into one backward pass: because inputs are detached, each block's
gradient is exactly that of its own loss, and the work is one graph instead of L.

Kernel maths and its numerics: :mod:`kanfarm.training.hsic_kernels`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kanfarm.config import RunConfig
from kanfarm.data.dataset import Dataset
from kanfarm.training.hsic_kernels import full_target, gaussian_kernel, label_target, layer_terms, nhsic
from kanfarm.training.optim import make_optimizer

__all__ = ["HSICBottleneck", "HSICSettings", "gaussian_kernel", "nhsic", "hsic_step", "phase",
           "hidden_nhsic", "hsic_terms", "layer_nhsic", "extra_rows"]

Batch = tuple[torch.Tensor, torch.Tensor]  # as in training.loop; not imported so kernels load without models

#: NOCCO regulariser, as the authors ran it (FACTS.md).
EPS = 1e-5
#: rows of the training set on which ``extra`` reports per-layer nHSIC each epoch.
EXTRA_ROWS = 512


def extra_rows(data: Dataset, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``EXTRA_ROWS`` training rows ``extra`` is measured on: a draw seeded by the run's seed
    (the same every epoch), not the first rows, which some loaders order by label (IMDB)."""
    n = data.x_train.shape[0]
    if n <= EXTRA_ROWS:
        return data.x_train, data.y_train
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 104729))[:EXTRA_ROWS]
    idx = idx.to(data.x_train.device)
    return data.x_train[idx], data.y_train[idx]


@dataclass(frozen=True)
class HSICSettings:
    beta: float = 100.0
    sigma: float = 10.0
    x_term: bool = False
    eps: float = EPS

    @classmethod
    def from_config(cls, config: RunConfig) -> "HSICSettings":
        return cls(float(config.hsic_beta), float(config.hsic_sigma), bool(config.hsic_x_term))


def phase(epoch: int, config: RunConfig) -> tuple[bool, bool]:
    """(train hidden blocks with HSIC, train output block with CE) in ``epoch`` (1-based)."""
    f = config.hsic_format_epochs
    if f is None:
        return True, True
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"hsic_format_epochs must be a non-negative integer or None, got {f!r}")
    hsic_epochs = max(config.max_epochs - f, 0)
    return epoch <= hsic_epochs, epoch > hsic_epochs


def _flat(z: torch.Tensor) -> torch.Tensor:
    return z.reshape(z.shape[0], -1)


class _Terms(torch.autograd.Function):
    """Hidden layers' losses as one autograd node: the values and their closed-form gradients come
    from ``layer_terms`` together, so backward only scales the gradients by the upstream ones.
    First order only (``once_differentiable``): the closed form has no graph of its own."""

    @staticmethod
    def forward(ctx, targets, weights, sigma, eps, with_grads, *zs):
        values, grads = layer_terms(list(zs), targets, sigma, eps, weights if with_grads else None)
        terms = values[0] * weights[0]
        for value, weight in zip(values[1:], weights[1:]):
            terms = terms + value * weight
        ctx.save_for_backward(*(grads or ()))
        return terms

    @staticmethod
    @once_differentiable
    def backward(ctx, upstream):
        return (None,) * 5 + tuple(up[..., None, None] * grad for up, grad in zip(upstream, ctx.saved_tensors))


def hsic_terms(zs: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, n_classes: int,
               settings: HSICSettings) -> torch.Tensor:
    """Each hidden layer's loss ``x_term * nHSIC(Z_i, X) - beta * nHSIC(Z_i, Y)``, shape ``(L, *lead)``
    for hidden outputs ``zs`` of shape ``(*lead, m, features)`` (``lead`` is empty for one run,
    ``(members,)`` for a pack); differentiable with respect to ``zs``."""
    targets, weights = [label_target(y, n_classes, settings.sigma, settings.eps)], [-settings.beta]
    if settings.x_term:
        targets.append(full_target(x, settings.sigma, settings.eps))
        weights.append(1.0)
    with_grads = torch.is_grad_enabled() and any(z.requires_grad for z in zs)  # not computed for nothing
    return _Terms.apply(targets, weights, settings.sigma, settings.eps, with_grads, *zs)


@torch.no_grad()
def layer_nhsic(zs: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, n_classes: int, sigma: float,
                eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(nHSIC(Z_i, X), nHSIC(Z_i, Y)) for hidden outputs ``zs``, each of shape ``(L, *lead)``."""
    (ny, nx), _ = layer_terms(zs, [label_target(y, n_classes, sigma, eps), full_target(x, sigma, eps)], sigma, eps)
    return nx, ny


def hsic_step(model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer],
              x: torch.Tensor, y: torch.Tensor, settings: HSICSettings,
              train_hidden: bool = True, train_output: bool = True) -> torch.Tensor:
    """One update of the trained blocks; a function of (model, optimiser states, batch).

    Returns the batch objective (sum of block losses) times the batch size, detached, no host sync.
    """
    model.train()
    blocks = list(model.blocks)
    hidden, out = blocks[:-1], blocks[-1]
    if not train_hidden:
        for block in hidden:  # frozen feature extractor: no dropout noise in the format stage
            block.eval()
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    zs: list[torch.Tensor] = []
    h = x
    with torch.set_grad_enabled(train_hidden):
        for block in hidden:
            h = block(h.detach())
            zs.append(h)
    with torch.set_grad_enabled(train_output):
        logits = out(h.detach())
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    if train_output:
        total = total + F.cross_entropy(logits, y)
    if train_hidden and hidden:
        total = total + hsic_terms([_flat(z) for z in zs], x, y, logits.shape[-1], settings).sum()
    if train_output or (train_hidden and hidden):
        total.backward()
    for name, opt in optimizers.items():
        if (train_output if name == "output" else train_hidden):
            opt.step()
    return total.detach() * x.shape[0]


@torch.no_grad()
def hidden_nhsic(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, n_classes: int,
                 sigma: float, eps: float = EPS) -> tuple[list[float], list[float]]:
    """Per hidden block (nHSIC(Z_i, X), nHSIC(Z_i, Y)) in eval mode, as plain floats."""
    model.eval()
    zs, h = [], x
    for block in list(model.blocks)[:-1]:
        h = block(h)
        zs.append(h)
    if not zs:
        return [], []
    nx, ny = layer_nhsic([_flat(z) for z in zs], x, y, n_classes, sigma, eps)
    return nx.tolist(), ny.tolist()


class HSICBottleneck:
    def optimizers(self, model: torch.nn.Module, config: RunConfig) -> dict[str, torch.optim.Optimizer]:
        blocks = list(model.blocks)
        opts = {f"hidden{i}": make_optimizer(config.optimizer, b.parameters(), config.lr)
                for i, b in enumerate(blocks[:-1])}
        opts["output"] = make_optimizer(config.optimizer, blocks[-1].parameters(), config.lr)
        return opts

    def train_epoch(self, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                    batches: Iterator[Batch], epoch: int, config: RunConfig) -> torch.Tensor:
        settings = HSICSettings.from_config(config)
        train_hidden, train_output = phase(epoch, config)
        total = None
        for x, y in batches:
            loss = hsic_step(model, optimizers, x, y, settings, train_hidden, train_output)
            total = loss if total is None else total + loss
        return total

    def extra(self, model: torch.nn.Module, data: Dataset, config: RunConfig) -> dict[str, Any]:
        x, y = extra_rows(data, config.seed)
        nx, ny = hidden_nhsic(model, x, y, data.n_classes, float(config.hsic_sigma))
        return {"nhsic_x": nx, "nhsic_y": ny}
