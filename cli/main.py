"""The ``kanfarm`` command: a thin Typer adapter over the library.

Bad input exits with code 2 and a message naming the field; nothing is written before the whole
input has been validated.
"""
from __future__ import annotations

import math
import os
import re
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer

from cli.common import (CsvOpt, GridOpt, JsonOpt, SpecArg, command_group, grid_exists, handles_errors, open_store,
                        parse_pack_size, read_spec, submit_spec)
from cli.distributed import register as register_distributed
from cli.output import (console, emit_json, emit_rows, err_console, fail, json_array_chunks, show_warning, working,
                        use_escapes_where_unencodable, write_csv)
from cli.plots import register as register_plots

app = command_group("Batch benchmarking of KANs against MLPs: grids of runs, workers, per-epoch metrics, reports.",
                    add_completion=False)


@app.callback()
def _start(ctx: typer.Context) -> None:
    use_escapes_where_unencodable()
    shown_before = warnings.showwarning  # put back when the command ends: it may run inside a program
    warnings.showwarning = show_warning
    ctx.call_on_close(lambda: setattr(warnings, "showwarning", shown_before))


db_app = command_group("Database schema (Alembic migrations).")
grid_app = command_group("Inspect and submit grid specs.")
run_app = command_group("Run grids on this machine.")
report_app = command_group("Reports over a grid's runs (or all runs).")
app.add_typer(db_app, name="db")
app.add_typer(grid_app, name="grid")
app.add_typer(run_app, name="run")
app.add_typer(report_app, name="report")



# --- db ---------------------------------------------------------------------------------------

@db_app.command("upgrade")
@handles_errors
def db_upgrade() -> None:
    """Create or migrate the schema to the newest revision."""
    from kanfarm.store.engine import masked

    store = open_store(check=False)
    store.upgrade()
    console.print(f"database {masked(store.url)} at revision {store.schema_revision()}")


@db_app.command("current")
@handles_errors
def db_current() -> None:
    """Print the schema revision of the database (without creating a SQLite file that is not there)."""
    from kanfarm.store.engine import masked
    from kanfarm.store.url import checked_database_url, missing_sqlite_file

    url = checked_database_url()
    if missing_sqlite_file(url):
        console.print(f"database {masked(url)} at revision none (no file yet)")
        return
    store = open_store(check=False)
    revision = store.schema_revision()
    if revision is None:
        foreign = store.foreign_tables()
        revision = (f"none, with tables {', '.join(foreign[:5])} (another application's: kanfarm will not "
                    "migrate it)") if foreign else "none (empty)"
    elif not store.holds_kanfarm_tables():
        revision += " but without kanfarm's tables (another application's: kanfarm will not migrate it)"
    console.print(f"database {masked(store.url)} at revision {revision}")


# --- grids ------------------------------------------------------------------------------------

@grid_app.command("show")
@handles_errors
def grid_show(spec: str = SpecArg,
              sample: int = typer.Option(5, "--sample", metavar="N", min=0, help="How many cells to show."), as_json: bool = JsonOpt) -> None:
    """Print a spec's cell count, axes and a sample of cells."""
    from kanfarm.grids import load_spec
    from kanfarm.submission import sized_cells

    with working(f"reading and checking every cell of {spec}"):  # seconds for a large grid
        grid = load_spec(spec)
        info = grid.describe(sample=sample)
        cells = sized_cells(grid)
    info["n_params"] = {"min": min(c[1] for c in cells), "max": max(c[1] for c in cells)} if cells else None
    if as_json:
        emit_json(info)
        return
    console.print(f"{grid.name}: {info['cells']} cells")
    for key, value in info.items():
        if key not in ("cells", "sample", "name"):
            console.print(f"  {key}: {value}")
    emit_rows(info["sample"], title=f"{len(info['sample'])} cells, spread over the grid", empty="--sample 0")


@grid_app.command("list")
@handles_errors
def grid_list(as_json: bool = JsonOpt) -> None:
    """Grids in the database, with their run counts per status."""
    store = open_store()
    rows = [{"name": g.name, "created_at": g.created_at, **store.status_counts(g.name)} for g in store.grids()]
    emit_rows(rows, title="grids", as_json=as_json, empty="none submitted yet")


