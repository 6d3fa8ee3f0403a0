"""Migrations build the documented schema from an empty database, on SQLite and PostgreSQL, and the
store refuses to work on a database that is not at head."""
from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from kanfarm.store import SchemaOutOfDate, Store
from kanfarm.store import migrate
from kanfarm.store.schema import RUN_SUMMARY_COLUMNS, metadata

TABLES = {"grids", "grid_runs", "runs", "epoch_metrics", "checkpoints"}

backends = pytest.mark.parametrize("url_fixture", [
    "sqlite_url", pytest.param("fresh_postgres_url", marks=pytest.mark.services)])


@backends
def test_upgrade_from_empty_creates_every_table_and_the_view(url_fixture, request):
    store = Store(request.getfixturevalue(url_fixture))
    try:
        assert store.schema_revision() is None
        store.upgrade()
        assert store.schema_revision() == migrate.head_revision()
        store.check_schema()
        inspector = sa.inspect(store.engine)
        assert TABLES <= set(inspector.get_table_names())
        assert "run_summary" in inspector.get_view_names()
        with store.engine.connect() as conn:
            columns = tuple(conn.execute(sa.text("SELECT * FROM run_summary")).keys())
        assert columns == RUN_SUMMARY_COLUMNS
        store.upgrade()  # a second upgrade is a no-op
        assert store.schema_revision() == migrate.head_revision()
    finally:
        store.dispose(close=True)


@backends
def test_migrated_schema_matches_the_metadata(url_fixture, request):
    """schema.py (what the code uses) and the migration (what databases get) must not drift."""
    store = Store(request.getfixturevalue(url_fixture))
    try:
        store.upgrade()
        with store.engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diffs == []
    finally:
        store.dispose(close=True)


def _check_names(engine) -> set[str]:
    inspector = sa.inspect(engine)
    return {c["name"] for table in ("runs", "epoch_metrics") for c in inspector.get_check_constraints(table)}


@backends
def test_check_constraints_have_the_schemas_names(url_fixture, request):
    """compare_metadata does not compare CHECK constraints: a later migration that drops one by
    name needs the name the schema gives it."""
    store = Store(request.getfixturevalue(url_fixture))
    try:
        store.upgrade()
        expected = {c.name for table in (metadata.tables["runs"], metadata.tables["epoch_metrics"])
                    for c in table.constraints if isinstance(c, sa.CheckConstraint)}
        assert expected == {"ck_runs_status", "ck_epoch_metrics_epoch_nonneg", "ck_epoch_metrics_train_acc_range",
                            "ck_epoch_metrics_test_acc_range"}
        assert _check_names(store.engine) == expected
    finally:
        store.dispose(close=True)


@pytest.mark.services
def test_postgres_databases_made_before_get_their_check_constraints_renamed(fresh_postgres_url):
    """What 0001 did before its names were fixed: the convention's prefix twice."""
    store = Store(fresh_postgres_url)
    try:
        migrate.upgrade(store.engine, "0001")
        with store.engine.begin() as conn:
            for table, name in [("runs", "ck_runs_status"), ("epoch_metrics", "ck_epoch_metrics_epoch_nonneg"),
                                ("epoch_metrics", "ck_epoch_metrics_train_acc_range"),
                                ("epoch_metrics", "ck_epoch_metrics_test_acc_range")]:
                conn.execute(sa.text(f'ALTER TABLE {table} RENAME CONSTRAINT "{name}" TO "ck_{table}_{name}"'))
        assert "ck_runs_ck_runs_status" in _check_names(store.engine)
        store.upgrade()
        assert _check_names(store.engine) == {"ck_runs_status", "ck_epoch_metrics_epoch_nonneg",
                                              "ck_epoch_metrics_train_acc_range", "ck_epoch_metrics_test_acc_range"}
    finally:
        store.dispose(close=True)


@backends
def test_downgrade_to_base_removes_everything_and_upgrade_restores_it(url_fixture, request):
    store = Store(request.getfixturevalue(url_fixture))
    try:
        store.upgrade()
        migrate.downgrade(store.engine, "base")
        inspector = sa.inspect(store.engine)
        assert not TABLES & set(inspector.get_table_names())
        assert "run_summary" not in inspector.get_view_names()
        store.upgrade()
        assert TABLES <= set(sa.inspect(store.engine).get_table_names())
    finally:
        store.dispose(close=True)


def test_operations_on_an_unmigrated_database_raise_schema_out_of_date(sqlite_url):
    store = Store(sqlite_url)
    for operation in (store.check_schema, store.run_ids, store.grids, lambda: store.claim_next("w", 60),
                      lambda: store.submit_grid("g", {}, [])):
        with pytest.raises(SchemaOutOfDate, match="kanfarm db upgrade"):
            operation()
    assert "runs" not in sa.inspect(store.engine).get_table_names()  # nothing was created


def test_a_database_at_another_revision_is_out_of_date(sqlite_url):
    Store(sqlite_url).upgrade()
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": "0000"})
    engine.dispose()
    with pytest.raises(SchemaOutOfDate) as info:
        Store(sqlite_url).run_ids()
    assert info.value.current == "0000" and info.value.head == migrate.head_revision()


def test_url_password_is_masked_but_available_to_child_processes():
    store = Store("postgresql+psycopg://kan:s3cret@db.example:5432/farm")
    assert "s3cret" not in repr(store) and "s3cret" not in str(store.url)
    assert "s3cret" in store.url_string
    with pytest.raises(ValueError, match="unsupported"):
        Store("mysql://u:p@h/d")


