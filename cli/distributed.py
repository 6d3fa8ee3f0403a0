"""Distributed commands: ``worker``, ``enqueue grid``, ``requeue``, ``sweep``, ``cancel``.

The database decides what runs; the broker only carries "try run N" messages. So the commands
here change run states in the database and publish run ids (first the states, so that a message
never finds its run not yet claimable; ``sweep`` the other way round, as stale runs are claimable
already), and publishing the same id twice is always safe (the second claim is a no-op). Wired
into the main app by ``register(app)`` in ``cli/main.py``.
"""
from __future__ import annotations

import json
import re
import sys
import time
from typing import Any, Optional
from urllib.parse import urlsplit

import typer

from cli.common import (GridOpt, JsonOpt, grid_exists, grid_name, handles_errors, open_store, parse_pack_size,
                        read_spec, submit_spec)
from cli.output import console, err_console, fail, to_json, working

enqueue_app = typer.Typer(no_args_is_help=True, help="Put runs on the Redis queue for Celery workers.")

QueueOpt = typer.Option("cpu", "--queue", help="Broker queue: gpu or cpu.")
#: statuses ``enqueue`` moves to queued: waiting ones and cancelled ones (not finished: failed is)
_ENQUEUE_FROM = ("pending", "cancelled")


def _check_queue(queue: str) -> None:
    from workers.celery_app import QUEUES

    if queue not in QUEUES:
        fail(f"--queue: {queue!r} is not one of {', '.join(QUEUES)}")
    _check_broker_url()


#: what Celery's ``--loglevel`` accepts (any case)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "FATAL")


def _broker_urls() -> list[str]:
    """The broker URL, or each of a failover list (``redis://a;redis://b``, as kombu takes it)."""
    from workers.celery_app import broker_url

    return [url.strip() for url in broker_url().split(";") if url.strip()] or [""]


def _check_broker_url() -> None:
    """A broker URL of another scheme than Redis's, or a malformed one, is refused before anything
    is written (kombu would fail later with a long traceback). The URL is not echoed: it may hold
    a password."""
    from workers.celery_app import BROKER_ENV

    for url in _broker_urls():
        scheme, sep, _ = url.partition("://")
        if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,15}", scheme):  # echoing it could show a password
            fail(f"{BROKER_ENV}: not a URL: use redis://host:6379/0")
        if scheme.lower() not in ("redis", "rediss"):
            fail(f"{BROKER_ENV}: unsupported broker scheme {scheme.lower()!r}: use redis://host:6379/0")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  (raises ValueError: not a number, or not 0-65535)
        except ValueError:
            fail(f"{BROKER_ENV}: malformed host or port: use redis://host:6379/0")
        database = parts.path.strip("/")
        if database and not (database.isascii() and database.isdigit()):
            fail(f"{BROKER_ENV}: what follows the host must be a database number: use redis://host:6379/0")
        _check_broker_options(url)


def _check_broker_options(url: str) -> None:
    """The URL's query options, as kombu reads them (no connection is made): one it does not take
    failed the publish with a traceback, after the runs were written. Not echoed (a password?)."""
    from kombu import Connection

    from workers.celery_app import BROKER_ENV

    try:
        Connection(url).release()
    except (TypeError, KeyError, ValueError) as exc:
        fail(f"{BROKER_ENV}: an option of the URL (after '?') is not one the broker client takes "
             f"({type(exc).__name__}); kombu's Redis transport takes e.g. ?ssl_cert_reqs=required with rediss://")


def _check_broker_answers() -> None:
    """Refuse (exit 2, before anything is written) a broker that answers but turns the URL down:
    a database number the server does not have, a wrong password. A broker that does not answer,
    or a URL with options redis-py does not take (kombu's own), is left to the publish step (its
    runs stay queued for ``kanfarm requeue``). Of a failover list, the first URL is asked."""
    import redis

    from workers.celery_app import BROKER_ENV

    try:
        client = redis.Redis.from_url(_broker_urls()[0], socket_connect_timeout=2, socket_timeout=2)
    except (ValueError, TypeError):
        return
    try:
        client.ping()
    except (redis.AuthenticationError, redis.ResponseError) as exc:  # the server's words, no URL in them
        fail(f"{BROKER_ENV}: the broker refused the URL: {str(exc).splitlines()[0]}")
    except (redis.RedisError, ValueError, TypeError):
        return
    finally:
        client.close()


