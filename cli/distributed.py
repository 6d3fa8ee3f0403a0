"""Distributed commands: ``worker``, ``enqueue grid``, ``requeue``, ``sweep``, ``cancel``.

What they decide (which runs, which states, which queue) is :mod:`kanfarm.dispatch`'s; the broker's
checks and publishing are the workers' (:mod:`workers.broker`, :mod:`workers.tasks`). Here are the
options, the messages and the exit codes. Wired into the main app by ``register(app)`` in
``cli/main.py``.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Optional

import typer

from cli.common import (GridOpt, JsonOpt, SpecArg, command_group, grid_exists, grid_name, handles_errors, open_store,
                        parse_pack_size, read_spec, submit_spec)
from cli.output import console, emit_json, err_console, fail, working

enqueue_app = command_group("Put runs on the Redis queue for Celery workers.")

QueueOpt = typer.Option("cpu", "--queue", metavar="gpu|cpu", help="Broker queue: gpu or cpu.")

#: what Celery's ``--loglevel`` accepts (any case)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "FATAL")


def _check_queue(queue: str) -> None:
    from workers.broker import check_url
    from workers.celery_app import QUEUES

    if queue not in QUEUES:
        fail(f"--queue: {queue!r} is not one of {', '.join(QUEUES)}")
    check_url()


def _publish(packs: list[list[int]], queue: str, fit: bool = False) -> int:
    """Publish, or exit 1 with a message (no URL, no credentials) when the broker is down."""
    from kombu.exceptions import OperationalError

    from workers.tasks import publish_packs

    if not packs:
        return 0
    try:
        with working(f"publishing {len(packs)} messages to queue {queue}"):
            return publish_packs(packs, queue, fit=fit)
    except OperationalError as exc:
        fail(f"broker unreachable ({type(exc).__name__}); the runs stay queued in the database: "
             "run `kanfarm requeue` once Redis is back", code=1)


def _publish_queued(store, grid: str | None, run_ids: list[int], size: int | str, queue: str) -> int:
    from kanfarm.dispatch import queued_messages

    return _publish(queued_messages(store, grid, run_ids, size), queue, fit=size == "auto")


def _report(info: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        emit_json(info)
    else:
        for line in lines:
            console.print(line, highlight=False)


# --- commands ---------------------------------------------------------------------------------

@enqueue_app.command("grid")
@handles_errors
def enqueue_grid(spec: str = SpecArg,
                 queue: str = QueueOpt,
                 dry_run: bool = typer.Option(False, "--dry-run", help="Say what would happen; write nothing."),
                 as_json: bool = JsonOpt,
                 pack_size: str = typer.Option("1", "--pack-size", metavar="N|auto",
                                               help="Publish compatible runs as packs of up to N (trained as one stacked model), or auto (each worker splits them to what fits: free GPU memory, on a CPU up to 8).")) -> None:
    """Write a grid's runs (idempotent), mark the unfinished ones queued, publish one message per run (or pack)."""
    from kanfarm import dispatch
    from kanfarm.submission import sized_cells
    from workers.broker import check_answers

    _check_queue(queue)
    size = parse_pack_size(pack_size)
    store = open_store()
    grid = read_spec(spec)
    check_answers()
    if dry_run:
        hashes = {config.normalised_hash() for config, _, _ in sized_cells(grid)}  # expand normalised them
        info = {"grid": grid.name, "queue": queue, "dry_run": True, **dispatch.enqueue_preview(store, grid.name, hashes)}
    else:
        result = submit_spec(store, grid)
        queued = dispatch.enqueue(store, grid.name, queue)
        info = {"grid": grid.name, "queue": queue, "dry_run": False, "added": result.added,
                "skipped": result.existing, "published": _publish_queued(store, grid.name, queued, size, queue)}
    verb = "would be " if dry_run else ""
    _report(info, as_json, [
        f"grid {grid.name}: {info['added']} runs {verb}added, {info['skipped']} already stored "
        f"(finished or running ones are skipped), {info['published']} {verb}published to queue {queue}"])


