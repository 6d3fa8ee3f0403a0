"""runs.queue: the broker queue a run was last published to, so ``requeue`` sends it back there.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("queue", sa.String(32)))


def downgrade() -> None:
    # a plain DROP COLUMN (SQLite >= 3.35 has it): a batch rebuild of runs would drop the table,
    # and with foreign keys on that deletes every epoch row through the cascade
    op.drop_column("runs", "queue")
