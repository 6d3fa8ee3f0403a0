"""The experiment store: grids of runs, the run state machine (claims, leases), epoch rows.

State machine of ``runs.status``::

    pending/queued --claim--> running --finish--> completed | diverged | failed
    running --lease expires--> (claimable again; attempts counts the tries)
    running, lease expired --requeue_stale--> queued (a sweep published it again)
    running --release--> queued          pending/queued/running --cancel--> cancelled
    pending/failed/cancelled --mark_queued--> queued

Every transition is one conditional UPDATE whose WHERE states the allowed source states, so two
workers racing for a run cannot both win: the loser's UPDATE matches no row. Times come from the
caller's clock (UTC); machines sharing a PostgreSQL store should keep their clocks in sync (NTP)
and use leases much longer than the skew.
"""
from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterable, Iterator, Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection

from kanfarm.config import RunConfig, check_grid_name
from kanfarm.store import migrate
from kanfarm.store.engine import database_url, make_engine, masked, read_only
from kanfarm.store.errors import DatabaseFileReplaced, LeaseLost, RunNotFound, SchemaOutOfDate
from kanfarm.store.rows import CheckpointRow, GridRow, RunRow, SubmitResult
from kanfarm.store.schema import (CLAIMABLE, FINISHED, RUN_SUMMARY_COLUMNS, STATUSES, UTCDateTime,
                                  checkpoints, epoch_metrics, grid_runs, grids, runs, utcnow)

_CHUNK = 500  # ids per IN (...) list: far below SQLite's bound-parameter limit
_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "seconds", "diverged", "extra")
_run_summary = sa.table("run_summary", *(sa.column(name) for name in RUN_SUMMARY_COLUMNS))
log = logging.getLogger(__name__)


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]


def _at(when) -> sa.BindParameter:
    """A time as a bind parameter typed like the columns (so SQLite gets naive UTC text)."""
    return sa.literal(when, UTCDateTime())


def _epoch_values(run_id: int, record) -> dict[str, Any]:
    """An EpochRecord as an ``epoch_metrics`` row, refused unless ``record.validate()`` passes."""
    record.validate()
    return {"run_id": run_id, "epoch": record.epoch, "train_loss": record.train_loss,
            "train_acc": record.train_acc, "test_loss": record.test_loss, "test_acc": record.test_acc,
            "seconds": record.seconds, "diverged": bool(record.diverged), "extra": dict(record.extra)}


