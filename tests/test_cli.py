"""The embedded default end to end through the CLI: SQLite, local workers, digits."""
from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

TINY = """
name = "tiny"
datasets = ["digits"]
models = ["mlp", "kan"]
depths = ["shallow"]
inits = ["kaiming_normal"]
optimizers = ["adam", "sgd"]
learning_rates = [0.01]
seeds = [0]
batch_size = 128
epochs = 2
"""


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KANFARM_DATABASE_URL", f"sqlite:///{tmp_path / 'k.db'}")
    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    (tmp_path / "tiny.toml").write_text(TINY)
    return tmp_path


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result


def rows(db: Path, sql: str, params=()):
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, params)]
    finally:
        con.close()


def test_commands_that_only_read_or_submit_do_not_import_torch(env):
    """torch's import takes seconds; commands that read the store or count parameters (status,
    grid show/submit, reports, export) must not pay it. Run in a fresh interpreter, one
    command after the other, stopping at the first that imports it."""
    script = """
import sys
from typer.testing import CliRunner
from cli.main import app
for args in (["db", "upgrade"], ["grid", "show", "tiny.toml"], ["grid", "submit", "tiny.toml"], ["status"],
             ["grid", "list"], ["report", "summary", "--grid", "tiny"], ["report", "efficiency"],
             ["report", "gap"], ["report", "sensitivity"], ["export", "--format", "csv"], ["cancel", "--grid", "tiny"]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
    if "torch" in sys.modules:
        sys.exit(f"{' '.join(args)} imported torch")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=env, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_output_to_a_full_disk_is_one_line_and_exit_1(env):
    """``kanfarm status > file`` on a full disk was Rich's 60-line traceback (or, past the last
    buffer, exit 0 with the output cut)."""
    assert invoke("db", "upgrade").exit_code == 0
    for args in (["status"], ["grid", "show", "tiny.toml", "--json"], ["export", "--format", "csv"]):
        with open("/dev/full", "w") as full:
            done = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=env, stdout=full, stderr=subprocess.PIPE,
                                  text=True, timeout=120,
                                  env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip() == "error: standard output cannot be written (No space left on device)"
    for args in (["status"], ["status", "--json"], ["export", "--format", "csv"]):  # a reader that went away (`| head`): nothing to say
        reader_gone = subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True,
                                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        reader_gone.stdout.close()
        _, err = reader_gone.communicate(timeout=120)
        assert (reader_gone.returncode, err) == (1, ""), args


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_database_file_deleted_or_replaced_mid_run_is_an_error_not_done(env, monkeypatch, how):
    """Open connections went on writing into the deleted file: every result lost, and the
    command said "done", exit 0."""
    import shutil

    import typer

    from cli.common import handles_errors
    from kanfarm import local
    from kanfarm.grids import load_spec
    from kanfarm.store import DatabaseFileReplaced, Store
    from kanfarm.submission import submit

    db = env / "k.db"
    store = Store(f"sqlite:///{db}")
    store.upgrade()
    submit(store, load_spec(str(env / "tiny.toml")))
    shutil.copy(db, env / "copy.db")
    polls = []

    def on_poll(snap):
        polls.append(snap)
        if len(polls) == 1:  # while the first run trains
            if how == "replaced":  # renamed over it, as a copy-then-move would: never missing
                os.replace(env / "copy.db", db)
            else:
                db.unlink()

    with pytest.raises(DatabaseFileReplaced, match=f"the database file {db} was {how} while"):
        local.run_grid_locally(store, "tiny", on_poll=on_poll, poll_s=0.05)
    with pytest.raises(DatabaseFileReplaced):  # and nothing more is written through this store
        store.status_counts("tiny")
    store.dispose()
    # (What the replacing file now holds is not asserted: SQLite reads the old file's -wal beside it.)

    @handles_errors
    def command():
        raise DatabaseFileReplaced(str(db), deleted=how == "deleted")

    with pytest.raises(typer.Exit) as stopped:  # the CLI's words: one line, exit 1
        command()
    assert stopped.value.exit_code == 1


def test_a_warning_is_one_line_not_a_file_a_line_and_source(env):
    """A dataset cache that cannot be read or written was reported as ``kanfarm/...py:233:
    UserWarning: ...`` and a line of kanfarm's source, by the command and again by each worker."""
    data = env / "data"
    environ = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "KANFARM_DATA_DIR": str(data)}

    def kanfarm(*args):
        return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=env, env=environ, capture_output=True,
                              text=True, timeout=300)

    assert kanfarm("db", "upgrade").returncode == 0
    assert kanfarm("run", "grid", "tiny.toml").returncode == 0  # builds the digits cache
    (cache,) = data.glob("digits/cache-*.pt")
    cache.unlink()
    cache.mkdir()  # neither read nor written from now on
    (env / "tiny.toml").write_text(TINY.replace('"tiny"', '"tiny2"').replace("epochs = 2", "epochs = 1"))
    done = kanfarm("run", "grid", "tiny.toml", "--workers", "2")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "dataset cache" in line]
    assert len(lines) >= 3 and all(line.startswith("warning: ") for line in lines), done.stderr  # command, workers
    assert "UserWarning" not in done.stderr and "load_dataset(" not in done.stderr, done.stderr


def test_a_command_run_inside_a_program_puts_its_warning_display_back(env):
    """The CLI shows warnings as one line; run in-process (CliRunner, a notebook) it left that
    display in place, and warnings.catch_warnings(record=True) around it recorded nothing."""
    import warnings

    before = warnings.showwarning
    assert invoke("db", "upgrade").exit_code == 0
    assert warnings.showwarning is before


def test_commands_refuse_an_unmigrated_database(env):
    result = invoke("status")
    assert result.exit_code == 2
    assert "kanfarm db upgrade" in result.output


def test_commands_refuse_a_database_that_is_not_there_without_creating_it(env, monkeypatch):
    for args in (["status"], ["grid", "list"], ["report", "summary"], ["run", "grid", "tiny.toml"]):
        result = invoke(*args)
        assert result.exit_code == 2 and "no database at" in result.output and "kanfarm db upgrade" in result.output
    assert "revision none" in invoke("db", "current").output
    assert not (env / "k.db").exists()
    monkeypatch.delenv("KANFARM_DATABASE_URL")  # the default: ./kanfarm.db
    assert invoke("grid", "list").exit_code == 2 and not (env / "kanfarm.db").exists()


def test_demo_creates_a_new_database_but_leaves_an_out_of_date_one_to_db_upgrade(env):
    """A shared database is migrated on purpose, by `kanfarm db upgrade`, not by trying the demo."""
    from kanfarm.store import Store, migrate

    store = Store(f"sqlite:///{env / 'k.db'}")
    migrate.upgrade(store.engine, "0002")
    store.dispose(close=True)
    result = invoke("demo")
    assert result.exit_code == 2 and "kanfarm db upgrade" in result.output, result.output
    assert rows(env / "k.db", "SELECT version_num FROM alembic_version") == [{"version_num": "0002"}]


