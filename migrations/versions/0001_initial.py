"""Initial schema: grids, runs, grid_runs, epoch_metrics, checkpoints and the run_summary view.

Self-contained on purpose (no imports from kanfarm.store): a migration is history, and must keep
creating what it created when the current schema module has moved on. Constraint names are
final (``op.f``): the environment's naming convention must not prefix them a second time (before
this was noticed it did, for the CHECK constraints; 0002 renames those).

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATUSES = ("pending", "queued", "running", "completed", "diverged", "failed", "cancelled")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIME = sa.DateTime(timezone=True)

# One row per run. best_epoch is the FIRST epoch reaching the best test accuracy (ROW_NUMBER with
# epoch as tie-break); efficiency = A / (t + 1) / ln(1 + N - ID) (FACTS.md), NULL unless N > ID.
# Portable SQL: SQLite >= 3.35 (ln) and PostgreSQL; casts keep the division in floating point.
RUN_SUMMARY = """
CREATE VIEW run_summary AS
WITH ranked AS (
    SELECT run_id, epoch, train_acc, test_acc,
           ROW_NUMBER() OVER (PARTITION BY run_id ORDER BY test_acc DESC, epoch ASC) AS rn
    FROM epoch_metrics
    WHERE test_acc IS NOT NULL
),
best AS (
    SELECT run_id, test_acc AS best_test_acc, epoch AS best_epoch, train_acc AS train_acc_at_best
    FROM ranked
    WHERE rn = 1
),
gaps AS (
    SELECT run_id, AVG(train_acc - test_acc) AS mean_gap, MAX(train_acc - test_acc) AS max_gap
    FROM epoch_metrics
    WHERE train_acc IS NOT NULL AND test_acc IS NOT NULL
    GROUP BY run_id
),
spans AS (
    SELECT run_id, MAX(epoch) AS epochs_run
    FROM epoch_metrics
    GROUP BY run_id
)
SELECT r.id AS run_id, r.grid_id, r.dataset, r.model, r.depth, r.hidden_widths, r.init,
       r.optimizer, r.lr, r.trainer, r.activation, r.spline_order, r.grid_size, r.batch_size,
       r.max_epochs, r.seed, r.n_params, r.status,
       b.best_test_acc, b.best_epoch, b.train_acc_at_best,
       b.train_acc_at_best - b.best_test_acc AS gap_at_best,
       g.mean_gap, g.max_gap, s.epochs_run,
       CASE WHEN r.status = 'diverged' THEN 1 ELSE 0 END AS diverged,
       r.intrinsic_dim,
       CASE WHEN r.intrinsic_dim IS NOT NULL AND r.n_params > r.intrinsic_dim
            THEN CAST(b.best_test_acc AS DOUBLE PRECISION) / (b.best_epoch + 1)
                 / LN(CAST(1 + r.n_params - r.intrinsic_dim AS DOUBLE PRECISION))
       END AS efficiency
FROM runs r
LEFT JOIN best b ON b.run_id = r.id
LEFT JOIN gaps g ON g.run_id = r.id
LEFT JOIN spans s ON s.run_id = r.id
"""


def _acc_check(column: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(f"{column} IS NULL OR ({column} >= 0 AND {column} <= 1)",
                              name=op.f(f"ck_epoch_metrics_{column}_range"))


def upgrade() -> None:
    op.create_table(
        "grids",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_grids"),
        sa.UniqueConstraint("name", name="uq_grids_name"),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("grid_id", sa.Integer, nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("config_hash", sa.String(64), nullable=False),
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
        sa.Column("lease_expires_at", TIME),
        sa.Column("heartbeat_at", TIME),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("started_at", TIME),
        sa.Column("finished_at", TIME),
        sa.Column("error", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
        sa.ForeignKeyConstraint(["grid_id"], ["grids.id"], name="fk_runs_grid_id_grids"),
        sa.UniqueConstraint("config_hash", name="uq_runs_config_hash"),
        sa.CheckConstraint("status IN (%s)" % ", ".join(f"'{s}'" for s in STATUSES),
                           name=op.f("ck_runs_status")),
    )
    op.create_index("ix_runs_status_id", "runs", ["status", "id"])
    op.create_index("ix_runs_grid_id", "runs", ["grid_id"])
    op.create_table(
        "grid_runs",
        sa.Column("grid_id", sa.Integer, nullable=False),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("grid_id", "run_id", name="pk_grid_runs"),
        sa.ForeignKeyConstraint(["grid_id"], ["grids.id"], ondelete="CASCADE",
                                name="fk_grid_runs_grid_id_grids"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE",
                                name="fk_grid_runs_run_id_runs"),
    )
    op.create_index("ix_grid_runs_run_id", "grid_runs", ["run_id"])
    op.create_table(
        "epoch_metrics",
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("train_loss", sa.Float),
        sa.Column("train_acc", sa.Float),
        sa.Column("test_loss", sa.Float),
        sa.Column("test_acc", sa.Float),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("diverged", sa.Boolean, nullable=False),
        sa.Column("extra", JSON, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "epoch", name="pk_epoch_metrics"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE",
                                name="fk_epoch_metrics_run_id_runs"),
        sa.CheckConstraint("epoch >= 0", name=op.f("ck_epoch_metrics_epoch_nonneg")),
        _acc_check("train_acc"),
        _acc_check("test_acc"),
    )
    op.create_table(
        "checkpoints",
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "epoch", name="pk_checkpoints"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE",
                                name="fk_checkpoints_run_id_runs"),
    )
    op.execute(RUN_SUMMARY)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS run_summary")
    op.drop_table("checkpoints")
    op.drop_table("epoch_metrics")
    op.drop_table("grid_runs")
    op.drop_index("ix_runs_grid_id", table_name="runs")
    op.drop_index("ix_runs_status_id", table_name="runs")
    op.drop_table("runs")
    op.drop_table("grids")