def _publish(run_ids: list[int], queue: str) -> int:
    """Publish, or exit 1 with a message (no URL, no credentials) when the broker is down."""
    from kombu.exceptions import OperationalError

    from workers.tasks import publish

    if not run_ids:
        return 0
    try:
        with working(f"publishing {len(run_ids)} messages to queue {queue}"):
            return publish(run_ids, queue)
    except OperationalError as exc:
        fail(f"broker unreachable ({type(exc).__name__}); the runs stay queued in the database: "
             "run `kanfarm requeue` once Redis is back", code=1)


def _report(info: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        sys.stdout.write(to_json(info) + "\n")
    else:
        for line in lines:
            console.print(line, highlight=False)


def _max_attempts(value: Optional[int]) -> int:
    from workers.tasks import max_attempts

    return value if value is not None else max_attempts()


def _messages(run_ids: list[int], size: int | str, config_of) -> list[list[int]]:
    """The runs' messages: one each with ``size`` 1, else packs of up to ``size`` (``auto``: the
    largest; each worker splits them to suit its device). ``config_of(run_id)`` gives a config."""
    from kanfarm.packing import plan_packs
    from kanfarm.packing.planner import MAX_PACK

    if size == 1:
        return [[i] for i in run_ids]
    return plan_packs([(i, config_of(i)) for i in run_ids], MAX_PACK if size == "auto" else size)


def _publish_packs(store, grid: str, queued: list[int], size: int | str, queue: str) -> int:
    """Group the queued runs into packs (``_messages``) and publish one message per pack."""
    from kombu.exceptions import OperationalError

    from workers.tasks import publish_packs

    wanted = set(queued)
    configs = {i: c for i, c in store.claimable_runs(grid) if i in wanted}
    packs = _messages(list(configs), size, configs.__getitem__)
    try:
        with working(f"publishing {len(packs)} pack messages to queue {queue}"):
            return publish_packs(packs, queue, fit=size == "auto")
    except OperationalError as exc:
        fail(f"broker unreachable ({type(exc).__name__}); the runs stay queued in the database: "
             "run `kanfarm requeue` once Redis is back", code=1)


# --- commands ---------------------------------------------------------------------------------

@enqueue_app.command("grid")
@handles_errors
def enqueue_grid(spec: str = typer.Argument(..., help="A TOML spec file or a preset name."),
                 queue: str = QueueOpt,
                 dry_run: bool = typer.Option(False, "--dry-run", help="Say what would happen; write nothing."),
                 as_json: bool = JsonOpt,
                 pack_size: str = typer.Option("1", "--pack-size",
                                               help="Publish compatible runs as packs of up to N (trained as one stacked model), or auto (each worker fits its GPU).")) -> None:
    """Write a grid's runs (idempotent), mark the unfinished ones queued, publish one message per run (or pack)."""
    from kanfarm.submission import sized_cells

    _check_queue(queue)
    size = parse_pack_size(pack_size)
    store = open_store()
    grid = read_spec(spec)
    _check_broker_answers()
    if dry_run:
        hashes = {config.normalised_hash() for config, _, _ in sized_cells(grid)}  # expand normalised them
        known = {row["config_hash"]: row["status"]
                 for row in store.query("SELECT config_hash, status FROM runs")}
        stored = hashes & known.keys()
        # what the real command publishes: the spec's waiting runs and those of the grid's earlier cells
        candidates = stored | store.config_hashes(grid.name)
        waiting = sum(known[h] in ("queued",) + _ENQUEUE_FROM for h in candidates)
        info = {"grid": grid.name, "queue": queue, "dry_run": True, "added": len(hashes) - len(stored),
                "skipped": len(stored), "published": len(hashes) - len(stored) + waiting}
    else:
        result = submit_spec(store, grid)
        store.mark_queued(store.run_ids(grid.name, statuses=_ENQUEUE_FROM))
        queued = store.run_ids(grid.name, statuses=["queued"])
        store.assign_queue(queued, queue)
        info = {"grid": grid.name, "queue": queue, "dry_run": False, "added": result.added,
                "skipped": result.existing,
                "published": _publish(queued, queue) if size == 1 else _publish_packs(store, grid.name, queued, size, queue)}
    verb = "would be " if dry_run else ""
    _report(info, as_json, [
        f"grid {grid.name}: {info['added']} runs {verb}added, {info['skipped']} already stored "
        f"(finished or running ones are skipped), {info['published']} {verb}published to queue {queue}"])


def requeue(grid: Optional[str] = GridOpt,
            stale: bool = typer.Option(False, "--stale", help="Also runs whose lease expired (dead worker)."),
            failed: bool = typer.Option(False, "--failed", help="Also failed runs with attempts left."),
            queue: Optional[str] = typer.Option(
                None, "--queue", help="Publish every run to this queue (gpu or cpu) instead of the one it was "
                                      "enqueued on (cpu for a run never enqueued)."),
            max_attempts: Optional[int] = typer.Option(
                None, "--max-attempts", min=1, help="Attempts bound for --failed (default $KANFARM_MAX_ATTEMPTS or 3)."),
            as_json: bool = JsonOpt,
            pack_size: str = typer.Option("1", "--pack-size",
                                          help="Publish compatible runs as packs of up to N, or auto, as enqueue grid does.")) -> None:
    """Re-publish every queued run (after a Redis restart or flush), and stale/failed ones if asked.

    All queued runs are published, not only those missing from Redis: a duplicate message is a
    no-op claim, while reading the broker's internals to find the missing ones would be fragile.
    """
    size = parse_pack_size(pack_size)
    if max_attempts is not None and not failed:
        fail("--max-attempts: bounds the failed runs retried, so it needs --failed")
    if queue is not None:
        _check_queue(queue)
    _check_broker_url()
    store = open_store()
    grid_exists(store, grid)
    _check_broker_answers()
    with working("finding the runs to publish"):
        queued = store.run_ids(grid, statuses=["queued"])
        stale_ids = store.stale_runs(grid) if stale else []
        retried: list[int] = []
        exhausted: list[int] = []
        beyond_workers: list[int] = []  # retried under --max-attempts, but out of the workers' own bound
        if failed:
            bound, workers_bound = _max_attempts(max_attempts), _max_attempts(None)
            ids = set(store.run_ids(grid, statuses=["failed"]))
            for row in store.query("SELECT id, attempts FROM runs WHERE status = 'failed' ORDER BY id"):
                if row["id"] in ids:
                    (retried if row["attempts"] < bound else exhausted).append(row["id"])
                    if workers_bound <= row["attempts"] < bound:
                        beyond_workers.append(row["id"])
            store.mark_queued(retried, fresh_attempts=False)  # the bound counts every earlier attempt
        run_ids = sorted(set(queued) | set(stale_ids) | set(retried))
        by_queue: dict[str, list[int]] = {}
        unnoted: dict[str, list[int]] = {}  # published to another queue than the one noted (or none)
        for run_id, stored in sorted(store.queues(run_ids).items()):
            name = queue or stored or "cpu"
            by_queue.setdefault(name, []).append(run_id)
            if name != stored:
                unnoted.setdefault(name, []).append(run_id)
        for name, ids in unnoted.items():
            store.assign_queue(ids, name)
    published = {name: _publish(ids, name) if size == 1 else _publish_packs(store, grid, ids, size, name)
                 for name, ids in sorted(by_queue.items())}
    info = {"grid": grid, "queue": queue, "queued": len(queued), "stale": len(stale_ids),
            "failed_retried": len(retried), "failed_exhausted": len(exhausted),
            "published": sum(published.values()), "published_by_queue": published}
    where = ", ".join(f"{n} to {name}" for name, n in published.items()) or "none"
    lines = [f"{info['published']} runs published ({where}): {len(queued)} queued, "
             f"{len(stale_ids)} stale" + (f", {len(retried)} failed retried" if failed else "")]
    if exhausted:
        lines.append(f"{len(exhausted)} failed runs used all their attempts and stay failed")
    info["failed_beyond_worker_attempts"] = len(beyond_workers)
    if beyond_workers:
        lines.append(f"warning: {len(beyond_workers)} of the retried runs have used {workers_bound} attempts "
                     "or more: workers with that KANFARM_MAX_ATTEMPTS fail them again at their claim; start the "
                     "workers with a larger KANFARM_MAX_ATTEMPTS")
    _report(info, as_json, lines)


def sweep(grid: Optional[str] = GridOpt,
          every: Optional[float] = typer.Option(
              None, "--every", min=1, help="Sweep again every SECONDS until stopped (the compose sweeper service)."),
          grace: float = typer.Option(
              300.0, "--grace", min=0,
              help="Only runs whose lease expired at least SECONDS ago (a worker cut off for less hands its run back itself, attempt refunded)."),
          pack_size: str = typer.Option("1", "--pack-size",
                                        help="Publish compatible runs as packs of up to N, or auto, as enqueue grid does."),
          as_json: bool = JsonOpt) -> None:
    """Publish again, once each, the runs whose lease expired (their worker died) and mark them queued.

    Unlike `requeue --stale` it leaves queued runs alone (they have their messages), so it can run every minute: with --every it does, riding out broker and database errors, and prints a line (with --json, a JSON line) only for a sweep that found something. Runs never enqueued (a local `run grid` holds them) are left to that command, which takes them back when run again."""
    size = parse_pack_size(pack_size)
    _check_broker_url()
    store = open_store()
    grid_exists(store, grid)
    if every is None:
        _check_broker_answers()
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
    """Publish the stale runs (each to the queue it was enqueued on, as packs with ``size`` > 1),
    then mark them queued: a worker that takes a message first claims the run all the same (an
    expired lease is claimable)."""
    from workers.tasks import publish_packs

    stale = store.stale_runs(grid, grace_s=grace_s)
    by_queue: dict[str, list[int]] = {}
    for run_id, stored in sorted(store.queues(stale).items()):
        if stored is not None:  # never enqueued: a local `run grid` holds it
            by_queue.setdefault(stored, []).append(run_id)
    published = {}
    for name, ids in sorted(by_queue.items()):
        published[name] = publish_packs(_messages(ids, size, lambda i: store.run(i).config), name, fit=size == "auto")
    moved = store.requeue_stale([i for ids in by_queue.values() for i in ids])
    return {"grid": grid, "stale": len(stale), "local": len(stale) - sum(map(len, by_queue.values())),
            "published": sum(published.values()), "published_by_queue": published, "requeued": len(moved)}


def _sweep_line(info: dict[str, Any]) -> str:
    where = ", ".join(f"{n} to {name}" for name, n in info["published_by_queue"].items()) or "none"
    claimed = info["stale"] - info["local"] - info["requeued"]
    return (f"{info['stale']} runs with an expired lease: {info['published']} published ({where}), "
            f"{info['requeued']} marked queued" + (f", {claimed} claimed meanwhile" if claimed else "")
            + (f", {info['local']} left to the local `run grid` that holds them" if info["local"] else ""))


def cancel(grid: str = typer.Option(..., "--grid", help="The grid to cancel.", callback=grid_name),
           as_json: bool = JsonOpt) -> None:
    """Waiting (pending or queued) runs become cancelled; running ones stop at their next epoch boundary."""
    store = open_store()
    grid_exists(store, grid)
    shared = [row["name"] for row in store.query(
        "SELECT DISTINCT g2.name FROM grids g1 JOIN grid_runs a ON a.grid_id = g1.id "
        "JOIN grid_runs b ON b.run_id = a.run_id JOIN grids g2 ON g2.id = b.grid_id "
        "JOIN runs r ON r.id = a.run_id WHERE g1.name = :grid AND g2.name <> :grid "
        "AND r.status IN ('pending', 'queued', 'running') ORDER BY g2.name", {"grid": grid})]
    waiting, running = store.cancel(grid)
    lines = [f"grid {grid}: {waiting} waiting runs cancelled, {running} running runs will stop at their next epoch"]
    if shared:  # a run is one cell of every grid that holds it
        lines.append(f"some of them are cells of other grids too, cancelled there as well: {', '.join(shared)}; "
                     "`run grid` or `enqueue grid` of a grid takes its cancelled runs back")
    _report({"grid": grid, "cancelled": waiting, "stopping": running, "other_grids": shared}, as_json, lines)


def worker(gpus: Optional[str] = typer.Option(None, "--gpus", help="GPU ids, e.g. 0,1: one worker process per GPU."),
           queues: Optional[str] = typer.Option(None, "--queues", help="Queues to consume (default gpu with --gpus, else cpu)."),
           concurrency: int = typer.Option(1, "--concurrency", min=1, help="Worker processes per GPU (or CPU workers)."),
           loglevel: str = typer.Option("INFO", "--loglevel", help="Celery log level.")) -> None:
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
    from kanfarm.runner import check_run_environment
    from workers.celery_app import visibility_timeout
    from workers.tasks import lease_seconds, max_attempts

    # every setting the workers read, checked here: a bad one in a worker would fail each task
    # before its claim, and the acked message would be lost with nothing said
    check_run_environment()
    lease_seconds(), max_attempts(), visibility_timeout()
    _check_broker_url()
    _check_broker_answers()
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
