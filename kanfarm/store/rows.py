"""Plain, frozen rows returned by the store: callers never hold ORM objects or live connections."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kanfarm.config import RunConfig


@dataclass(frozen=True)
class SubmitResult:
    """``added``: runs new to the database; ``existing``: cells that were already there (from
    this grid or another) and were only linked."""

    grid_id: int
    added: int
    existing: int


@dataclass(frozen=True)
class GridRow:
    id: int
    name: str
    spec: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class RunRow:
    """All columns of ``runs``; ``config`` is the stored normalised config as a RunConfig and
    ``hidden_widths`` the stored text ("64,32")."""

    id: int
    grid_id: int
    config: RunConfig
    config_hash: str
    dataset: str
    model: str
    depth: str | None
    hidden_widths: str
    init: str
    optimizer: str
    lr: float
    trainer: str
    activation: str | None
    spline_order: int
    grid_size: int
    batch_size: int
    max_epochs: int
    seed: int
    n_params: int
    intrinsic_dim: int | None
    status: str
    attempts: int
    worker: str | None
    lease_expires_at: datetime | None
    heartbeat_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    queue: str | None = None


@dataclass(frozen=True)
class CheckpointRow:
    run_id: int
    epoch: int
    path: str
    sha256: str
    created_at: datetime