def requeue(grid: Optional[str] = GridOpt,
            stale: bool = typer.Option(False, "--stale", help="Also runs whose lease expired (dead worker)."),
            failed: bool = typer.Option(False, "--failed", help="Also failed runs with attempts left."),
            queue: Optional[str] = typer.Option(
                None, "--queue", metavar="gpu|cpu", help="Publish every run to this queue (gpu or cpu) instead of the one it was "
                                      "enqueued on (cpu for a run never enqueued)."),
            max_attempts: Optional[int] = typer.Option(
                None, "--max-attempts", metavar="N", min=1, help="Attempts bound for --failed (default $KANFARM_MAX_ATTEMPTS or 3)."),
            as_json: bool = JsonOpt,
            pack_size: str = typer.Option("1", "--pack-size", metavar="N|auto",
                                          help="Publish compatible runs as packs of up to N, or auto, as enqueue grid does.")) -> None:
    """Re-publish every queued run (after a Redis restart or flush), and stale/failed ones if asked.

    All queued runs are published, not only those missing from Redis: a duplicate message is a
    no-op claim, while reading the broker's internals to find the missing ones would be fragile.
    """
    from kanfarm import dispatch
    from workers.broker import check_answers, check_url
    from workers.tasks import max_attempts as workers_bound

    size = parse_pack_size(pack_size)
    if max_attempts is not None and not failed:
        fail("--max-attempts: bounds the failed runs retried, so it needs --failed")
    if queue is not None:
        _check_queue(queue)
    check_url()
    store = open_store()
    grid_exists(store, grid)
    check_answers()
    with working("finding the runs to publish"):
        bound = workers_bound() if failed else None  # the workers' own: a run beyond it fails again at its claim
        found = dispatch.requeue(store, grid, stale=stale, queue=queue, workers_bound=bound,
                                 failed_bound=bound if max_attempts is None else max_attempts)
    published = {name: _publish_queued(store, grid, ids, size, name) for name, ids in sorted(found.by_queue.items())}
    info = {"grid": grid, "queue": queue, "queued": len(found.queued), "stale": len(found.stale),
            "failed_retried": len(found.retried), "failed_exhausted": len(found.exhausted),
            "published": sum(published.values()), "published_by_queue": published,
            "failed_beyond_worker_attempts": len(found.beyond_workers)}
    where = ", ".join(f"{n} to {name}" for name, n in published.items()) or "none"
    lines = [f"{info['published']} runs published ({where}): {len(found.queued)} queued, "
             f"{len(found.stale)} stale" + (f", {len(found.retried)} failed retried" if failed else "")]
    if found.exhausted:
        lines.append(f"{len(found.exhausted)} failed runs used all their attempts and stay failed")
    if found.beyond_workers:
        lines.append(f"warning: {len(found.beyond_workers)} of the retried runs have used {bound} attempts "
                     "or more: workers with that KANFARM_MAX_ATTEMPTS fail them again at their claim; start the "
                     "workers with a larger KANFARM_MAX_ATTEMPTS")
    _report(info, as_json, lines)


def sweep(grid: Optional[str] = GridOpt,
          every: Optional[float] = typer.Option(
              None, "--every", metavar="SECONDS", min=1, help="Sweep again every SECONDS until stopped (the compose sweeper service)."),
          grace: float = typer.Option(
              300.0, "--grace", metavar="SECONDS", min=0,
              help="Only runs whose lease expired at least SECONDS ago (a worker cut off for less hands its run back itself, attempt refunded)."),
          pack_size: str = typer.Option("1", "--pack-size", metavar="N|auto",
                                        help="Publish compatible runs as packs of up to N, or auto, as enqueue grid does."),
          as_json: bool = JsonOpt) -> None:
    """Publish again, once each, the runs whose lease expired (their worker died) and mark them queued.

    Unlike `requeue --stale` it leaves queued runs alone (they have their messages), so it can run every minute: with --every it does, riding out broker and database errors, and prints a line (with --json, a JSON line) only for a sweep that found something. Runs never enqueued (a local `run grid` holds them) are left to that command, which takes them back when run again."""
    from workers.broker import check_answers, check_url

    size = parse_pack_size(pack_size)
    check_url()
    store = open_store()
    grid_exists(store, grid)
    if every is None:
        check_answers()
        info = _sweep_once(store, grid, size, grace)
        _report(info, as_json, [_sweep_line(info)])
        return
    from kombu.exceptions import OperationalError as BrokerUnavailable

    from kanfarm.store import database_errors

    while True:
        try:
            info = _sweep_once(store, grid, size, grace)
            if info["stale"] and as_json:  # JSON Lines: one object per line, for a log reader
                sys.stdout.write(json.dumps(info) + "\n")
            elif info["stale"]:
                console.print(_sweep_line(info), highlight=False)
        except (BrokerUnavailable, OSError, *database_errors()) as exc:  # the next sweep tries again
            err_console.print(f"sweep failed ({type(exc).__name__}); next sweep in {every:g} s", highlight=False)
        time.sleep(every)