def test_a_bad_device_is_refused_before_anything_is_written(env):
    assert invoke("db", "upgrade").exit_code == 0
    for device in ("tpu", "cuda"):  # torch here sees no CUDA device
        result = invoke("run", "grid", "tiny.toml", "--device", device)
        assert result.exit_code == 2 and "--device" in result.output, result.output
    assert rows(env / "k.db", "SELECT (SELECT COUNT(*) FROM grids) AS grids, (SELECT COUNT(*) FROM runs) AS runs") == [
        {"grids": 0, "runs": 0}]


@pytest.mark.parametrize("url,code,message", [
    ("notaurl", 2, "not a database URL"),
    ("mysql://user:secret@127.0.0.1/db", 2, "unsupported database"),
    ("postgresql+psycopg://user:secret@127.0.0.1:abc/db", 2, "not a database URL"),
    ("postgresql+psycopg://user:secret@127.0.0.1:99999/db", 2, "not a port number"),
    ("sqlite:////nonexistent-folder/k.db", 2, "no folder '/nonexistent-folder'"),  # db upgrade creates files, not folders
    ("sqlite:///.", 2, "is a folder"),
    ("sqlite:///k.db?timeout=abc", 2, "a query option's value"),
    ("sqlite:///k.db?bogus=1", 2, "'bogus' are not accepted"),
    ("sqlite:///file:k.db?mode=ro&uri=true", 2, "URI filenames (uri=true) are not supported"),
    ("postgresql+psycopg://user:secret@127.0.0.1/db?port=abc", 2, "a query option's value"),
    ("postgresql+psycopg://user:sec@ret@127.0.0.1/db", 2, "write an '@' in the password as %40"),
])
def test_a_bad_database_url_is_one_line_naming_the_variable(env, monkeypatch, url, code, message):
    monkeypatch.setenv("KANFARM_DATABASE_URL", url)
    result = invoke("db", "upgrade")
    assert result.exit_code == code, result.output
    assert message in result.output and "KANFARM_DATABASE_URL" in result.output
    assert "Traceback" not in result.output and "secret" not in result.output and "ret@" not in result.output


@pytest.mark.services
@pytest.mark.parametrize("query,message", [("sslmode=bogus", 'invalid sslmode value: "bogus"'),
                                           ("bogus=1", 'invalid connection option "bogus"')])
def test_a_postgres_url_option_the_driver_refuses_exits_2(env, monkeypatch, postgres_url, query, message):
    """Refused before any connection is tried: the URL is wrong, the database is not unavailable."""
    monkeypatch.setenv("KANFARM_DATABASE_URL", f"{postgres_url}?{query}")
    result = invoke("db", "upgrade")
    assert result.exit_code == 2 and "the driver refused the URL" in result.output and message in result.output, \
        result.output


def test_export_to_a_path_it_cannot_write_exits_2_and_leaves_nothing(env):
    assert invoke("db", "upgrade").exit_code == 0
    (env / "folder").mkdir()
    for out in ("folder", str(env / "missing" / "x.csv")):
        result = invoke("export", "--format", "csv", "--out", out)
        assert result.exit_code == 2 and "--out: cannot write" in result.output
    assert invoke("report", "html", "--out", "folder").exit_code == 2
    assert not [p.name for p in env.iterdir() if p.name.endswith(".tmp")]
    assert list((env / "folder").iterdir()) == []


def test_a_grid_whose_dataset_cannot_be_had_stops_before_any_run(env, monkeypatch):
    """One message from the first dataset that is missing, exit 1, and nothing written."""
    monkeypatch.setenv("KANFARM_OFFLINE", "1")
    monkeypatch.setenv("KANFARM_DATA_DIR", str(env / "data"))
    assert invoke("db", "upgrade").exit_code == 0
    (env / "mnist.toml").write_text(TINY.replace('"tiny"', '"m"').replace('["digits"]', '["mnist"]'))
    result = invoke("run", "grid", "mnist.toml")
    assert result.exit_code == 1 and "'mnist' is unavailable" in result.output
    assert isinstance(result.exception, SystemExit)  # exit 1 by design, not an unhandled error
    assert rows(env / "k.db", "SELECT COUNT(*) AS n FROM runs")[0]["n"] == 0


def test_run_grid_checks_the_datasets_of_earlier_cells_of_the_grid_too(env, monkeypatch):
    """Cells of an earlier version of a spec stay in the grid and `run grid` trains them: their
    dataset is checked before anything is trained or written (it failed one run per cell)."""
    monkeypatch.setenv("KANFARM_OFFLINE", "1")
    monkeypatch.setenv("KANFARM_DATA_DIR", str(env / "data"))
    assert invoke("db", "upgrade").exit_code == 0
    (env / "old.toml").write_text(TINY.replace('["digits"]', '["mnist"]'))
    assert invoke("grid", "submit", "old.toml").exit_code == 0  # grid "tiny", mnist cells
    result = invoke("run", "grid", "tiny.toml")  # grid "tiny", digits cells
    assert result.exit_code == 1 and "'mnist' is unavailable" in result.output
    assert rows(env / "k.db", "SELECT COUNT(*) AS n FROM runs")[0]["n"] == 4  # digits cells not even written
    assert rows(env / "k.db", "SELECT COUNT(*) AS n FROM epoch_metrics")[0]["n"] == 0


def test_a_damaged_dataset_file_is_one_line_naming_it(env, monkeypatch):
    monkeypatch.setenv("KANFARM_OFFLINE", "1")
    monkeypatch.setenv("KANFARM_DATA_DIR", str(env / "data"))
    assert invoke("db", "upgrade").exit_code == 0
    folder = env / "data" / "mnist"
    folder.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(b"not a gzip file")
    (env / "mnist.toml").write_text(TINY.replace('"tiny"', '"m"').replace('["digits"]', '["mnist"]'))
    result = invoke("run", "grid", "mnist.toml")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # not an unhandled error
    assert "not a readable gzip file" in result.output and "train-images-idx3-ubyte.gz" in result.output


def test_a_changed_spec_under_the_same_name_warns_of_the_cells_it_keeps(env):
    assert invoke("db", "upgrade").exit_code == 0
    assert "warning" not in invoke("grid", "submit", "tiny.toml").output
    (env / "tiny.toml").write_text(TINY.replace("epochs = 2", "epochs = 2\nbatch_norm = true"))
    result = invoke("grid", "submit", "tiny.toml")
    assert result.exit_code == 0 and "also holds 4 runs that are not cells of this spec" in result.output


def test_intrinsic_dim_option_is_checked(env):
    assert invoke("db", "upgrade").exit_code == 0
    for item, message in (("digits=\u00b2", "non-negative integer"), ("digits=-1", "non-negative integer"),
                          ("svhn=3", "unknown dataset")):
        result = invoke("report", "efficiency", "--intrinsic-dim", item.encode().decode("unicode_escape"))
        assert result.exit_code == 2 and message in result.output, result.output


