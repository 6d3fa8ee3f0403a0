"""Trainers: they emit ``EpochRecord``s to a sink and know nothing of databases.

``train`` picks the method named by ``config.trainer`` and runs the shared epoch loop.
"""
from __future__ import annotations

import torch

from kanfarm.config import RunConfig
from kanfarm.data.dataset import Dataset
from kanfarm.training.checkpoint import CheckpointManager
from kanfarm.training.records import EpochRecord, RunResult, ShouldStop, Sink

__all__ = ["train", "method_for", "CheckpointManager", "EpochRecord", "RunResult"]


def method_for(trainer: str):
    if trainer == "backprop":
        from kanfarm.training.backprop import Backprop
        return Backprop()
    if trainer == "hsic":
        from kanfarm.training.hsic import HSICBottleneck
        return HSICBottleneck()
    raise ValueError(f"unknown trainer {trainer!r}")


def train(config: RunConfig, data: Dataset, sink: Sink, *, checkpoints: CheckpointManager | None = None,
          device: str | torch.device = "cpu", should_stop: ShouldStop | None = None) -> RunResult:
    from kanfarm.training.loop import fit

    config = config.normalised()
    return fit(config, data, sink, method_for(config.trainer), checkpoints=checkpoints,
               device=device, should_stop=should_stop)
