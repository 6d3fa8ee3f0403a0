"""Alembic driven from code: the scripts live in the ``migrations`` package (shipped in the wheel),
so no alembic.ini or working directory is needed."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine


def alembic_config() -> Config:
    import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    return config


@lru_cache(maxsize=1)
def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the migrations package has no revisions"
    return head


@lru_cache(maxsize=1)
def known_revisions() -> frozenset[str]:
    return frozenset(script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions())


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


#: tables every kanfarm revision has (0001 made them): a database at a revision id we know but
#: without them is another Alembic application's whose ids ("0003") collide with ours
KANFARM_TABLES = frozenset({"runs", "grids", "grid_runs", "epoch_metrics"})


def holds_kanfarm_tables(connection: Connection) -> bool:
    return KANFARM_TABLES <= set(sa.inspect(connection).get_table_names())


#: PostgreSQL advisory lock held by a migration: two ``db upgrade`` at once (two machines, two
#: demos) would both create the same tables; the second waits, then finds the database at head.
MIGRATION_LOCK_KEY = 0x6B616E6661726D  # "kanfarm"


def lock(connection: Connection) -> None:
    """Take the migration lock for the rest of ``connection``'s transaction (PostgreSQL; SQLite's
    ``BEGIN IMMEDIATE`` already serialises writers). Taking it twice in one session is harmless."""
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})


def upgrade(engine: Engine, revision: str = "head", check: Callable[[Connection], None] | None = None) -> None:
    """Bring the database to ``revision`` in one transaction (DDL is transactional on both), under
    the migration lock; ``check(connection)`` runs first, under the lock too, and may refuse."""
    config = alembic_config()
    with engine.begin() as connection:
        lock(connection)
        if check is not None:
            check(connection)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str) -> None:
    config = alembic_config()
    with engine.begin() as connection:
        lock(connection)
        config.attributes["connection"] = connection
        command.downgrade(config, revision)