def test_an_intrinsic_dim_given_twice_and_an_empty_plot_folder_are_refused(env):
    assert invoke("db", "upgrade").exit_code == 0
    result = invoke("report", "efficiency", "--intrinsic-dim", "digits=1", "--intrinsic-dim", "digits=2")
    assert result.exit_code == 2 and "--intrinsic-dim: digits given twice" in result.output, result.output
    result = invoke("report", "plot", "--out", "")
    assert result.exit_code == 2 and "--out: give a folder" in result.output, result.output


def test_invalid_spec_exits_2_names_the_field_and_writes_nothing(env):
    assert invoke("db", "upgrade").exit_code == 0
    (env / "bad.toml").write_text(TINY.replace('"adam", "sgd"', '"adam", "adamw"'))
    result = invoke("run", "grid", "bad.toml")
    assert result.exit_code == 2
    assert "optimizers[1]" in result.output and "adamw" in result.output
    assert rows(env / "k.db", "SELECT COUNT(*) AS n FROM runs")[0]["n"] == 0
    assert rows(env / "k.db", "SELECT COUNT(*) AS n FROM grids")[0]["n"] == 0
    assert invoke("grid", "show", "no-such-preset").exit_code == 2
    assert invoke("report", "summary", "--grid", "nope").exit_code == 2
    assert invoke("export", "--format", "xml").exit_code == 2