class Store:
    """One database of grids and runs. Cheap to create; call :meth:`dispose` in forked children.

    ``url``: a SQLAlchemy URL; defaults to ``$KANFARM_DATABASE_URL`` or ``sqlite:///kanfarm.db``.
    Print the URL only through :func:`masked` (``str(store.url)`` hides the password before the
    host but not a ``?password=``); :attr:`url_string` is the full URL to hand to a child process
    (never print or log it).
    """

    def __init__(self, url: str | URL | None = None):
        self.url: URL = database_url(url)
        if self.url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {masked(self.url)}: use sqlite or postgresql")
        self.engine = make_engine(self.url)
        self._reader = read_only(self.engine)
        self._schema_ok = False
        self._upsert = None
        file = self.url.database if self.url.get_backend_name() == "sqlite" else None
        self._file_path = os.path.abspath(file) if file and file != ":memory:" else None
        self._file_id: tuple[int, int] | None = None
        self.check_file()
        if self._file_path is not None:  # a new connection opens whatever file is there now
            sa.event.listen(self.engine, "connect", lambda *_: self.check_file())

    def __repr__(self) -> str:
        return f"Store({masked(self.url)!r})"

    @property
    def url_string(self) -> str:
        """The URL with its password, for ``Store(url)`` in another process. Do not log it."""
        return self.url.render_as_string(hide_password=False)

    # -- schema ---------------------------------------------------------------------------------

    def upgrade(self) -> None:
        """Apply pending migrations (alembic upgrade head). A database at a revision this kanfarm
        does not know (newer, or another application's) raises SchemaOutOfDate, untouched. The
        check runs under the migration's lock, so a concurrent upgrade is waited for, not taken
        for another application's tables."""
        migrate.upgrade(self.engine, check=self._refuse_unknown)
        if self.url.get_backend_name() == "sqlite":
            self.engine.dispose()  # new connections see the migrated file and switch it to WAL
        self._schema_ok = True

    def _refuse_unknown(self, conn: Connection) -> None:
        current = migrate.current_revision(conn)
        if current is None:
            self._refuse_foreign(conn)
        elif current not in migrate.known_revisions() or not migrate.holds_kanfarm_tables(conn):
            raise SchemaOutOfDate(masked(self.url), current, migrate.head_revision(), known=False)

    def schema_revision(self) -> str | None:
        """The database's alembic revision; None for an empty database."""
        with self._reader.connect() as conn:
            return migrate.current_revision(conn)

    def foreign_tables(self, conn: Connection | None = None) -> list[str]:
        """Tables of a database without a kanfarm revision (another application's), by name."""
        if conn is None:
            with self._reader.connect() as conn:
                return self.foreign_tables(conn)
        return sorted(set(sa.inspect(conn).get_table_names()) - {"alembic_version"})

    def holds_kanfarm_tables(self) -> bool:
        """Whether kanfarm's tables are there (a known revision without them is another application's)."""
        with self._reader.connect() as conn:
            return migrate.holds_kanfarm_tables(conn)

    def _refuse_foreign(self, conn: Connection) -> None:
        """SchemaOutOfDate (unknown) when a database without a kanfarm revision has tables: another
        application's database, which kanfarm neither migrates nor calls empty."""
        foreign = self.foreign_tables(conn)
        if foreign:
            raise SchemaOutOfDate(masked(self.url), f"none, with tables {', '.join(foreign[:5])}",
                                  migrate.head_revision(), known=False)

    def check_schema(self) -> None:
        """Raise :class:`SchemaOutOfDate` unless the database is at the newest revision."""
        if self._schema_ok:
            return
        with self._reader.connect() as conn:
            current, head = migrate.current_revision(conn), migrate.head_revision()
            if current is None:
                self._refuse_foreign(conn)
            elif not migrate.holds_kanfarm_tables(conn):  # another application's revision ids can be ours
                raise SchemaOutOfDate(masked(self.url), current, head, known=False)
        if current != head:
            raise SchemaOutOfDate(masked(self.url), current, head,
                                  known=current is None or current in migrate.known_revisions())
        self._schema_ok = True

    def dispose(self, close: bool = False) -> None:
        """Drop pooled connections. In a forked child call it before any use with the default
        ``close=False``, so the parent's connections are left alone; ``close=True`` closes them."""
        self.engine.dispose(close=close)

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        self.check_file()
        self.check_schema()
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        self.check_file()
        self.check_schema()
        with self._reader.connect() as conn:
            yield conn

    def check_file(self) -> None:
        """A SQLite file deleted or replaced under a running command: its open connections would go
        on writing into the deleted file, every result lost and the command "done", and a new
        connection would write into the file now there. The file's identity (device, inode) is
        noted when first seen and compared before each transaction and after each connect."""
        if self._file_path is None:
            return
        try:
            st = os.stat(self._file_path)
            now: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            now = None
        if self._file_id is None:
            self._file_id = now
        elif now != self._file_id:
            # an empty file is the deleted one's trace: a connection of another process, opened
            # after the deletion, creates the file empty before its own check refuses to go on
            raise DatabaseFileReplaced(self._file_path, deleted=now is None or st.st_size == 0)

    def _insert(self, table: sa.Table):
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(table)

    # -- grids ----------------------------------------------------------------------------------

    def submit_grid(self, name: str, spec: dict[str, Any],
                    cells: Iterable[tuple[RunConfig, int, int | None]],
                    stated_intrinsic_dims: dict[str, int] | None = None) -> SubmitResult:
        """Create or extend grid ``name`` with ``(config, n_params, intrinsic_dim)`` cells, in one
        transaction. New configs become ``pending`` runs; known ones are linked to the grid, and
        take the value of ``stated_intrinsic_dims`` (dataset -> the spec's own ``[intrinsic_dim]``
        entries, not the known defaults) for their dataset: the latest grid to state one wins, so
        the ``run_summary`` view agrees with that grid's reports. A changed spec replaces the
        stored one; cells already in the grid stay. ``name`` must pass ``check_grid_name``, as a
        spec's does."""
        name = check_grid_name(name)
        now = utcnow()
        values: dict[str, dict[str, Any]] = {}
        for config, n_params, intrinsic_dim in cells:
            row = _run_values(config.normalised(), n_params, intrinsic_dim, now)
            values.setdefault(row["config_hash"], row)
        hashes = list(values)
        with self._write() as conn:
            stored = sa.select(grids.c.id, grids.c.spec).where(grids.c.name == name)
            row = conn.execute(stored).one_or_none()
            if row is None:  # looked up first: on PostgreSQL even a conflicting insert uses up an id
                conn.execute(self._insert(grids).values(name=name, spec=spec, created_at=_at(now))
                             .on_conflict_do_nothing(index_elements=["name"]))
                row = conn.execute(stored).one()
            grid_id, stored_spec = row
            if stored_spec != json.loads(json.dumps(spec)):
                conn.execute(sa.update(grids).where(grids.c.id == grid_id).values(spec=spec))
            known = self._ids_by_hash(conn, hashes)
            restated: dict[int, list[int]] = {}
            for h, run_id in known.items():
                dim = (stated_intrinsic_dims or {}).get(values[h]["dataset"])
                if dim is not None:
                    restated.setdefault(dim, []).append(run_id)
            _lock_in_id_order(conn, [run_id for ids in restated.values() for run_id in ids])
            for dim, ids in sorted(restated.items()):
                for chunk in _chunks(ids):
                    conn.execute(sa.update(runs)
                                 .where(runs.c.id.in_(chunk), runs.c.intrinsic_dim.is_distinct_from(dim))
                                 .values(intrinsic_dim=dim))
            new = [dict(values[h], grid_id=grid_id) for h in hashes if h not in known]
            for chunk in _chunks(new):
                conn.execute(self._insert(runs).on_conflict_do_nothing(index_elements=["config_hash"]),
                             list(chunk))
            links = [{"grid_id": grid_id, "run_id": run_id}
                     for run_id in self._ids_by_hash(conn, hashes).values()]
            for chunk in _chunks(links):
                conn.execute(self._insert(grid_runs).on_conflict_do_nothing(), list(chunk))
        return SubmitResult(grid_id=grid_id, added=len(new), existing=len(known))

    @staticmethod
    def _ids_by_hash(conn: Connection, hashes: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for chunk in _chunks(hashes):
            rows = conn.execute(sa.select(runs.c.config_hash, runs.c.id)
                                .where(runs.c.config_hash.in_(chunk)))
            found.update({h: i for h, i in rows})
        return found

    def grid(self, name: str) -> GridRow | None:
        with self._read() as conn:
            row = conn.execute(sa.select(grids).where(grids.c.name == name)).one_or_none()
        return None if row is None else GridRow(**row._asdict())

    def grids(self) -> list[GridRow]:
        with self._read() as conn:
            return [GridRow(**row._asdict())
                    for row in conn.execute(sa.select(grids).order_by(grids.c.id))]

    # -- runs -----------------------------------------------------------------------------------

    def run(self, run_id: int) -> RunRow:
        with self._read() as conn:
            return self._run_row(conn, run_id)

    @staticmethod
    def _run_row(conn: Connection, run_id: int) -> RunRow:
        row = conn.execute(sa.select(runs).where(runs.c.id == run_id)).one_or_none()
        if row is None:
            raise RunNotFound(f"no run with id {run_id}")
        data = row._asdict()
        data["config"] = RunConfig.from_dict(data["config"])
        return RunRow(**data)

    def run_ids(self, grid: str | None = None, statuses: Iterable[str] | None = None) -> list[int]:
        query = _in_grid(sa.select(runs.c.id), grid).order_by(runs.c.id)
        if statuses is not None:
            query = query.where(runs.c.status.in_(_checked_statuses(statuses)))
        with self._read() as conn:
            return list(conn.scalars(query))

    def config_hashes(self, grid: str) -> set[str]:
        """The config hashes of the runs stored under grid name ``grid``."""
        with self._read() as conn:
            return set(conn.scalars(_in_grid(sa.select(runs.c.config_hash), grid)))

    def mark_queued(self, run_ids: Iterable[int], fresh_attempts: bool = True) -> int:
        """pending, failed and cancelled runs -> queued; other states are left alone. Failed and
        cancelled runs get a fresh attempt budget unless ``fresh_attempts`` is False (a retry
        bounded by attempts must count the earlier ones). Returns how many runs changed."""
        changed = 0
        ids = list(run_ids)
        attempts = (sa.case((runs.c.status == "pending", runs.c.attempts), else_=0) if fresh_attempts
                    else runs.c.attempts)
        with self._write() as conn:
            _lock_in_id_order(conn, ids)
            for chunk in _chunks(ids):
                changed += conn.execute(
                    sa.update(runs)
                    .where(runs.c.id.in_(chunk), runs.c.status.in_(("pending", "failed", "cancelled")))
                    .values(status="queued", lease_expires_at=None, finished_at=None, attempts=attempts)
                ).rowcount
        return changed

    def assign_queue(self, run_ids: Iterable[int], queue: str) -> None:
        """Note the broker queue these runs are published to (``requeue`` sends them back there)."""
        ids = list(run_ids)
        with self._write() as conn:
            _lock_in_id_order(conn, ids)
            for chunk in _chunks(ids):
                conn.execute(sa.update(runs).where(runs.c.id.in_(chunk)).values(queue=queue))

    def queues(self, run_ids: Iterable[int]) -> dict[int, str | None]:
        """Run id -> the queue it was last published to (None: never published)."""
        ids, found = list(run_ids), {}
        with self._read() as conn:
            for chunk in _chunks(ids):
                found.update(conn.execute(sa.select(runs.c.id, runs.c.queue).where(runs.c.id.in_(chunk))).all())
        return found

    # -- claims and leases ----------------------------------------------------------------------

    @staticmethod
    def _claimable(now) -> sa.ColumnElement[bool]:
        return sa.or_(runs.c.status.in_(CLAIMABLE),
                      sa.and_(runs.c.status == "running", runs.c.lease_expires_at < _at(now)))

    def claim(self, run_id: int, worker: str, lease_seconds: float,
              max_attempts: int | None = None) -> RunRow | None:
        """Take run ``run_id`` for ``worker`` if it is waiting or its lease expired; None if
        someone else holds it, it is finished, or (with ``max_attempts``) it ran out of tries, in
        which case it is marked failed."""
        gave_up: list[int] = []
        with self._write() as conn:
            row = self._claim(conn, run_id, worker, lease_seconds, max_attempts, gave_up)
        _say_gave_up(gave_up, worker, max_attempts)
        return row

    def _claim(self, conn: Connection, run_id: int, worker: str, lease_seconds: float,
               max_attempts: int | None, gave_up: list[int]) -> RunRow | None:
        """The claim's update; a run it marks failed for its used attempts is added to ``gave_up``
        (for ``_say_gave_up`` once the transaction committed)."""
        now = utcnow()
        where = sa.and_(runs.c.id == run_id, self._claimable(now))
        # The same worker taking back its own expired run: its hand-back failed in a database
        # outage (workers' names hold their pid, so nobody else has this name). The outage was not
        # the run's fault, so it costs no attempt, as a successful hand-back would have refunded.
        own = sa.and_(runs.c.status == "running", runs.c.worker == worker)
        if max_attempts is not None:
            failed = conn.execute(
                sa.update(runs).where(where, runs.c.attempts >= max_attempts, sa.not_(own))
                .values(status="failed", finished_at=_at(now), lease_expires_at=None,
                        error=sa.func.coalesce(runs.c.error, f"gave up after {max_attempts} attempts")))
            if failed.rowcount:
                gave_up.append(run_id)
                return None
            where = sa.and_(where, sa.or_(runs.c.attempts < max_attempts, own))
        claimed = conn.execute(
            sa.update(runs).where(where)
            .values(status="running", attempts=sa.case((own, runs.c.attempts), else_=runs.c.attempts + 1),
                    worker=worker,
                    lease_expires_at=_at(now + timedelta(seconds=lease_seconds)),
                    heartbeat_at=_at(now), started_at=sa.func.coalesce(runs.c.started_at, _at(now)),
                    finished_at=None))
        return self._run_row(conn, run_id) if claimed.rowcount == 1 else None

    def claim_next(self, worker: str, lease_seconds: float, grid: str | None = None,
                   max_attempts: int | None = None) -> RunRow | None:
        """Claim the lowest-id claimable run (of ``grid``); None when none is left."""
        while True:
            gave_up: list[int] = []
            with self._write() as conn:
                candidate = conn.scalar(
                    _in_grid(sa.select(runs.c.id), grid).where(self._claimable(utcnow()))
                    .order_by(runs.c.id).limit(1)
                    .with_for_update(skip_locked=True, of=runs))  # PostgreSQL; SQLite: BEGIN IMMEDIATE
                if candidate is None:
                    return None
                row = self._claim(conn, candidate, worker, lease_seconds, max_attempts, gave_up)
            _say_gave_up(gave_up, worker, max_attempts)
            if row is not None:
                return row  # else: lost a race or the run ran out of attempts; try the next one

    def claim_many(self, run_ids: Sequence[int], worker: str, lease_seconds: float,
                   max_attempts: int | None = None) -> list[RunRow]:
        """Claim every claimable run of ``run_ids`` in one transaction (a pack); the others
        (finished, held by someone else, out of attempts) are left out. Returns those claimed."""
        order = list(dict.fromkeys(run_ids))
        gave_up: list[int] = []
        with self._write() as conn:  # rows locked in id order: two overlapping packs cannot deadlock
            rows = {run_id: self._claim(conn, run_id, worker, lease_seconds, max_attempts, gave_up)
                    for run_id in sorted(order)}
        _say_gave_up(gave_up, worker, max_attempts)
        return [rows[run_id] for run_id in order if rows[run_id] is not None]

    def claimable_runs(self, grid: str | None = None) -> list[tuple[int, RunConfig]]:
        """(id, config) of the runs (of ``grid``) a worker could claim now, by id: input to packing."""
        query = (_in_grid(sa.select(runs.c.id, runs.c.config), grid).where(self._claimable(utcnow()))
                 .order_by(runs.c.id))
        with self._read() as conn:
            return [(run_id, RunConfig.from_dict(config)) for run_id, config in conn.execute(query)]

    def heartbeat(self, run_id: int, worker: str, lease_seconds: float) -> bool:
        """Extend ``worker``'s lease; False means the run is no longer its own: stop."""
        with self._write() as conn:  # the time once the write lock is ours: SQLite may wait up to 30 s for it
            now = utcnow()
            return conn.execute(
                sa.update(runs)
                .where(runs.c.id == run_id, runs.c.status == "running", runs.c.worker == worker)
                .values(lease_expires_at=_at(now + timedelta(seconds=lease_seconds)),
                        heartbeat_at=_at(now))
            ).rowcount == 1

    def finish(self, run_id: int, worker: str, status: str, error: str | None = None,
               last_epoch: int | None = None) -> bool:
        """running (by ``worker``) -> completed | diverged | failed. False if not its run.

        ``last_epoch``: the run's final epoch; rows after it, left by an earlier attempt whose
        trajectory went further before a crash (a resume that now stops earlier, by patience,
        divergence or an error), are deleted in the same transaction, so the rows end where the
        run ended."""
        if status not in FINISHED:
            raise ValueError(f"finish status {status!r} is not one of {', '.join(FINISHED)}")
        with self._write() as conn:
            held = self._leave_running_in(conn, run_id, worker, status=status, finished_at=_at(utcnow()),
                                          lease_expires_at=None, error=error)
            if held and last_epoch is not None:
                conn.execute(sa.delete(epoch_metrics)
                             .where(epoch_metrics.c.run_id == run_id, epoch_metrics.c.epoch > last_epoch))
            return held

    def release(self, run_id: int, worker: str, error: str | None = None, refund: bool = False) -> bool:
        """running (by ``worker``) -> queued, for another worker to resume. False if not its run.
        ``refund``: give back the attempt the claim took (the run was not at fault: a database
        error), so such hand-backs never exhaust ``max_attempts``."""
        values: dict[str, Any] = {"status": "queued", "lease_expires_at": None}
        if error is not None:
            values["error"] = error
        if refund:
            values["attempts"] = sa.case((runs.c.attempts > 0, runs.c.attempts - 1), else_=0)
        return self._leave_running(run_id, worker, **values)

    def _leave_running(self, run_id: int, worker: str, **values: Any) -> bool:
        with self._write() as conn:
            return self._leave_running_in(conn, run_id, worker, **values)

    @staticmethod
    def _leave_running_in(conn: Connection, run_id: int, worker: str, **values: Any) -> bool:
        return conn.execute(
            sa.update(runs)
            .where(runs.c.id == run_id, runs.c.status == "running", runs.c.worker == worker)
            .values(**values)
        ).rowcount == 1

    def cancel(self, grid: str) -> tuple[int, int]:
        """Cancel the grid's waiting and running runs (a run shared with other grids is cancelled
        for them too). A running run's worker sees it when it writes the epoch under way (or at its
        next heartbeat), writes that epoch and a checkpoint, and stops (``HELD``). Returns (waiting,
        running)."""
        states = (*CLAIMABLE, "running")
        with self._write() as conn:
            now = utcnow()
            # The rows are locked first, then updated by id: two UPDATEs by status (waiting, then
            # running) each took their own snapshot on PostgreSQL, and a run handed back from
            # running to queued in between matched neither and kept training (its worker re-published it).
            found = conn.execute(sa.select(runs.c.id, runs.c.status).where(runs.c.status.in_(states), _grid_ids(grid))
                                 .order_by(runs.c.id).with_for_update(of=runs)).all()
            for chunk in _chunks([run_id for run_id, _ in found]):
                conn.execute(sa.update(runs).where(runs.c.id.in_(chunk), runs.c.status.in_(states))
                             .values(status="cancelled", lease_expires_at=None, finished_at=_at(now)))
        running = sum(status == "running" for _, status in found)
        return len(found) - running, running

    def holders(self, grid: str | None = None) -> list[tuple[int, str]]:
        """(run id, worker) of each running run."""
        query = (_in_grid(sa.select(runs.c.id, runs.c.worker), grid)
                 .where(runs.c.status == "running").order_by(runs.c.id))
        with self._read() as conn:
            return [(run_id, worker) for run_id, worker in conn.execute(query)]

    def expire_lease(self, run_id: int, worker: str) -> bool:
        """End ``worker``'s lease on the run now (it is known dead), so the next claim takes the run;
        False when the run is no longer held by ``worker``."""
        return self._leave_running(run_id, worker, lease_expires_at=_at(utcnow() - timedelta(seconds=1)))

    def stale_runs(self, grid: str | None = None, grace_s: float = 0.0) -> list[int]:
        """Running runs whose lease expired (their worker died or hung), ``grace_s`` ago or earlier."""
        expired = _at(utcnow() - timedelta(seconds=grace_s))
        query = (_in_grid(sa.select(runs.c.id), grid)
                 .where(runs.c.status == "running", runs.c.lease_expires_at < expired)
                 .order_by(runs.c.id))
        with self._read() as conn:
            return list(conn.scalars(query))

    def requeue_stale(self, run_ids: Iterable[int]) -> list[int]:
        """running with an expired lease -> queued, for runs of ``run_ids`` (a sweep published a
        message for each, so the next sweep leaves them alone); the attempt the dead claim took
        stays counted. Returns those moved: a run claimed meanwhile is not."""
        ids = sorted(set(run_ids))
        moved: list[int] = []
        with self._write() as conn:
            _lock_in_id_order(conn, ids)
            now = _at(utcnow())
            for chunk in _chunks(ids):
                stale = sa.and_(runs.c.id.in_(chunk), runs.c.status == "running", runs.c.lease_expires_at < now)
                found = list(conn.scalars(sa.select(runs.c.id).where(stale)))
                conn.execute(sa.update(runs).where(runs.c.id.in_(found)).values(status="queued", lease_expires_at=None))
                moved += found
        return moved

    def status_counts(self, grid: str | None = None) -> dict[str, int]:
        """Runs per status, every status present (0 when none)."""
        query = _in_grid(sa.select(runs.c.status, sa.func.count()), grid).group_by(runs.c.status)
        counts = dict.fromkeys(STATUSES, 0)
        with self._read() as conn:
            counts.update({status: n for status, n in conn.execute(query)})
        return counts

    # -- metrics and checkpoints ----------------------------------------------------------------

    def write_epoch(self, run_id: int, record, worker: str | None = None) -> bool:
        """Store one EpochRecord; a repeat of (run, epoch) replaces the row (resumed runs).
        With ``worker``, raise :class:`LeaseLost` unless that worker holds the run (``HELD``).
        Returns True when the run was cancelled meanwhile: written, and its worker should stop."""
        values = _epoch_values(run_id, record)
        with self._write() as conn:
            status = self._require_holder(conn, run_id, worker) if worker is not None else None
            conn.execute(self._epoch_upsert(), [values])
        return status == "cancelled"

    def write_epochs(self, rows: Sequence[tuple[int, Any]], worker: str) -> tuple[set[int], set[int]]:
        """Store the ``(run_id, EpochRecord)`` rows of runs that ``worker`` holds, in one
        transaction (a pack's epoch: one transaction per row cost more than a tiny pack's epoch on
        a GPU). Returns (the run ids it does not hold, whose rows were not written; those written
        but cancelled meanwhile, which should stop). A bad record raises before anything is written."""
        if not rows:
            return set(), set()
        values = [_epoch_values(run_id, record) for run_id, record in rows]
        ids = sorted({run_id for run_id, _ in rows})
        with self._write() as conn:  # the held rows stay locked until the write commits (_require_holder)
            held = dict(conn.execute(sa.select(runs.c.id, runs.c.status).where(
                runs.c.id.in_(ids), runs.c.status.in_(HELD), runs.c.worker == worker)
                .order_by(runs.c.id).with_for_update()).all())
            kept = [v for v in values if v["run_id"] in held]
            if kept:
                conn.execute(self._epoch_upsert(), kept)
        return set(ids) - set(held), {run_id for run_id, status in held.items() if status == "cancelled"}

    def _epoch_upsert(self):
        """INSERT of an epoch row that replaces the row of the same (run, epoch); built once."""
        if self._upsert is None:
            stmt = self._insert(epoch_metrics)
            self._upsert = stmt.on_conflict_do_update(index_elements=["run_id", "epoch"],
                                                      set_={name: stmt.excluded[name] for name in _METRICS})
        return self._upsert

    @staticmethod
    def _require_holder(conn: Connection, run_id: int, worker: str) -> str:
        """Raise LeaseLost unless ``worker`` holds the run. The row stays locked until the caller's
        write commits (FOR UPDATE on PostgreSQL; SQLite's write transactions are serial), so a claim
        by another worker cannot slip in between this check and the write."""
        row = conn.execute(sa.select(runs.c.status, runs.c.worker)
                           .where(runs.c.id == run_id).with_for_update()).one_or_none()
        if row is None:
            raise RunNotFound(f"no run with id {run_id}")
        if row.status not in HELD or row.worker != worker:
            raise LeaseLost(f"run {run_id} is {row.status} (worker {row.worker}), not held by {worker}")
        return row.status

    def cancelled_while_held(self, run_id: int, worker: str) -> bool:
        """True when the run was cancelled while ``worker`` ran it: it still writes the epoch in
        progress and its checkpoint, then stops (``HELD``)."""
        with self._read() as conn:
            row = conn.execute(sa.select(runs.c.status, runs.c.worker).where(runs.c.id == run_id)).one_or_none()
        return row is not None and row.status == "cancelled" and row.worker == worker

    def epoch_metrics(self, run_id: int | None = None, grid: str | None = None,
                      columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Epoch rows (of a run, or of a grid's runs) by run and epoch; only ``columns`` when given
        (a grid of 100-epoch runs has millions of rows)."""
        selected = [epoch_metrics.c[name] for name in columns] if columns else [epoch_metrics]
        query = sa.select(*selected).order_by(epoch_metrics.c.run_id, epoch_metrics.c.epoch)
        if run_id is not None:
            query = query.where(epoch_metrics.c.run_id == run_id)
        if grid is not None:
            query = query.where(epoch_metrics.c.run_id.in_(_grid_run_ids(grid)))
        with self._read() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def record_checkpoint(self, run_id: int, epoch: int, path: str, sha256: str,
                          worker: str | None = None, kept: Iterable[int] | None = None) -> None:
        """Note a checkpoint file; a second one for the same (run, epoch) replaces the first.
        With ``worker``, raise :class:`LeaseLost` unless that worker holds the run; with ``kept``,
        the epochs whose files are still on disk, forget the rows of the others."""
        stmt = self._insert(checkpoints).values(run_id=run_id, epoch=epoch, path=str(path),
                                                sha256=sha256, created_at=_at(utcnow()))
        stmt = stmt.on_conflict_do_update(
            index_elements=["run_id", "epoch"],
            set_={name: stmt.excluded[name] for name in ("path", "sha256", "created_at")})
        with self._write() as conn:
            if worker is not None:
                self._require_holder(conn, run_id, worker)
            conn.execute(stmt)
            if kept is not None:
                conn.execute(sa.delete(checkpoints).where(checkpoints.c.run_id == run_id,
                                                          checkpoints.c.epoch.not_in([epoch, *kept])))

    def checkpoints(self, run_id: int) -> list[CheckpointRow]:
        query = sa.select(checkpoints).where(checkpoints.c.run_id == run_id).order_by(checkpoints.c.epoch)
        with self._read() as conn:
            return [CheckpointRow(**row._asdict()) for row in conn.execute(query)]

    # -- reports --------------------------------------------------------------------------------

    def summary(self, grid: str | None = None) -> list[dict[str, Any]]:
        """Rows of the ``run_summary`` view (of ``grid``), by run id."""
        query = sa.select(_run_summary).order_by(_run_summary.c.run_id)
        if grid is not None:
            query = query.where(_run_summary.c.run_id.in_(_grid_run_ids(grid)))
        with self._read() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def lowest_test_acc_after_best(self, grid: str | None = None) -> dict[int, float]:
        """Run id -> the lowest test accuracy at an epoch after the run's best one (``run_summary``'s
        ``best_epoch``), for the runs (of ``grid``) that have such an epoch: the overfitting onset
        in one aggregate query, not every epoch row in memory."""
        later = epoch_metrics.alias("later")
        query = (sa.select(_run_summary.c.run_id, sa.func.min(later.c.test_acc))
                 .join(later, sa.and_(later.c.run_id == _run_summary.c.run_id,
                                      later.c.epoch > _run_summary.c.best_epoch))
                 .where(later.c.test_acc.is_not(None))
                 .group_by(_run_summary.c.run_id))
        if grid is not None:
            query = query.where(_run_summary.c.run_id.in_(_grid_run_ids(grid)))
        with self._read() as conn:
            return {run_id: lowest for run_id, lowest in conn.execute(query)}

    def run_configs(self, grid: str | None = None) -> dict[int, dict[str, Any]]:
        """Run id -> stored config (a dict) of the runs (of ``grid``), in one query."""
        query = _in_grid(sa.select(runs.c.id, runs.c.config), grid)
        with self._read() as conn:
            return {run_id: config for run_id, config in conn.execute(query)}

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run one read-only parameterised SQL statement (``:name`` placeholders). Writes are
        refused, and so is a second statement, which could switch the transaction back to writing:
        the drivers enforce it (SQLite's executes one statement; PostgreSQL's runs this one as a
        prepared statement, which holds one command), so no parsing of SQL here can be fooled.
        The statement must also begin as a read does (``_READING``): a read-only transaction
        still lets PostgreSQL's COPY or LOCK and SQLite's ATTACH or PRAGMA act, and the last two
        would stay with the pooled connection; a session's advisory locks are released after it.

        A guard against mistakes, not a sandbox: on PostgreSQL a superuser role (the compose
        file's is one) can still reach the server's files through functions (``pg_read_file``,
        ``lo_export``). Give SQL you did not write a role that may only SELECT."""
        first = _first_word(sql)
        if first not in _READING:
            raise ValueError(f"query takes a statement that reads, beginning with {', '.join(_READING)} "
                             f"(after blanks, '--' comments or '('), not {first or repr(sql[:20])}")
        postgres = self.engine.dialect.name == "postgresql"
        with self._read() as conn:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY" if postgres else "PRAGMA query_only = ON")
            try:
                if postgres:
                    return _prepared_rows(conn, sql, params or {})
                return [dict(row._mapping) for row in conn.execute(sa.text(sql), params or {})]
            except sa.exc.ProgrammingError as exc:
                if "one statement at a time" in str(exc.orig):
                    raise ValueError(_ONE_STATEMENT) from None
                raise
            finally:  # not on a connection an interrupt invalidated (it is discarded): that error
                if not conn.invalidated:  # would replace the KeyboardInterrupt
                    if postgres:  # session locks outlive the transaction, in the pool
                        _release_session_locks(conn)
                    else:
                        conn.exec_driver_sql("PRAGMA query_only = OFF")

    def stream(self, sql: str, params: dict[str, Any] | None = None, batch: int = 2000) -> Iterator[dict[str, Any]]:
        """The rows of kanfarm's own read query ``sql``, fetched ``batch`` at a time (a server-side
        cursor on PostgreSQL): an export of millions of epoch rows never holds them all."""
        with self._read() as conn:
            result = conn.execution_options(stream_results=True, max_row_buffer=batch).execute(sa.text(sql),
                                                                                                 params or {})
            for row in result:
                yield dict(row._mapping)


_ONE_STATEMENT = "query takes one SQL statement; remove the ';' between statements"
#: what ``Store.query``'s statement may begin with
_READING = ("SELECT", "WITH", "VALUES", "TABLE")


def _say_gave_up(run_ids: list[int], worker: str, max_attempts: int | None) -> None:
    """Log the runs a committed claim marked failed: to its caller each is one more run not claimed."""
    for run_id in run_ids:
        log.warning("run %s marked failed at a claim by %s: it has used all its attempts (KANFARM_MAX_ATTEMPTS=%d)",
                    run_id, worker, max_attempts)


def _release_session_locks(conn: Connection) -> None:
    """End the (read-only, perhaps failed) transaction and release the session's advisory locks;
    a connection too broken for that is discarded by the pool, its session with it."""
    try:
        conn.rollback()
        conn.exec_driver_sql("SELECT pg_advisory_unlock_all()")
    except sa.exc.DBAPIError:
        conn.invalidate()


def _first_word(sql: str) -> str:
    """The statement's first keyword, upper case, past blanks, ``--`` comments and opening
    parentheses; "" when it begins otherwise, or where the servers could read it otherwise: a
    ``/*`` comment nests on PostgreSQL, and a ``--`` comment ends at a carriage return there but
    only at a line feed on SQLite (one is allowed just before the line feed: CRLF line ends)."""
    rest = sql
    while True:
        rest = rest.lstrip(" \t\r\n\f(")
        if not rest.startswith("--"):
            break
        end = rest.find("\n")
        if end < 0 or "\r" in rest[:end].rstrip("\r"):
            return ""
        rest = rest[end + 1:]
    word = re.match(r"[A-Za-z]+", rest)
    return word.group(0).upper() if word else ""


def _prepared_rows(conn: Connection, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """``sql`` run as a PostgreSQL prepared statement (psycopg's ``prepare=True``): the server
    refuses more than one command in it."""
    compiled = sa.text(sql).compile(dialect=conn.dialect)
    dbapi = conn.dialect.dbapi
    raw = conn.connection.driver_connection
    threshold = raw.prepare_threshold
    if threshold is None:  # prepared statements turned off (as behind pgbouncer): prepare=True is ignored
        raw.prepare_threshold = 0
    cursor = raw.cursor()
    try:
        cursor.execute(compiled.string, compiled.construct_params(params), prepare=True)
        names = [column.name for column in cursor.description or ()]
        return [dict(zip(names, row)) for row in cursor.fetchall()]
    except dbapi.Error as exc:
        if "multiple commands" in str(exc):
            raise ValueError(_ONE_STATEMENT) from None
        raise sa.exc.DBAPIError.instance(sql, params, exc, dbapi.Error, dialect=conn.dialect) from exc
    finally:
        cursor.close()
        raw.prepare_threshold = threshold


def _grid_run_ids(grid: str) -> sa.Select:
    return (sa.select(grid_runs.c.run_id).join(grids, grids.c.id == grid_runs.c.grid_id)
            .where(grids.c.name == grid))


def _lock_in_id_order(conn: Connection, run_ids: Iterable[int]) -> None:
    """Lock these runs' rows in id order before an UPDATE of many: every transaction that locks
    several runs takes them in that order (claims of packs, cancel, pack epoch rows), so none
    waits in a cycle. An UPDATE ... WHERE id IN (...) locks in the table's physical order, which
    updates shuffle, and deadlocked on PostgreSQL. SQLite takes the whole database (BEGIN IMMEDIATE)."""
    if conn.dialect.name == "sqlite":
        return
    for chunk in _chunks(sorted(set(run_ids))):
        conn.execute(sa.select(runs.c.id).where(runs.c.id.in_(chunk)).order_by(runs.c.id).with_for_update())


#: states in which a run's ``worker`` may still write its rows and checkpoints: running, and
#: cancelled while running (it stops at the epoch boundary, writing that epoch and a checkpoint).
#: Taken back (queued) or claimed by another worker, the run is no longer its.
HELD = ("running", "cancelled")


def _grid_ids(grid: str | None) -> sa.ColumnElement[bool]:
    return sa.true() if grid is None else runs.c.id.in_(_grid_run_ids(grid))


def _in_grid(query: sa.Select, grid: str | None) -> sa.Select:
    """Restrict a query on ``runs`` to a grid's runs (through grid_runs); an unknown grid has none."""
    return query if grid is None else query.where(_grid_ids(grid))


def _checked_statuses(statuses: Iterable[str]) -> list[str]:
    statuses = list(statuses)
    unknown = sorted(set(statuses) - set(STATUSES))
    if unknown:
        raise ValueError(f"unknown status {unknown[0]!r}; known: {', '.join(STATUSES)}")
    return statuses


def _run_values(config: RunConfig, n_params: int, intrinsic_dim: int | None, now) -> dict[str, Any]:
    """The ``runs`` row of a normalised config (grid_id added by the caller). ``intrinsic_dim``
    is stored as given: the grid spec resolves it (kanfarm.reports.KNOWN_INTRINSIC_DIM)."""
    return {
        "config": config.to_dict(), "config_hash": config.normalised_hash(),
        "dataset": config.dataset, "model": config.model, "depth": config.depth,
        "hidden_widths": ",".join(str(w) for w in config.hidden_widths),
        "init": config.init, "optimizer": config.optimizer, "lr": config.lr,
        "trainer": config.trainer, "activation": config.activation,
        "spline_order": config.spline_order, "grid_size": config.grid_size,
        "batch_size": config.batch_size, "max_epochs": config.max_epochs, "seed": config.seed,
        "n_params": int(n_params), "intrinsic_dim": None if intrinsic_dim is None else int(intrinsic_dim),
        "status": "pending", "attempts": 0, "worker": None, "created_at": now,
    }