def _submit(store, spec: str | Any):
    """Store a spec (path, preset name or a GridSpec already read) and say what was added."""
    grid = read_spec(spec) if isinstance(spec, str) else spec
    result = submit_spec(store, grid)
    err_console.print(f"grid {grid.name}: {result.added} runs added, {result.existing} already stored")
    return grid, result


@grid_app.command("submit")
@handles_errors
def grid_submit(spec: str = SpecArg) -> None:
    """Write a grid's runs into the database (idempotent: existing cells are kept)."""
    _submit(open_store(), spec)


# --- running locally --------------------------------------------------------------------------

def _run_locally(store, grid_name: str, workers: int, device: str, pack_size: int | str = 1) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kanfarm.local import RunsAbandoned, WorkerCrashed, run_grid_locally

    with Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[active]}", markup=False), console=err_console,
                  transient=False) as progress:
        task = progress.add_task(grid_name, total=None, active="")

        def on_poll(snap) -> None:
            active = "  ".join(f"#{a['run_id']} {a['model']} ep {a['epoch'] or 0}/{a['max_epochs']}"
                               for a in snap.active[:4])
            progress.update(task, total=snap.total, completed=snap.done, active=active)

        def on_interrupt() -> None:
            progress.stop()
            err_console.print("stopping: the runs in progress finish their epoch, checkpoint and are handed back "
                              "(Ctrl-C again to quit without waiting)")

        try:
            return run_grid_locally(store, grid_name, workers=workers, device=device, on_poll=on_poll,
                                    pack_size=pack_size, on_interrupt=on_interrupt)
        except RunsAbandoned:
            err_console.print("quit without waiting: the runs in progress were not handed back; the same command "
                              "takes them over and finishes the grid")
            sys.stdout.flush()
            sys.stderr.flush()
            # now, without the interpreter's shutdown: a training thread still inside torch would
            # abort the process ("terminate called without an active exception")
            os._exit(130)
        except KeyboardInterrupt:
            err_console.print("interrupted: runs were checkpointed and released; run the same command to finish")
            raise typer.Exit(130)
        except WorkerCrashed as exc:
            fail(str(exc), code=1)


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        fail(f"--device: {device!r} is not one of cpu, cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("--device: cuda requested but torch sees no CUDA device")


@run_app.command("grid")
@handles_errors
def run_grid(spec: str = SpecArg,
             workers: int = typer.Option(1, "--workers", metavar="N", min=1, help="Local worker processes."),
             device: str = typer.Option("cpu", "--device", metavar="cpu|cuda", help="cpu or cuda."),
             pack_size: str = typer.Option("1", "--pack-size", metavar="N|auto",
                                           help="Train up to N compatible runs at once as one stacked model, or auto (fit free GPU memory; on a CPU up to 8)."),
             retry_failed: bool = typer.Option(False, "--retry-failed",
                                               help="Run the grid's failed runs again too (from their last checkpoint).")) -> None:
    """Write a grid's runs, then execute them with local workers (resumable: run again to finish)."""
    from kanfarm.run_environment import check_run_environment

    _check_device(device)
    size = parse_pack_size(pack_size)
    check_run_environment()  # every check before anything is written
    store = open_store()
    grid = read_spec(spec)
    _prepare_data(grid, store, ("cancelled", "failed") if retry_failed else ("cancelled",))
    _submit(store, grid)
    resumed = store.mark_queued(store.run_ids(grid.name, statuses=["cancelled"]))
    if resumed:
        err_console.print(f"{resumed} cancelled runs of the grid are run again")
    if retry_failed:
        retried = store.mark_queued(store.run_ids(grid.name, statuses=["failed"]))
        err_console.print(f"{retried} failed runs of the grid are run again")
    final = _run_locally(store, grid.name, workers, device, size)
    err_console.print(f"done: {final.counts}")
    if final.counts.get("running"):
        err_console.print(f"note: {final.counts['running']} runs of the grid are still held by other workers "
                          "(another `run grid`, a worker, or a process of another host that died: its lease runs "
                          "out within 300 s, KANFARM_LEASE_SECONDS for a worker); run this command again to "
                          "finish them")
    if final.counts.get("failed"):
        fail(f"{final.counts['failed']} runs failed; their errors are in the runs table "
             "(SELECT id, error FROM runs WHERE status = 'failed'); once fixed, add --retry-failed to run "
             "them again", code=1)


def _prepare_data(grid, store=None, statuses: tuple[str, ...] = ()) -> None:
    """Load (and download, once) every dataset of the grid before a worker claims a run: a dataset
    that cannot be had is one message here, not a failed run per cell. With ``store``: also those
    of the runs stored under the grid's name that will be claimed (waiting ones, and those of
    ``statuses``): cells of an earlier version of the spec, which `run grid` trains too."""
    from kanfarm.data import load_dataset

    configs = list(grid.expand())
    if store is not None:
        configs += [config for _, config in store.claimable_runs(grid.name)]
        if statuses:
            configs += [store.run(run_id).config for run_id in store.run_ids(grid.name, statuses=statuses)]
    wanted = {(c.dataset, tuple(sorted(c.dataset_options.items()))) for c in configs}
    with download_progress():
        for name, options in sorted(wanted):
            rows = load_dataset(name, **dict(options)).x_train.shape[0]
            err_console.print(f"dataset {name}: ready ({rows} training rows)")


@contextmanager
def download_progress():
    """A progress bar (on stderr) per file the datasets download meanwhile."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from kanfarm.data import download

    with Progress(TextColumn("downloading {task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=err_console, transient=True) as bars:
        tasks: dict[str, Any] = {}

        def show(filename: str, done: int, total: int | None) -> None:
            if filename not in tasks:
                tasks[filename] = bars.add_task(filename, total=total)
            bars.update(tasks[filename], completed=done)

        download.on_progress = show
        try:
            yield
        finally:
            download.on_progress = None


@app.command()
@handles_errors
def demo(workers: int = typer.Option(2, "--workers", metavar="N", min=1, help="Local worker processes.")) -> None:
    """A small KAN vs MLP vs MLP-Wide grid on scikit-learn's digits, then its summary."""
    from kanfarm.run_environment import check_run_environment
    from kanfarm.store.engine import masked

    check_run_environment()
    store = open_store(check=False)
    if store.schema_revision() is None:
        store.upgrade()  # a new database: the demo creates it (one command on a fresh machine)
    else:
        store.check_schema()  # an existing one is migrated only by `kanfarm db upgrade`, as for every command
    grid, _ = _submit(store, "demo")
    store.mark_queued(store.run_ids(grid.name, statuses=["cancelled"]))  # as run grid does
    started = time.perf_counter()
    _run_locally(store, grid.name, workers, "cpu")
    from kanfarm.reports import sensitivity_table, summary_table

    emit_rows(summary_table(store, grid.name), title="demo: summary",
              columns=("run_id", "model", "lr", "n_params", "best_test_acc", "best_epoch", "gap_at_best",
                       "efficiency", "status"))
    emit_rows(sensitivity_table(store, grid.name), title="demo: sensitivity over schemes",
              columns=("model", "depth", "runs", "mean", "min", "max", "divergence_rate"))
    console.print(f"finished in {time.perf_counter() - started:.1f} s; database: {masked(store.url)}")


# --- status and reports -----------------------------------------------------------------------

@app.command()
@handles_errors
def status(grid: Optional[str] = GridOpt, as_json: bool = JsonOpt) -> None:
    """Runs per status, progress and an estimate of the time left."""
    from kanfarm.status import grid_status

    store = open_store()
    grid_exists(store, grid)
    info = grid_status(store, grid)
    if as_json:
        emit_json(info)
        return
    percent = math.floor(100 * info["progress"])  # 100% only when every run has ended
    console.print(f"{grid or 'all grids'}: {info['done']}/{info['total']} runs ended ({percent}%: completed, "
                  "diverged, failed or cancelled)")
    for name, count in info["counts"].items():
        console.print(f"  {name:<10} {count}")
    if info["stale"]:
        console.print(f"  {info['stale']} of the running runs have an expired lease (a worker died or hung): "
                      "`kanfarm sweep` publishes them again once they are --grace (300) s stale, "
                      "`kanfarm run grid` takes them over")
    eta = info["eta_seconds"]
    if info["done"] == info["total"]:
        console.print("  time left: none, every run has ended")
    else:
        console.print(f"  time left: {'unknown' if eta is None else f'about {eta:.0f} s'}"
                      f" (one worker, from {info['epochs_timed']} timed epochs)")


def _report(kind: str, grid: str | None, as_json: bool, as_csv: bool, **kwargs: Any) -> None:
    from kanfarm.reports import REPORTS
    from kanfarm.reports.tables import REPORT_COLUMNS

    store = open_store()
    grid_exists(store, grid)
    rows = REPORTS[kind](store, grid, **kwargs)
    emit_rows(rows, title=f"{kind} ({grid or 'all grids'})", as_json=as_json, as_csv=as_csv,
              columns=REPORT_COLUMNS[kind])


@report_app.command("summary")
@handles_errors
def report_summary(grid: Optional[str] = GridOpt, as_json: bool = JsonOpt, as_csv: bool = CsvOpt) -> None:
    """One row per run: best test accuracy, its epoch, the gap there, efficiency."""
    _report("summary", grid, as_json, as_csv)


@report_app.command("efficiency")
@handles_errors
def report_efficiency(grid: Optional[str] = GridOpt, as_json: bool = JsonOpt, as_csv: bool = CsvOpt,
                      intrinsic_dim: list[str] = typer.Option(
                          [], "--intrinsic-dim", metavar="DATASET=N", help="DATASET=N, overrides the stored intrinsic dimension.")) -> None:
    """A / (t + 1) / ln(1 + N - ID) per finished run, best first (FACTS.md)."""
    from kanfarm.data import DATASETS

    overrides = {}
    for item in intrinsic_dim:
        name, _, value = item.partition("=")
        if not re.fullmatch(r"[0-9]{1,18}", value):  # 18 digits: any sensible N, and int() never refuses it
            fail(f"--intrinsic-dim: {item[:60]!r} is not DATASET=N with N a non-negative integer")
        if name not in DATASETS:
            fail(f"--intrinsic-dim: unknown dataset {name!r} (known: {', '.join(DATASETS)})")
        if name in overrides:
            fail(f"--intrinsic-dim: {name} given twice")
        overrides[name] = int(value)
    _report("efficiency", grid, as_json, as_csv, intrinsic_dim=overrides)


@report_app.command("gap")
@handles_errors
def report_gap(grid: Optional[str] = GridOpt, as_json: bool = JsonOpt, as_csv: bool = CsvOpt) -> None:
    """Generalisation gap at the best epoch, mean and max, and the onset of overfitting."""
    _report("gap", grid, as_json, as_csv)


@report_app.command("sensitivity")
@handles_errors
def report_sensitivity(grid: Optional[str] = GridOpt, as_json: bool = JsonOpt, as_csv: bool = CsvOpt) -> None:
    """Spread of best test accuracy over training schemes, and divergence rate, per setting (model, widths, trainer, ...)."""
    _report("sensitivity", grid, as_json, as_csv)


@app.command()
@handles_errors
def export(grid: Optional[str] = GridOpt,
           fmt: str = typer.Option(..., "--format", metavar="csv|json", help="csv or json."),
           out: Optional[Path] = typer.Option(None, "--out", metavar="FILE", help="File to write (default: stdout).")) -> None:
    """Runs and their epoch metrics in long format (one row per run and epoch)."""
    if fmt not in ("csv", "json"):
        fail(f"--format: {fmt!r} is not one of csv, json")
    import io

    from kanfarm.atomic import atomic_writer
    from kanfarm.export import COLUMNS, long_rows

    store = open_store()
    grid_exists(store, grid)
    written = 0

    def rows():
        nonlocal written
        for row in long_rows(store, grid):
            written += 1
            yield row

    def write(text_out) -> None:  # row by row: an export of millions of epoch rows is never one string
        if fmt == "csv":
            write_csv(text_out, rows(), COLUMNS)
        else:
            text_out.writelines(json_array_chunks(rows()))
            text_out.write("\n")

    if out is None:  # a full disk or a closed pipe behind it: handles_errors says so
        write(sys.stdout)
        return
    try:
        with atomic_writer(out) as raw:
            text_out = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            write(text_out)
            text_out.flush()
            text_out.detach()  # the file is atomic_writer's to close
    except OSError as exc:
        fail(f"--out: cannot write {out}: {exc.strerror or exc}")
    err_console.print(f"wrote {written} rows to {out}")


register_distributed(app)
register_plots(report_app)


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