def _sweep_once(store, grid: Optional[str], size: int | str, grace_s: float) -> dict[str, Any]:
    from kanfarm.dispatch import sweep
    from workers.tasks import publish_packs

    return sweep(store, grid, size, grace_s, lambda packs, queue, fit: publish_packs(packs, queue, fit=fit))


def _sweep_line(info: dict[str, Any]) -> str:
    where = ", ".join(f"{n} to {name}" for name, n in info["published_by_queue"].items()) or "none"
    claimed = info["stale"] - info["local"] - info["requeued"]
    return (f"{info['stale']} runs with an expired lease: {info['published']} published ({where}), "
            f"{info['requeued']} marked queued" + (f", {claimed} claimed meanwhile" if claimed else "")
            + (f", {info['local']} left to the local `run grid` that holds them" if info["local"] else ""))


def cancel(grid: str = typer.Option(..., "--grid", metavar="NAME", help="The grid to cancel.", callback=grid_name),
           as_json: bool = JsonOpt) -> None:
    """Waiting (pending or queued) runs become cancelled; running ones stop at their next epoch boundary."""
    from kanfarm.dispatch import grids_sharing_unfinished

    store = open_store()
    grid_exists(store, grid)
    shared = grids_sharing_unfinished(store, grid)
    waiting, running = store.cancel(grid)
    lines = [f"grid {grid}: {waiting} waiting runs cancelled, {running} running runs will stop at their next epoch"]
    if shared:  # a run is one cell of every grid that holds it
        lines.append(f"some of them are cells of other grids too, cancelled there as well: {', '.join(shared)}; "
                     "`run grid` or `enqueue grid` of a grid takes its cancelled runs back")
    _report({"grid": grid, "cancelled": waiting, "stopping": running, "other_grids": shared}, as_json, lines)


def worker(gpus: Optional[str] = typer.Option(None, "--gpus", metavar="IDS", help="GPU ids, e.g. 0,1: one worker process per GPU."),
           queues: Optional[str] = typer.Option(None, "--queues", metavar="QUEUES", help="Queues to consume (default gpu with --gpus, else cpu)."),
           concurrency: int = typer.Option(1, "--concurrency", metavar="N", min=1, help="Worker processes per GPU (or CPU workers)."),
           loglevel: str = typer.Option("INFO", "--loglevel", metavar="LEVEL", help="Celery log level.")) -> None:
    """Start Celery workers on this machine and wait; SIGTERM/Ctrl-C checkpoints and releases runs."""
    from workers.launcher import check_gpus, launch, parse_gpus, parse_queues, plan

    if loglevel.upper() not in LOG_LEVELS:  # Celery's own refusal would come once per restart
        fail(f"--loglevel: {loglevel!r} is not one of {', '.join(LOG_LEVELS)}")
    try:
        gpu_ids = parse_gpus(gpus)
        check_gpus(gpu_ids)
        specs = plan(gpu_ids, parse_queues(queues, "gpu" if gpu_ids else "cpu"), concurrency)
    except ValueError as exc:
        fail(str(exc))
    from kanfarm.run_environment import check_run_environment
    from workers.broker import check_answers, check_url
    from workers.celery_app import visibility_timeout
    from workers.tasks import lease_seconds, max_attempts

    # every setting the workers read, checked here: a bad one in a worker would fail each task
    # before its claim, and the acked message would be lost with nothing said
    check_run_environment()
    lease_seconds(), max_attempts(), visibility_timeout()
    check_url()
    check_answers()
    store = open_store()  # refuse to start against a database that was not migrated
    store.dispose(close=True)
    for spec in specs:
        err_console.print(f"starting worker {spec.name} on {','.join(spec.queues)} "
                          f"(device {spec.env.get('KANFARM_DEVICE')}, CUDA_VISIBLE_DEVICES={spec.env['CUDA_VISIBLE_DEVICES']!r})",
                          highlight=False)
    raise typer.Exit(launch(specs, loglevel))


def register(app: typer.Typer) -> None:
    """Add the distributed commands to the ``kanfarm`` app."""
    app.add_typer(enqueue_app, name="enqueue")
    app.command("requeue")(handles_errors(requeue))
    app.command("sweep")(handles_errors(sweep))
    app.command("cancel")(handles_errors(cancel))
    app.command("worker")(handles_errors(worker))