def test_grid_show_json(env):
    result = invoke("grid", "show", "paper-mnist", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["cells"] == 243
    assert info["n_params"]["max"] > info["n_params"]["min"] > 0


def test_run_grid_then_reports_match_an_independent_calculation(env):
    assert invoke("db", "upgrade").exit_code == 0
    result = invoke("run", "grid", "tiny.toml")
    assert result.exit_code == 0, result.output
    db = env / "k.db"
    runs = rows(db, "SELECT * FROM runs ORDER BY id")
    assert len(runs) == 4 and {r["status"] for r in runs} == {"completed"}
    epochs = rows(db, "SELECT * FROM epoch_metrics ORDER BY run_id, epoch")
    assert len(epochs) == 4 * 3

    # Resubmitting adds nothing; the runs are not executed again.
    again = invoke("run", "grid", "tiny.toml")
    assert again.exit_code == 0 and "0 runs added, 4 already stored" in again.output
    assert rows(db, "SELECT COUNT(*) AS n FROM epoch_metrics")[0]["n"] == 12
    assert rows(db, "SELECT MAX(attempts) AS n FROM runs")[0]["n"] == 1

    summary = json.loads(invoke("report", "summary", "--grid", "tiny", "--json").output)
    eff = {r["run_id"]: r for r in json.loads(invoke("report", "efficiency", "--json",
                                                     "--intrinsic-dim", "digits=100").output)}
    gap = {r["run_id"]: r for r in json.loads(invoke("report", "gap", "--json").output)}
    for s in summary:
        curve = [e for e in epochs if e["run_id"] == s["run_id"]]
        best = max(e["test_acc"] for e in curve)
        first = min(e["epoch"] for e in curve if e["test_acc"] == best)
        at_best = next(e for e in curve if e["epoch"] == first)
        assert s["best_test_acc"] == pytest.approx(best)
        assert s["best_epoch"] == first
        assert s["gap_at_best"] == pytest.approx(at_best["train_acc"] - best)
        assert gap[s["run_id"]]["mean_gap"] == pytest.approx(
            sum(e["train_acc"] - e["test_acc"] for e in curve) / len(curve))
        n_params = next(r["n_params"] for r in runs if r["id"] == s["run_id"])
        assert eff[s["run_id"]]["efficiency"] == pytest.approx(best / (first + 1) / math.log(1 + n_params - 100))
        assert s["efficiency"] is None  # digits has no known intrinsic dimension
        # an MLP has no spline settings: its stored defaults are not shown as if it had
        shown = [r[s["run_id"]] for r in (eff, gap)] + [s]
        want = (3, 5) if s["model"] == "kan" else (None, None)
        assert {(r["spline_order"], r["grid_size"]) for r in shown} == {want}

    sens = json.loads(invoke("report", "sensitivity", "--json").output)
    assert [(r["model"], r["count"]) for r in sens] == [("kan", 2), ("mlp", 2)]
    for r in sens:
        accs = sorted(s["best_test_acc"] for s in summary if s["model"] == r["model"])
        assert r["min"] == pytest.approx(accs[0]) and r["max"] == pytest.approx(accs[-1])
        assert r["mean"] == pytest.approx(sum(accs) / 2) and r["divergence_rate"] == 0

    csv_text = invoke("report", "summary", "--csv").output
    assert csv_text.splitlines()[0].startswith("run_id,") and len(csv_text.splitlines()) == 5

    status = json.loads(invoke("status", "--grid", "tiny", "--json").output)
    assert {k: v for k, v in status["counts"].items() if v} == {"completed": 4} and status["progress"] == 1.0 and status["eta_seconds"] == 0
    assert "time left: none, every run has ended" in invoke("status", "--grid", "tiny").output  # not "about 0 s"

    assert invoke("export", "--format", "json", "--out", "long.json").exit_code == 0
    long = json.loads((env / "long.json").read_text())
    assert len(long) == 12 and {"config_hash", "epoch", "test_acc", "model"} <= set(long[0])
    assert {(r["model"], r["spline_order"], r["grid_size"]) for r in long} == {("kan", 3, 5), ("mlp", None, None)}
    # written row by row, the same text as the whole list rendered at once, to a file and to stdout
    assert (env / "long.json").read_text() == json.dumps(long, indent=2) + "\n" == invoke("export", "--format", "json").stdout
    assert invoke("export", "--format", "csv", "--out", "long.csv").exit_code == 0
    import csv as csv_module
    import io

    table = list(csv_module.DictReader(io.StringIO((env / "long.csv").read_text())))
    assert [(int(r["run_id"]), int(r["epoch"])) for r in table] == [(r["run_id"], r["epoch"]) for r in long]
    assert [json.loads(r["config"]) for r in table] == [r["config"] for r in long]


def test_two_local_worker_processes_share_one_sqlite_file(env):
    """As a subprocess, the way a researcher runs it; no 'database is locked'."""
    spec = TINY.replace('learning_rates = [0.01]', 'learning_rates = [0.01, 0.003, 0.001]')
    (env / "tiny.toml").write_text(spec)
    cmd = [sys.executable, "-m", "cli.main"]
    environ = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run(cmd + ["db", "upgrade"], check=True, env=environ, capture_output=True)
    done = subprocess.run(cmd + ["run", "grid", "tiny.toml", "--workers", "2"], env=environ,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "locked" not in done.stderr
    db = env / "k.db"
    runs = rows(db, "SELECT status, worker, attempts FROM runs")
    assert len(runs) == 12 and {r["status"] for r in runs} == {"completed"}
    assert {r["attempts"] for r in runs} == {1}
    dup = rows(db, "SELECT run_id, epoch, COUNT(*) AS n FROM epoch_metrics GROUP BY run_id, epoch HAVING n > 1")
    assert dup == []


def kan_grid_as_a_subprocess(env: Path, epochs: int):
    """tiny.toml with KANs only and ``epochs`` epochs, a migrated k.db, and the command line and
    environment to run the CLI as a researcher does (a subprocess). Returns (cmd, environ, db)."""
    spec = TINY.replace("epochs = 2", f"epochs = {epochs}").replace('models = ["mlp", "kan"]', 'models = ["kan"]')
    (env / "tiny.toml").write_text(spec)
    cmd = [sys.executable, "-m", "cli.main"]
    environ = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run(cmd + ["db", "upgrade"], check=True, env=environ, capture_output=True)
    return cmd, environ, env / "k.db"


def run_grid_until_epoch(cmd: list[str], environ: dict, db: Path, epoch: int) -> subprocess.Popen:
    """`run grid tiny.toml` started as a subprocess, returned once some run has written ``epoch``."""
    import time

    proc = subprocess.Popen(cmd + ["run", "grid", "tiny.toml"], env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if db.exists() and rows(db, "SELECT COUNT(*) AS n FROM epoch_metrics WHERE epoch >= ?", (epoch,))[0]["n"]:
            break
    return proc


def test_an_interrupt_during_a_query_stays_an_interrupt(tmp_path):
    """Ctrl-C landing in the progress poll's query: SQLAlchemy invalidates the connection, and
    resetting it afterwards raised an error that replaced the KeyboardInterrupt, so `run grid`
    printed a traceback instead of checkpointing and exiting 130 (seen as a flaky test below)."""
    import sqlalchemy as sa

    from kanfarm.store import Store

    store = Store(f"sqlite:///{tmp_path / 'k.db'}")
    store.upgrade()
    fired = []

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def interrupt(conn, cursor, statement, *args):
        if "FROM runs" in statement and not fired:
            fired.append(1)
            raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            store.query("SELECT COUNT(*) AS n FROM runs")
        assert store.query("SELECT COUNT(*) AS n FROM runs") == [{"n": 0}]  # the store still works
    finally:
        store.dispose(close=True)


def test_ctrl_c_leaves_the_grid_resumable(env):
    """SIGINT mid-grid: runs are checkpointed and released, and the same command finishes the grid
    with epoch rows equal to an uninterrupted run's."""
    import signal

    cmd, environ, db = kan_grid_as_a_subprocess(env, epochs=12)
    proc = run_grid_until_epoch(cmd, environ, db, 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopping: the runs in progress finish their epoch" in err  # said at once, not after the epoch
    assert "run the same command to finish" in err
    statuses = [r["status"] for r in rows(db, "SELECT status FROM runs ORDER BY id")]
    assert "running" not in statuses and statuses.count("completed") < 2, statuses
    interrupted = rows(db, "SELECT id FROM runs WHERE status = 'queued' ORDER BY id")
    assert interrupted, statuses
    assert rows(db, "SELECT COUNT(*) AS n FROM checkpoints WHERE run_id = ?", (interrupted[0]["id"],))[0]["n"]

    done = subprocess.run(cmd + ["run", "grid", "tiny.toml"], env=environ, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert {r["status"] for r in rows(db, "SELECT status FROM runs")} == {"completed"}
    resumed = rows(db, "SELECT r.config_hash, e.epoch, e.test_acc, e.train_loss FROM epoch_metrics e "
                       "JOIN runs r ON r.id = e.run_id ORDER BY r.config_hash, e.epoch")

    # The same grid uninterrupted, in another database.
    environ["KANFARM_DATABASE_URL"] = f"sqlite:///{env / 'straight.db'}"
    environ["KANFARM_CHECKPOINT_DIR"] = str(env / "ckpt2")
    subprocess.run(cmd + ["db", "upgrade"], check=True, env=environ, capture_output=True)
    subprocess.run(cmd + ["run", "grid", "tiny.toml"], check=True, env=environ, capture_output=True, timeout=300)
    straight = rows(env / "straight.db", "SELECT r.config_hash, e.epoch, e.test_acc, e.train_loss FROM "
                                         "epoch_metrics e JOIN runs r ON r.id = e.run_id ORDER BY r.config_hash, e.epoch")
    assert resumed == straight and len(resumed) == 2 * 13


def test_a_second_ctrl_c_quits_at_once_and_says_the_runs_were_not_handed_back(env):
    """The second Ctrl-C used to end in "terminate called without an active exception" (SIGABRT,
    a training thread inside torch at interpreter shutdown) after claiming the runs were released."""
    import signal
    import time

    cmd, environ, db = kan_grid_as_a_subprocess(env, epochs=4)
    (env / "tiny.toml").write_text((env / "tiny.toml").read_text().replace("batch_size = 128", "batch_size = 4"))
    proc = run_grid_until_epoch(cmd, environ, db, 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)  # an epoch at batch 4 takes seconds: the first Ctrl-C is still waiting for it
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "quit without waiting" in err and "terminate called" not in err
    assert "checkpointed and released" not in err
    done = subprocess.run(cmd + ["run", "grid", "tiny.toml"], env=environ, capture_output=True, text=True,
                          timeout=300)  # takes over the run the dead process held
    assert done.returncode == 0, done.stderr
    assert {r["status"] for r in rows(db, "SELECT status FROM runs")} == {"completed"}


def test_failed_runs_run_again_only_with_retry_failed(env):
    assert invoke("db", "upgrade").exit_code == 0
    assert invoke("run", "grid", "tiny.toml").exit_code == 0
    con = sqlite3.connect(env / "k.db")
    with con:
        con.execute("UPDATE runs SET status = 'failed', error = 'simulated' WHERE id = 1")
    con.close()
    result = invoke("run", "grid", "tiny.toml")
    assert result.exit_code == 1 and "--retry-failed" in result.output
    assert rows(env / "k.db", "SELECT status FROM runs WHERE id = 1") == [{"status": "failed"}]
    result = invoke("run", "grid", "tiny.toml", "--retry-failed")
    assert result.exit_code == 0, result.output
    assert "1 failed runs of the grid are run again" in result.output
    assert {r["status"] for r in rows(env / "k.db", "SELECT status FROM runs")} == {"completed"}


def test_checkpoint_cadence_from_the_environment(env, monkeypatch):
    monkeypatch.setenv("KANFARM_CHECKPOINT_SECONDS", "0")  # no time limit: the epoch cadence alone
    monkeypatch.setenv("KANFARM_CHECKPOINT_EVERY", "3")
    monkeypatch.setenv("KANFARM_CHECKPOINT_KEEP", "3")
    (env / "tiny.toml").write_text(TINY.replace("epochs = 2", "epochs = 4").replace('"adam", "sgd"', '"adam"')
                                   .replace('models = ["mlp", "kan"]', 'models = ["mlp"]'))
    assert invoke("db", "upgrade").exit_code == 0
    assert invoke("run", "grid", "tiny.toml").exit_code == 0
    saved = rows(env / "k.db", "SELECT epoch FROM checkpoints ORDER BY epoch")
    assert [r["epoch"] for r in saved] == [0, 3, 4]  # the start, every 3rd epoch, the last
    assert sorted(p.name for p in (env / "ckpt").glob("*/epoch-*.pt")) == [
        "epoch-000000.pt", "epoch-000003.pt", "epoch-000004.pt"]
    monkeypatch.setenv("KANFARM_CHECKPOINT_KEEP", "1")  # rows follow the files kept
    (env / "tiny.toml").write_text(TINY.replace('learning_rates = [0.01]', 'learning_rates = [0.03]')
                                   .replace("epochs = 2", "epochs = 4").replace('models = ["mlp", "kan"]', 'models = ["mlp"]')
                                   .replace('"adam", "sgd"', '"adam"'))
    assert invoke("run", "grid", "tiny.toml").exit_code == 0
    assert [r["epoch"] for r in rows(env / "k.db", "SELECT epoch FROM checkpoints c JOIN runs r ON r.id = c.run_id "
                                                   "WHERE r.lr = 0.03")] == [4]
    monkeypatch.setenv("KANFARM_CHECKPOINT_EVERY", "0")
    (env / "tiny.toml").write_text(TINY.replace('learning_rates = [0.01]', 'learning_rates = [0.02]'))
    result = invoke("run", "grid", "tiny.toml")
    assert result.exit_code == 2 and "KANFARM_CHECKPOINT_EVERY" in result.output
    assert rows(env / "k.db", "SELECT status FROM runs WHERE lr = 0.02") == []  # checked before writing


def test_kill_9_leaves_the_grid_resumable_at_once(env):
    """kill -9 of a one-worker `run grid` leaves its runs `running` under a lease of 300 s: the next
    `run grid` on this host sees the holder is dead and takes them over at once. kill -9 of the
    parent of two worker processes: the orphans notice, hand their runs back and exit."""
    import signal
    import time

    cmd, environ, db = kan_grid_as_a_subprocess(env, epochs=50)

    def written() -> int:
        return rows(db, "SELECT COUNT(*) AS n FROM epoch_metrics")[0]["n"] if db.exists() else 0

    def kill_after_new_rows(n: int, *args: str) -> None:
        before = written()
        proc = subprocess.Popen(cmd + ["run", "grid", "tiny.toml", *args], env=environ,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and written() < before + n:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    kill_after_new_rows(3)
    assert "running" in [r["status"] for r in rows(db, "SELECT status FROM runs")]

    kill_after_new_rows(6, "--workers", "2")  # the rerun took the dead holder's run at once
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "running" in [r["status"] for r in rows(db, "SELECT status FROM runs")]:
        time.sleep(0.5)
    statuses = [r["status"] for r in rows(db, "SELECT status FROM runs ORDER BY id")]
    assert "running" not in statuses and "queued" in statuses, statuses  # handed back, not trained on

    done = subprocess.run(cmd + ["run", "grid", "tiny.toml"], env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert {r["status"] for r in rows(db, "SELECT status FROM runs")} == {"completed"}
    epochs = rows(db, "SELECT run_id, COUNT(*) AS n, MAX(epoch) AS last FROM epoch_metrics GROUP BY run_id")
    assert [(r["n"], r["last"]) for r in epochs] == [(51, 50)] * 2


def test_cancel_names_the_other_grids_it_touches_and_run_grid_takes_cancelled_runs_back(env):
    (env / "other.toml").write_text(TINY.replace('name = "tiny"', 'name = "other"')
                                    .replace('models = ["mlp", "kan"]', 'models = ["mlp"]')
                                    .replace('"adam", "sgd"', '"adam"'))  # one cell, shared with tiny
    assert invoke("db", "upgrade").exit_code == 0
    assert invoke("grid", "submit", "tiny.toml").exit_code == 0
    assert invoke("grid", "submit", "other.toml").exit_code == 0
    result = invoke("cancel", "--grid", "other")
    assert result.exit_code == 0, result.output
    assert "1 waiting runs cancelled" in result.output and "other grids too" in result.output
    assert "tiny" in result.output
    assert json.loads(invoke("cancel", "--grid", "other", "--json").stdout) == {
        "grid": "other", "cancelled": 0, "stopping": 0, "other_grids": []}  # cancelled already: tiny's run too
    assert [r["status"] for r in rows(env / "k.db", "SELECT status FROM runs ORDER BY id")].count("cancelled") == 1
    result = invoke("run", "grid", "tiny.toml")
    assert result.exit_code == 0, result.output
    assert "1 cancelled runs of the grid are run again" in result.output
    assert {r["status"] for r in rows(env / "k.db", "SELECT status FROM runs")} == {"completed"}


def test_a_grid_name_typed_with_a_combining_accent_finds_the_grid(env):
    """Names are stored NFC; ``--grid`` is read the same way, so "café" typed either way is one grid."""
    (env / "c.toml").write_text(TINY.replace('name = "tiny"', 'name = "cafe\u0301"'))
    assert invoke("db", "upgrade").exit_code == 0
    assert invoke("grid", "submit", "c.toml").exit_code == 0
    assert [r["name"] for r in rows(env / "k.db", "SELECT name FROM grids")] == ["caf\u00e9"]
    for typed in ("cafe\u0301", "caf\u00e9"):
        for args in (["status", "--grid", typed, "--json"], ["cancel", "--grid", typed, "--json"]):
            result = invoke(*args)
            assert result.exit_code == 0, (args, result.output)


def test_stored_text_reaches_the_terminal_inert(env):
    """A grid name holding terminal commands (an ESC sets the window title, colours the rest) is
    refused by the store too, not only by the spec parser; one already stored, say by an older
    kanfarm, is printed with its escapes spelled out, in tables and in error messages."""
    from kanfarm.config import ConfigError
    from kanfarm.store import Store

    evil = "evil\x1b]0;TITLE\x07\x1b[31mred\nline"
    assert invoke("db", "upgrade").exit_code == 0
    store = Store(f"sqlite:///{env / 'k.db'}")
    with pytest.raises(ConfigError, match="name"):
        store.submit_grid(evil, {}, [])
    with store.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO grids (name, spec, created_at) VALUES (?, '{}', '2026-01-01')", (evil,))
    store.dispose(close=True)
    for args in (["grid", "list"], ["status", "--grid", "nope"]):
        result = invoke(*args)
        assert "\x1b" not in result.output and "\x07" not in result.output, (args, result.output)
        assert "evil\\x1b]0;TITLE\\x07\\x1b[31mred" in result.output, (args, result.output)  # an error keeps newlines


def test_a_terminal_without_utf8_gets_escapes_not_a_traceback(env):
    """An ASCII or Latin-1 stdout crashed with UnicodeEncodeError on a non-ASCII grid name."""
    (env / "e.toml").write_text(TINY.replace('name = "tiny"', 'name = "party \U0001f389"'))
    assert invoke("db", "upgrade").exit_code == 0
    assert invoke("grid", "submit", "e.toml").exit_code == 0
    for args in (["grid", "list"], ["status", "--grid", "party \U0001f389"]):
        result = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, cwd=env,
                                env={**os.environ, "PYTHONIOENCODING": "ascii",
                                     "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert result.returncode == 0 and b"Traceback" not in result.stderr, (args, result.stderr)
        assert b"party \\U0001f389" in result.stdout, (args, result.stdout)


def test_user_text_that_looks_like_rich_markup_is_printed_as_it_is(env):
    """A grid named "study [/]" crashed Rich after the grid was stored, and every later `grid list`."""
    (env / "s.toml").write_text(TINY.replace('name = "tiny"', 'name = "study [/] [red]x"'))
    assert invoke("db", "upgrade").exit_code == 0
    for args in (["grid", "submit", "s.toml"], ["grid", "list"], ["grid", "show", "s.toml"],
                 ["status", "--grid", "study [/] [red]x"]):
        result = invoke(*args)
        assert result.exit_code == 0, (args, result.output)
        assert "study [/] [red]x" in result.output, (args, result.output)
    result = invoke("status", "--grid", "[/]")
    assert result.exit_code == 2 and "no grid named '[/]'" in result.output
    (env / "b.toml").write_text(TINY.replace('datasets = ["digits"]', 'datasets = ["[red]x"]'))
    result = invoke("grid", "show", "b.toml")
    assert result.exit_code == 2 and "'[red]x' is not one of" in result.output


@pytest.mark.parametrize("variable, value", [("KANFARM_CHECKPOINT_EVERY", "abc"), ("KANFARM_CHECKPOINT_EVERY", "\u00b2"),
                                             ("KANFARM_CHECKPOINT_KEEP", "0"), ("KANFARM_CHECKPOINT_SECONDS", "-1"),
                                             ("KANFARM_CHECKPOINT_DIR", "afile"), ("KANFARM_CHECKPOINT_DIR", "afile/sub"),
                                             ("KANFARM_CHECKPOINT_DIR", "/proc/kanfarm-checkpoints"),  # unwritable
                                             ("KANFARM_DATA_DIR", "afile"), ("KANFARM_TRITON", "maybe"),
                                             ("KANFARM_OFFLINE", "maybe"), ("KANFARM_KEEP_FREED_MEMORY", "maybe"),
                                             ("KANFARM_CPU_COMPILE", "maybe"), ("KANFARM_STALL_SECONDS", "-1")])
def test_run_grid_checks_the_environment_before_writing_anything(env, monkeypatch, variable, value):
    (env / "afile").write_text("not a folder")
    assert invoke("db", "upgrade").exit_code == 0
    monkeypatch.setenv(variable, value)
    for args in (["run", "grid", "tiny.toml", "--workers", "2"], ["demo"]):
        result = invoke(*args)
        assert result.exit_code == 2 and variable in result.output, (args, result.output)
    assert rows(env / "k.db", "SELECT COUNT(*) AS n FROM grids")[0]["n"] == 0


def test_a_refused_run_grid_leaves_no_checkpoint_folder(env, monkeypatch):
    """The folder is checked for writing before anything else, and the check leaves nothing."""
    monkeypatch.delenv("KANFARM_CHECKPOINT_DIR")
    assert invoke("db", "upgrade").exit_code == 0
    for args in (["run", "grid", "nosuchpreset"], ["run", "grid", "tiny.toml", "--pack-size", "0"]):
        assert invoke(*args).exit_code == 2
    assert not (env / "kanfarm-checkpoints").exists()


def test_worker_process_errors_reach_the_parent_as_one_line(env, monkeypatch):
    """A setting gone bad in the workers (or the database gone) was a traceback from each
    process and "exited with code 1"; now it is the one error, raised in the parent."""
    from kanfarm.config import ConfigError
    from kanfarm.grids import load_spec
    from kanfarm.local import WorkerCrashed, run_grid_locally
    from kanfarm.store import Store
    from kanfarm.submission import submit

    store = Store(f"sqlite:///{env / 'k.db'}")
    store.upgrade()
    submit(store, load_spec(str(env / "tiny.toml")))
    monkeypatch.setenv("KANFARM_CHECKPOINT_EVERY", "abc")  # each spawned worker fails on it at once
    with pytest.raises(ConfigError, match="KANFARM_CHECKPOINT_EVERY: 'abc' must be a positive integer"):
        run_grid_locally(store, "tiny", workers=2)  # the workers' error, once, as one line (no traceback each)
    store.dispose()
    from kanfarm.local import _how_it_ended, _raise_reported

    class Reports(list):
        def empty(self):
            return not self

        def get(self):
            return self.pop(0)

    with pytest.raises(WorkerCrashed, match=r"database unavailable in a worker process \(OperationalError: gone\)"):
        _raise_reported(Reports([("database", "", "OperationalError: gone")]))
    with pytest.raises(ConfigError, match="^KANFARM_DATA_DIR: full$"):  # a setting first: it is the cause
        _raise_reported(Reports([("database", "", "OperationalError: gone"), ("config", "KANFARM_DATA_DIR", "full")]))
    _raise_reported(Reports())  # nothing reported: nothing raised

    assert _how_it_ended("w", -9) == "w killed by SIGKILL (out of memory? the kernel's OOM killer sends it)"
    assert _how_it_ended("w", -15) == "w killed by SIGTERM"


def test_the_progress_poll_rides_out_a_database_outage(env, monkeypatch):
    """`run grid` ended (exit 1, its run left `running`) when the progress poll's query met a
    database blip that the worker itself would have waited out."""
    from sqlalchemy.exc import OperationalError

    from kanfarm import local
    from kanfarm.grids import load_spec
    from kanfarm.store import Store
    from kanfarm.submission import submit

    store = Store(f"sqlite:///{env / 'k.db'}")
    store.upgrade()
    submit(store, load_spec(str(env / "tiny.toml")))
    real, failures = local.snapshot, []

    def flaky(store_, grid):
        if len(failures) < 3:
            failures.append(1)
            raise OperationalError("SELECT ...", {}, Exception("server closed the connection"))
        return real(store_, grid)

    monkeypatch.setattr(local, "snapshot", flaky)
    final = local.run_grid_locally(store, "tiny", on_poll=lambda snap: None, poll_s=0.05)
    assert len(failures) == 3 and final.counts["completed"] == 4
    store.dispose()


def test_local_workers_are_no_more_than_the_runs_to_claim(env, monkeypatch):
    """Every worker process imports torch: --workers beyond the grid's runs (or packs) starts none of
    the rest, which would also leave CPU threads idle."""
    import multiprocessing as mp

    from kanfarm import local
    from kanfarm.grids import load_spec
    from kanfarm.store import Store
    from kanfarm.submission import submit

    store = Store(f"sqlite:///{env / 'k.db'}")
    store.upgrade()
    submit(store, load_spec(str(env / "tiny.toml")))  # 4 runs
    made = []

    class Ctx:  # processes that are made, not started
        Event = staticmethod(mp.get_context("spawn").Event)
        SimpleQueue = staticmethod(mp.get_context("spawn").SimpleQueue)

        @staticmethod
        def Process(*args, **kwargs):
            made.append(kwargs["name"])
            return type("P", (), {"start": lambda self: None, "is_alive": lambda self: False,
                                  "join": lambda self, timeout=None: None})()

    monkeypatch.setattr(local.mp, "get_context", lambda method: Ctx)
    local.run_grid_locally(store, "tiny", workers=50)  # uncapped, 50 would be made
    assert len(made) == 4
    for pack_size in (8, "auto"):  # packed: one worker per pack (the MLPs' and the KANs')
        made.clear()
        local.run_grid_locally(store, "tiny", workers=50, pack_size=pack_size)
        assert len(made) == 2
    store.dispose()


def test_one_local_worker_uses_the_cores_it_may(env, monkeypatch):
    """Its training thread runs in this process: torch's own default is every core of the host,
    also in a container whose CPU quota is smaller."""
    import torch

    from kanfarm import local
    from kanfarm.grids import load_spec
    from kanfarm.store import Store
    from kanfarm.submission import submit

    store = Store(f"sqlite:///{env / 'k.db'}")
    store.upgrade()
    submit(store, load_spec(str(env / "tiny.toml")))
    seen, before = [], torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(local, "usable_cpus", lambda: 1)
    monkeypatch.setattr(local, "work_loop", lambda *args, **kwargs: seen.append(torch.get_num_threads()) or [])
    try:
        local.run_grid_locally(store, "tiny", workers=1)
    finally:
        torch.set_num_threads(before)
        store.dispose()
    assert seen == [1]


@pytest.mark.parametrize("omp", ["", "1"])
def test_a_local_worker_process_takes_its_share_of_threads_unless_omp_num_threads_says(env, monkeypatch, omp):
    """With several workers each process took usable_cpus() // N threads even when the user had
    set OMP_NUM_THREADS (one worker and Celery workers honour it). Called in this process: the
    grid has nothing to claim."""
    import signal
    import threading

    import torch

    from kanfarm import local
    from kanfarm.store import Store

    store = Store(f"sqlite:///{env / 'k.db'}")
    store.upgrade()
    before, handler, shutdown = torch.get_num_threads(), signal.getsignal(signal.SIGINT), threading.Event()
    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    try:
        local._child(store.url_string, "tiny", "cpu", 60.0, shutdown, before + 2, None)
        after = torch.get_num_threads()
    finally:
        shutdown.set()
        signal.signal(signal.SIGINT, handler)
        torch.set_num_threads(before)
        store.dispose()
    assert after == (before if omp else before + 2)


def test_databases_that_cannot_serve_are_one_line_and_exit_2(env, monkeypatch):
    (env / "text.db").write_text("hello, not a database")
    cases = {f"sqlite:///{env / 'text.db'}": "not a usable kanfarm database",
             "postgresql+nodriver://127.0.0.1/db": "no database driver",
             "sqlite://": "in-memory", "sqlite:///:memory:": "in-memory"}
    for url, words in cases.items():
        monkeypatch.setenv("KANFARM_DATABASE_URL", url)
        for args in (["db", "upgrade"], ["status"]):
            result = invoke(*args)
            assert result.exit_code == 2 and words in result.output, (url, args, result.output)
            assert "Traceback" not in result.output
    assert (env / "text.db").read_text() == "hello, not a database"


def test_a_database_at_a_revision_this_kanfarm_does_not_know_is_left_alone(env):
    assert invoke("db", "upgrade").exit_code == 0
    con = sqlite3.connect(env / "k.db")
    with con:
        con.execute("UPDATE alembic_version SET version_num = '0099'")
    con.close()
    for args in (["db", "upgrade"], ["status"]):
        result = invoke(*args)
        assert result.exit_code == 2 and "does not know" in result.output, (args, result.output)
    assert rows(env / "k.db", "SELECT version_num FROM alembic_version") == [{"version_num": "0099"}]


@pytest.mark.parametrize("variable, value, args", [
    ("KANFARM_MAX_ATTEMPTS", "abc", ["requeue", "--failed"]), ("KANFARM_MAX_ATTEMPTS", "1.5", ["requeue", "--failed"]),
    ("KANFARM_VISIBILITY_TIMEOUT", "abc", ["enqueue", "grid", "tiny.toml", "--dry-run"]),
    ("KANFARM_VISIBILITY_TIMEOUT", "inf", ["enqueue", "grid", "tiny.toml"]),
])
def test_bad_worker_settings_are_one_line_naming_the_variable(env, monkeypatch, variable, value, args):
    import sys

    assert invoke("db", "upgrade").exit_code == 0
    monkeypatch.setenv(variable, value)
    monkeypatch.delitem(sys.modules, "workers.celery_app", raising=False)  # read at import
    result = invoke(*args)
    assert result.exit_code == 2 and f"invalid {variable}" in result.output, result.output
    assert rows(env / "k.db", "SELECT COUNT(*) AS n FROM runs")[0]["n"] == 0


def test_sweep_every_rides_out_errors_and_reports_only_what_it_found(env, monkeypatch):
    """The compose sweeper service: a broker or database error is one line, and the next sweep comes."""
    import cli.distributed as distributed

    class Stop(Exception):
        pass

    assert invoke("db", "upgrade").exit_code == 0
    found = {"grid": None, "stale": 1, "local": 0, "published": 1, "published_by_queue": {"gpu": 1}, "requeued": 1}
    nothing = {**found, "stale": 0, "published": 0, "published_by_queue": {}, "requeued": 0}
    outcomes = iter([ConnectionError("broker down"), nothing, found])
    slept = []

    def sweep_once(store, grid, size, grace):
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def sleep(seconds):
        slept.append(seconds)
        if len(slept) == 3:
            raise Stop()
    monkeypatch.setattr(distributed, "_sweep_once", sweep_once)
    monkeypatch.setattr(distributed.time, "sleep", sleep)
    result = invoke("sweep", "--every", "60", "--json")
    assert isinstance(result.exception, Stop) and slept == [60.0] * 3
    assert "sweep failed (ConnectionError); next sweep in 60 s" in result.output
    assert [json.loads(line)["stale"] for line in result.stdout.splitlines() if line.startswith("{")] == [1]


def test_requeue_max_attempts_without_failed_is_refused(env):
    """It bounds the failed runs retried; alone it used to be ignored without a word."""
    assert invoke("db", "upgrade").exit_code == 0
    result = invoke("requeue", "--max-attempts", "5")
    assert result.exit_code == 2 and "--max-attempts" in result.output and "--failed" in result.output


def test_out_naming_a_folder_is_one_line_and_an_empty_plot_makes_no_folder(env):
    assert invoke("db", "upgrade").exit_code == 0
    for args in (["export", "--format", "csv", "--out", ""], ["export", "--format", "json", "--out", "."],
                 ["report", "html", "--out", ".."]):
        result = invoke(*args)
        assert result.exit_code == 2 and "Is a directory" in result.output, (args, result.output)
    result = invoke("report", "plot", "--out", "figs")
    assert result.exit_code == 0 and "nothing to plot" in result.output
    assert not (env / "figs").exists()
    assert not list(env.glob(".*.tmp"))


def test_db_upgrade_leaves_another_applications_database_alone(env, monkeypatch):
    con = sqlite3.connect(env / "other.db")
    with con:
        con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    con.close()
    monkeypatch.setenv("KANFARM_DATABASE_URL", f"sqlite:///{env / 'other.db'}")
    for args in (("db", "upgrade"), ("status",), ("report", "summary"), ("export", "--format", "csv")):
        result = invoke(*args)
        assert result.exit_code == 2 and "with tables notes" in result.output, (args, result.output)
    current = invoke("db", "current")  # it said "none (empty)"
    assert current.exit_code == 0 and "with tables notes" in current.output and "empty" not in current.output
    assert [r["name"] for r in rows(env / "other.db", "SELECT name FROM sqlite_master WHERE type = 'table'")] == ["notes"]
    con = sqlite3.connect(env / "other.db")  # nor switched to WAL, a lasting change of the file
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    con.close()


@pytest.mark.parametrize("revision", ["deadbeef", "0003"])  # 0003: an id kanfarm has too (alembic --rev-id)
def test_another_alembic_applications_database_is_not_switched_to_wal(env, monkeypatch, revision):
    con = sqlite3.connect(env / "other.db")
    with con:
        con.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        con.execute("INSERT INTO alembic_version VALUES (?)", (revision,))
        con.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    con.close()
    monkeypatch.setenv("KANFARM_DATABASE_URL", f"sqlite:///{env / 'other.db'}")
    current = invoke("db", "current")
    assert current.exit_code == 0 and f"revision {revision}" in current.output
    if revision == "0003":
        assert "another application's" in current.output
    for args in (("db", "upgrade"), ("status",)):
        result = invoke(*args)
        assert result.exit_code == 2 and f"revision {revision}" in result.output, (args, result.output)
    con = sqlite3.connect(env / "other.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert con.execute("SELECT version_num FROM alembic_version").fetchall() == [(revision,)]
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
                                      "ORDER BY name")] == ["alembic_version", "users"]  # no view made
    con.close()


def test_a_new_database_is_switched_to_wal(env, monkeypatch):
    """WAL (readers never block the writer) is set once kanfarm has migrated the file."""
    monkeypatch.setenv("KANFARM_DATABASE_URL", f"sqlite:///{env / 'new.db'}")
    assert invoke("db", "upgrade").exit_code == 0
    con = sqlite3.connect(env / "new.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


@pytest.mark.parametrize("variable, value", [("KANFARM_LEASE_SECONDS", "abc"), ("KANFARM_MAX_ATTEMPTS", "0"),
                                             ("KANFARM_CHECKPOINT_SECONDS", "x"), ("KANFARM_PACK_CHECKPOINT_SECONDS", "0"),
                                             ("KANFARM_TRITON", "maybe"),
                                             ("KANFARM_VISIBILITY_TIMEOUT", "-1")])
def test_worker_refuses_to_start_on_a_bad_setting(env, monkeypatch, variable, value):
    import sys

    assert invoke("db", "upgrade").exit_code == 0
    monkeypatch.setenv(variable, value)
    monkeypatch.delitem(sys.modules, "workers.celery_app", raising=False)  # read at import
    result = invoke("worker", "--concurrency", "1")
    assert result.exit_code == 2 and variable in result.output, result.output


@pytest.mark.parametrize("url,message", [("redis://:topsecret@127.0.0.1:abc/0", "malformed host or port"),
                                         ("redis://:topsecret@127.0.0.1:70000/0", "malformed host or port"),
                                         ("redis://:topsecret@[::1/0", "malformed host or port"),
                                         ("redis://:topsecret@127.0.0.1:6379/abc", "what follows the host must be a database number"),
                                         ("redis://127.0.0.1:6379/0;redis://:topsecret@h:x/0", "malformed host or port"),
                                         # options kombu does not take: a traceback at publish, the runs written
                                         ("redis://127.0.0.1:6379/0?global_keyprefix=topsecret", "an option of the URL"),
                                         ("redis://127.0.0.1:6379/0?password=topsecret", "an option of the URL"),
                                         ("redis://127.0.0.1:6379/0?ssl_cert_reqs=topsecret", "an option of the URL")])
def test_a_malformed_broker_url_is_refused_before_anything_is_written(env, monkeypatch, url, message):
    assert invoke("db", "upgrade").exit_code == 0
    monkeypatch.setenv("KANFARM_BROKER_URL", url)
    for args in (["enqueue", "grid", "tiny.toml"], ["enqueue", "grid", "tiny.toml", "--dry-run"], ["requeue"],
                 ["worker"]):
        result = invoke(*args)
        assert result.exit_code == 2 and f"KANFARM_BROKER_URL: {message}" in result.output, (args, result.output)
        assert "topsecret" not in result.output
    assert rows(env / "k.db", "SELECT COUNT(*) AS n FROM runs")[0]["n"] == 0


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0?heartbeat=10",  # an option of kombu's, not redis-py's
                                 "redis://127.0.0.1:6399/0;redis://127.0.0.1:6398/1"])  # a failover list
def test_broker_urls_kombu_takes_are_not_refused(env, monkeypatch, url):
    assert invoke("db", "upgrade").exit_code == 0
    monkeypatch.setenv("KANFARM_BROKER_URL", url)
    result = invoke("enqueue", "grid", "tiny.toml", "--dry-run", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["added"] == 4, result.output


def test_worker_refuses_an_unknown_log_level_before_starting_celery(env, monkeypatch):
    from workers import launcher

    monkeypatch.setattr(launcher, "launch", lambda *a, **k: pytest.fail("a worker was started"))
    result = invoke("worker", "--loglevel", "BOGUS")
    assert result.exit_code == 2 and "--loglevel: 'BOGUS' is not one of" in result.output, result.output


def test_a_broker_url_of_another_scheme_is_one_line_without_the_password(env, monkeypatch):
    assert invoke("db", "upgrade").exit_code == 0
    monkeypatch.setenv("KANFARM_BROKER_URL", "bogus://user:topsecret@somewhere")
    for args in (["enqueue", "grid", "tiny.toml"], ["requeue"], ["worker"]):
        result = invoke(*args)
        assert result.exit_code == 2 and "unsupported broker scheme 'bogus'" in result.output, (args, result.output)
        assert "topsecret" not in result.output
    monkeypatch.setenv("KANFARM_BROKER_URL", "redis:/:topsecret@127.0.0.1:6399/0")  # a typo: no "://"
    result = invoke("requeue")
    assert result.exit_code == 2 and "not a URL" in result.output and "topsecret" not in result.output, result.output
    assert rows(env / "k.db", "SELECT COUNT(*) AS n FROM runs")[0]["n"] == 0
