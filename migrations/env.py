"""Alembic environment: uses the connection handed over by ``kanfarm.store.migrate`` when there is
one, else builds an engine the way the store does (from ``sqlalchemy.url`` or
``$KANFARM_DATABASE_URL``), so plain ``alembic`` commands behave like ``kanfarm db upgrade``."""
from __future__ import annotations

from alembic import context

from kanfarm.store.engine import database_url, make_engine
from kanfarm.store.migrate import lock
from kanfarm.store.schema import metadata

config = context.config


def _url():
    return database_url(config.get_main_option("sqlalchemy.url") or None)


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection) -> None:
    lock(connection)  # plain `alembic` commands too: two at once would both create the tables
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                      transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            _run_on(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
