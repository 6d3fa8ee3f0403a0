"""The store's tables as SQLAlchemy Core metadata: the public SQL contract users query.

The migrations in ``migrations/versions`` create exactly this schema (a test compares them); the
``run_summary`` view lives only in the migrations because metadata cannot describe views.

Choices users see in SQL:
- ``runs.hidden_widths`` is text, widths joined by commas ("64,32"), so it groups and filters
  the same way on SQLite and PostgreSQL; the full config is in ``runs.config`` (JSON).
- Times are UTC. PostgreSQL stores ``timestamptz``; SQLite stores naive UTC text.
"""
from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

#: the run state machine's states (a CHECK constraint on ``runs.status``).
STATUSES = ("pending", "queued", "running", "completed", "diverged", "failed", "cancelled")
#: states a worker may claim from (plus ``running`` with an expired lease).
CLAIMABLE = ("pending", "queued")
#: states a run ends in after being run.
FINISHED = ("completed", "diverged", "failed")

metadata = sa.MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})


class UTCDateTime(sa.TypeDecorator):
    """Timezone-aware UTC datetimes in Python whatever the backend (SQLite keeps naive UTC)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware UTC time")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


#: JSONB on PostgreSQL (comparable, indexable), JSON text elsewhere.
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _acc_check(column: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(f"{column} IS NULL OR ({column} >= 0 AND {column} <= 1)",
                              name=f"{column}_range")


grids = sa.Table(
    "grids", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("spec", JSONType, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

runs = sa.Table(
    "runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("grid_id", sa.Integer, sa.ForeignKey("grids.id"), nullable=False),
    sa.Column("config", JSONType, nullable=False),
    sa.Column("config_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("dataset", sa.String(64), nullable=False),
    sa.Column("model", sa.String(32), nullable=False),
    sa.Column("depth", sa.String(32)),
    sa.Column("hidden_widths", sa.String(200), nullable=False),
    sa.Column("init", sa.String(32), nullable=False),
    sa.Column("optimizer", sa.String(32), nullable=False),
    sa.Column("lr", sa.Float, nullable=False),
    sa.Column("trainer", sa.String(32), nullable=False),
    sa.Column("activation", sa.String(32)),
    sa.Column("spline_order", sa.Integer, nullable=False),
    sa.Column("grid_size", sa.Integer, nullable=False),
    sa.Column("batch_size", sa.Integer, nullable=False),
    sa.Column("max_epochs", sa.Integer, nullable=False),
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("n_params", sa.BigInteger, nullable=False),
    sa.Column("intrinsic_dim", sa.Integer),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("worker", sa.String(200)),
    sa.Column("lease_expires_at", UTCDateTime),
    sa.Column("heartbeat_at", UTCDateTime),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime),
    sa.Column("finished_at", UTCDateTime),
    sa.Column("error", sa.Text),
    sa.Column("queue", sa.String(32)),  # the broker queue it was last published to (requeue's default)
    sa.CheckConstraint(_in("status", STATUSES), name="status"),
    sa.Index(None, "status", "id"),
    sa.Index(None, "grid_id"),
)

grid_runs = sa.Table(
    "grid_runs", metadata,
    sa.Column("grid_id", sa.Integer, sa.ForeignKey("grids.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Index(None, "run_id"),
)

epoch_metrics = sa.Table(
    "epoch_metrics", metadata,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("epoch", sa.Integer, primary_key=True),
    sa.Column("train_loss", sa.Float),
    sa.Column("train_acc", sa.Float),
    sa.Column("test_loss", sa.Float),
    sa.Column("test_acc", sa.Float),
    sa.Column("seconds", sa.Float, nullable=False),
    sa.Column("diverged", sa.Boolean, nullable=False),
    sa.Column("extra", JSONType, nullable=False),
    sa.CheckConstraint("epoch >= 0", name="epoch_nonneg"),
    _acc_check("train_acc"),
    _acc_check("test_acc"),
)

checkpoints = sa.Table(
    "checkpoints", metadata,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("epoch", sa.Integer, primary_key=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

#: the view ``run_summary`` (created by the migrations) and its columns, in order.
RUN_SUMMARY_COLUMNS = (
    "run_id", "grid_id", "dataset", "model", "depth", "hidden_widths", "init", "optimizer", "lr",
    "trainer", "activation", "spline_order", "grid_size", "batch_size", "max_epochs", "seed",
    "n_params", "status", "best_test_acc", "best_epoch", "train_acc_at_best", "gap_at_best",
    "mean_gap", "max_gap", "epochs_run", "diverged", "intrinsic_dim", "efficiency",
)