def test_a_password_in_the_query_string_is_masked_too():
    """libpq takes ``?password=`` as well; printing the URL must hide it like the one before the host."""
    from kanfarm.store.engine import masked

    shown = masked("postgresql+psycopg://kan@db.example:5432/farm?password=s3cret&sslpassword=k3y&sslmode=require")
    assert "s3cret" not in shown and "k3y" not in shown
    assert shown == "postgresql+psycopg://kan@db.example:5432/farm?password=***&sslmode=require&sslpassword=***"
    assert masked("sqlite:///kanfarm.db") == "sqlite:///kanfarm.db"
    # an unencoded "@" in the password: the URL splits at the first, the rest reads as the host
    assert masked("postgresql+psycopg://kan:S3C@RETPW@db.example/farm") == "postgresql+psycopg://kan:***@***/farm"


@pytest.mark.services
def test_upgrades_started_at_once_on_postgres_all_succeed(fresh_postgres_url):
    """Two machines (or two demos) running `db upgrade` on one new database: without a lock both
    create the same tables and one fails with a duplicate-type error. Processes, not threads:
    Alembic's context is process-global."""
    import subprocess
    import sys
    import time

    script = ("import sys, time; from kanfarm.store import Store; "
              "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); Store(sys.argv[1]).upgrade()")
    start_at = str(time.time() + 4)  # after every interpreter has imported kanfarm
    procs = [subprocess.Popen([sys.executable, "-c", script, fresh_postgres_url, start_at],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = [(p.wait(timeout=120), p.stdout.read()) for p in procs]
    assert all(code == 0 for code, _ in outputs), outputs
    store = Store(fresh_postgres_url)
    try:
        assert store.schema_revision() == migrate.head_revision()
    finally:
        store.dispose(close=True)


@pytest.mark.parametrize("url", ["postgresql+psycopg://kan@db.example:5432/farm", "sqlite:///offline.db"])
def test_migrations_render_as_offline_sql(url):
    """`alembic upgrade head --sql` (for a DBA to review) must not query the database: 0002 did."""
    import io

    from alembic import command

    config = migrate.alembic_config()
    config.set_main_option("sqlalchemy.url", url)
    config.output_buffer = io.StringIO()
    command.upgrade(config, "head", sql=True)
    sql = config.output_buffer.getvalue()
    assert "CREATE TABLE runs" in sql and "CREATE VIEW run_summary" in sql
    assert ("RENAME CONSTRAINT" in sql) == url.startswith("postgresql")


def test_the_per_run_summary_view_gives_what_the_first_view_gave(sqlite_url):
    """0004 computes run_summary per run on SQLite (a grid's report reads only its epoch rows;
    PostgreSQL keeps 0001's view); every value must be what 0001's whole-table view gave: ties (the first epoch at the maximum), a diverged
    epoch's NULL metrics (left out of the gaps and the best), a run with no rows, intrinsic
    dimensions at and above the parameter count."""
    from kanfarm.config import RunConfig
    from kanfarm.training.records import EpochRecord

    store = Store(sqlite_url)
    try:
        store.upgrade()
        cells = [(RunConfig(lr=lr), 1000, dim) for lr, dim in ((0.1, 100), (0.2, None), (0.3, 1000), (0.4, 10))]
        store.submit_grid("g", {"name": "g"}, cells)
        first, second, third, _ = store.run_ids("g")
        curves = {first: [(0.5, 0.4), (0.9, 0.8), (0.95, 0.8), (0.7, 0.6)],  # tie at 0.8: epoch 1
                  second: [(0.2, 0.1), (0.6, 0.3), (0.5, 0.3)],
                  third: [(0.3, 0.2), (0.4, 0.25)]}
        for run_id, curve in curves.items():
            store.claim(run_id, "w", 600)
            for epoch, (train, test) in enumerate(curve):
                store.write_epoch(run_id, EpochRecord(epoch, 1.0, train, 1.0, test, 0.1), worker="w")
            store.write_epoch(run_id, EpochRecord(len(curve), None, None, None, None, 0.1, diverged=True), worker="w")
            store.finish(run_id, "w", "diverged" if run_id == third else "completed")
        query = "SELECT * FROM run_summary ORDER BY run_id"
        per_run = store.query(query)
        assert [(r["best_test_acc"], r["best_epoch"], r["epochs_run"]) for r in per_run] == [
            (0.8, 1, 4), (0.3, 1, 3), (0.25, 1, 2), (None, None, None)]
        migrate.downgrade(store.engine, "0003")  # 0001's view
        with store.engine.connect() as conn:
            whole_table = [dict(row._mapping) for row in conn.execute(sa.text(query))]
        assert whole_table == per_run
    finally:
        store.dispose(close=True)


@pytest.mark.services
def test_postgres_keeps_the_first_summary_view(fresh_postgres_url):
    """Its window functions beat per-run subqueries there (see 0004): 0004 leaves the view alone."""
    store = Store(fresh_postgres_url)
    try:
        migrate.upgrade(store.engine, "0003")
        definition = "SELECT pg_get_viewdef('run_summary'::regclass)"
        with store.engine.connect() as conn:
            before = conn.execute(sa.text(definition)).scalar()
        store.upgrade()
        with store.engine.connect() as conn:
            assert conn.execute(sa.text(definition)).scalar() == before
        assert "row_number()" in before.lower()
    finally:
        store.dispose(close=True)
