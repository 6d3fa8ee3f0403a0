"""Shared database fixtures.

- ``sqlite_url``: a SQLite file in the test's tmp dir (empty: no schema).
- ``postgres_url``: a database of its own for the whole test session, created on the server of
  ``$KANFARM_TEST_POSTGRES_URL`` (default: the local ``test`` database) and dropped afterwards.
  Unreachable server: the test is skipped, or fails when ``CI=true``.
- ``fresh_postgres_url``: ``postgres_url`` with its public schema emptied before the test.
- ``sqlite_store`` / ``postgres_store``: a migrated ``Store`` on the above.

Triton's kernels are tested through its interpreter on this CPU-only suite: ``TRITON_INTERPRET=1``
is set here, before any test module can import Triton (torch._dynamo imports it too), since Triton
imported without it keeps compiled-mode helpers that interpreted kernels cannot call.
"""
from __future__ import annotations

import os
import secrets

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(autouse=True)
def _quiet_long_work(monkeypatch):
    """The CLI's test runner is no terminal: work over ``SAY_AFTER_S`` prints what it does to
    stderr, which Click's ``result.output`` mixes into the JSON a test parses (a loaded machine
    made a 1.3 s ``grid show`` cross 2 s). The test of that output sets its own."""
    from cli import output

    monkeypatch.setattr(output, "SAY_AFTER_S", 3600.0)


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: PostgreSQL tests must run)", pytrace=False)
    pytest.skip(message)


def _admin_engine(url: sa.URL) -> sa.Engine:
    return sa.create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT",
                            connect_args={"connect_timeout": 3})


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'kanfarm.db'}"


@pytest.fixture(scope="session")
def postgres_url():
    base = sa.make_url(os.environ.get("KANFARM_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL))
    admin = _admin_engine(base)
    name = f"kanfarm_test_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        with admin.connect() as conn:
            quoted = conn.dialect.identifier_preparer.quote(name)
            conn.exec_driver_sql(f"CREATE DATABASE {quoted}")  # identifiers cannot be bound
    except sa.exc.OperationalError as exc:
        admin.dispose()
        _unavailable(f"PostgreSQL at {base.render_as_string(hide_password=True)} is unreachable: "
                     f"{exc.orig.__class__.__name__}")
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
        admin.dispose()


@pytest.fixture
def fresh_postgres_url(postgres_url) -> str:
    engine = _admin_engine(sa.make_url(postgres_url))
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("DROP SCHEMA public CASCADE")
            conn.exec_driver_sql("CREATE SCHEMA public")
    finally:
        engine.dispose()
    return postgres_url


def _migrated_store(url: str):
    from kanfarm.store import Store

    store = Store(url)
    store.upgrade()
    return store


@pytest.fixture
def sqlite_store(sqlite_url):
    store = _migrated_store(sqlite_url)
    yield store
    store.dispose(close=True)


@pytest.fixture
def postgres_store(fresh_postgres_url):
    store = _migrated_store(fresh_postgres_url)
    yield store
    store.dispose(close=True)


def stored_grids_and_runs(db_path) -> tuple[int, int]:
    """How many grids and runs a SQLite file holds (a refused command must leave both at 0)."""
    import sqlite3

    con = sqlite3.connect(db_path)
    try:
        return (con.execute("SELECT COUNT(*) FROM grids").fetchone()[0],
                con.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
    finally:
        con.close()


#: a second value of every RunConfig field, for tests that change one field at a time (a field
#: added to RunConfig must be added here); on an HSIC KAN of HIGGS every field but dropout is used
OTHER_VALUES = {
    "dataset": "mnist", "model": "mlp", "depth": "deep", "hidden_widths": (16, 8), "init": "orthogonal",
    "optimizer": "sgd", "lr": 0.5, "trainer": "backprop", "activation": "relu", "spline_order": 2,
    "grid_size": 8, "batch_size": 32, "max_epochs": 4, "seed": 1, "patience": 2, "dropout": 0.0,
    "wide_multiplier": 2.0, "train_eval_size": 100, "hsic_beta": 50.0, "hsic_sigma": 5.0,
    "hsic_x_term": True, "hsic_format_epochs": 1, "matmul_precision": "tf32", "batch_norm": True,
    "dataset_options": {"n_train": 1000}, "extra": {"note": "x"},
}
