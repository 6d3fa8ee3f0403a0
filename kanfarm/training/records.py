"""What a trainer emits: one record per evaluated epoch, and how a run ended.

Trainers know nothing of databases; they call a sink with these records. The runner's sink writes
them to the store, a test's sink appends them to a list.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol


@dataclass(frozen=True)
class EpochRecord:
    """Metrics after ``epoch`` epochs of training (0 = before any training).

    ``diverged`` marks the epoch at which the loss became non-finite; its metrics are then None
    rather than garbage.
    """

    epoch: int
    train_loss: float | None
    train_acc: float | None
    test_loss: float | None
    test_acc: float | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    diverged: bool = False

    def validate(self) -> None:
        """Refuse accuracies outside [0, 1], non-finite numbers, and an ``extra`` that is not JSON
        or holds NaN or inf (it is stored as JSON)."""
        if not isinstance(self.epoch, int) or self.epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {self.epoch!r}")
        for name in ("train_loss", "train_acc", "test_loss", "test_acc", "seconds"):
            value = getattr(self, name)
            if value is None:
                if name == "seconds" or not self.diverged:
                    raise ValueError(f"{name} is missing at epoch {self.epoch}")
                continue
            if not math.isfinite(value):
                raise ValueError(f"{name}={value!r} is not finite at epoch {self.epoch}")
            if name.endswith("_acc") and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r} lies outside [0, 1] at epoch {self.epoch}")
        json.dumps(self.extra, allow_nan=False)


@dataclass(frozen=True)
class RunResult:
    """How a run ended: ``completed``, ``diverged`` or ``stopped`` (asked to stop; resumable)."""

    status: str
    epochs_run: int
    n_params: int


class Sink(Protocol):
    def __call__(self, record: EpochRecord) -> None: ...


#: called between epochs; returning True stops the run cleanly after a checkpoint (lease lost,
#: cancel requested, warm shutdown).
ShouldStop = Callable[[], bool]
