"""The in-memory form every loader returns: float32 features scaled into the KAN grid range, int64 labels."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: torch.Tensor  # (n_train, n_features) float32
    y_train: torch.Tensor  # (n_train,) int64
    x_test: torch.Tensor   # (n_test, n_features) float32
    y_test: torch.Tensor   # (n_test,) int64
    n_classes: int

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    def to(self, device: torch.device | str) -> "Dataset":
        """Move every tensor to ``device`` once, so training loops never copy batches from the host."""
        return Dataset(self.name, self.x_train.to(device), self.y_train.to(device),
                       self.x_test.to(device), self.y_test.to(device), self.n_classes)
