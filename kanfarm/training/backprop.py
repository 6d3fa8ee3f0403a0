"""Plain backpropagation: one optimiser over all parameters, cross-entropy on the logits."""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F

from kanfarm.config import RunConfig
from kanfarm.data.dataset import Dataset
from kanfarm.training.loop import Batch
from kanfarm.training.optim import make_optimizer


def backprop_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One update; a pure function of (model, optimiser state, batch) so that runs can later be
    stacked. Returns the batch's summed loss, detached, without a host sync."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach() * x.shape[0]


class Backprop:
    def optimizers(self, model: torch.nn.Module, config: RunConfig) -> dict[str, torch.optim.Optimizer]:
        return {"all": make_optimizer(config.optimizer, model.parameters(), config.lr)}

    def train_epoch(self, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                    batches: Iterator[Batch], epoch: int, config: RunConfig) -> torch.Tensor:
        total = None
        for x, y in batches:  # summed in float64, as a pack sums it: float32 overflows at 3.4e38
            loss = backprop_step(model, optimizers["all"], x, y)
            total = loss.double() if total is None else total + loss
        return total

    def extra(self, model: torch.nn.Module, data: Dataset, config: RunConfig) -> dict[str, Any]:
        return {}
