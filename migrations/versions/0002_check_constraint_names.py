"""CHECK constraints get the names the schema gives them.

0001 as first written let the naming convention prefix its already complete CHECK constraint names
a second time (``ck_runs_ck_runs_status``). 0001 now names them right; this renames them in
databases made before. PostgreSQL only: SQLite keeps CHECK names only inside each table's SQL,
renaming there means rebuilding the tables, and nothing refers to these names on SQLite.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""
from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

NAMES = {"runs": ("ck_runs_status",),
         "epoch_metrics": ("ck_epoch_metrics_epoch_nonneg", "ck_epoch_metrics_train_acc_range",
                           "ck_epoch_metrics_test_acc_range")}


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    for table, names in NAMES.items():
        for name in names:
            old, new = f"ck_{table}_{name}", name
            # one DO block, checked by the server: works online and in offline SQL (--sql) alike
            op.execute(f"""DO $$ BEGIN
    IF EXISTS (SELECT 1 FROM pg_constraint WHERE conname = '{old}' AND conrelid = '{table}'::regclass) THEN
        ALTER TABLE {table} RENAME CONSTRAINT "{old}" TO "{new}";
    END IF;
END $$""")


def downgrade() -> None:
    pass  # 0001 names them right too: nothing to undo
