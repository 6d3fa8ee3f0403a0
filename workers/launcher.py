"""``kanfarm worker``: one Celery worker process per GPU (or per CPU slot), each pinned by its env.

Separate processes rather than a prefork pool: each one sees exactly one GPU through
``CUDA_VISIBLE_DEVICES`` and initialises CUDA itself, so no CUDA context ever crosses a fork; a
crash takes down one run, not the node: the launcher starts a crashed worker again. It forwards
SIGTERM/SIGINT to its children (each then checkpoints and releases its run: a warm shutdown; a
second signal kills them) and exits when they all have.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from workers.celery_app import QUEUES


@dataclass
class WorkerSpec:
    """One ``celery worker`` process: its node name, queues and environment overrides."""

    name: str
    queues: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, loglevel: str = "INFO") -> list[str]:
        return [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
                "--pool", "solo", "--concurrency", "1", "--prefetch-multiplier", "1",
                "-Q", ",".join(self.queues), "-n", self.name, "--loglevel", loglevel,
                "--without-gossip", "--without-mingle", "-E"]


def parse_gpus(text: str | None) -> list[str]:
    """``"0,1"`` -> ``["0", "1"]``; ids (or UUIDs) as CUDA_VISIBLE_DEVICES takes them."""
    if text is None or not text.strip():
        return []
    gpus = [g.strip() for g in text.split(",")]
    if any(not g for g in gpus) or len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus {text!r}: give distinct GPU ids separated by commas, e.g. 0,1")
    return gpus


def check_gpus(gpus: list[str], count: int | None = None) -> None:
    """Refuse GPU ids this machine lacks (``count``: its CUDA devices, asked of torch when None): a
    cuda worker without its GPU would fail, and use an attempt of, every run it takes.

    ``torch.cuda.device_count()`` asks NVML and creates no CUDA context, so children stay safe.
    UUIDs cannot be checked by index; they need at least one device."""
    if not gpus:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    narrowed = count is None and visible
    if count is None:
        import torch  # local: CPU workers and tests of plan() never need it

        count = torch.cuda.device_count()  # of the visible devices, when narrowed
    if narrowed:  # the launcher's own view is narrowed: ids are checked against it,
        known = [v.strip() for v in visible.split(",") if v.strip()]  # each child gets one of them
        missing = [g for g in gpus if g not in known]
        if missing:
            raise ValueError(f"--gpus {','.join(gpus)}: {','.join(missing)} not in this shell's "
                             f"CUDA_VISIBLE_DEVICES={visible}")
        if count < len(known):  # ids that name no device (or no GPU at all) are not reported by CUDA
            raise ValueError(f"--gpus {','.join(gpus)}: this shell's CUDA_VISIBLE_DEVICES={visible} names "
                             f"{len(known)} device{'' if len(known) == 1 else 's'}, but CUDA finds {count}")
        return
    missing = [g for g in gpus if (int(g) >= count if g.isdigit() else count == 0)]
    if missing:
        hint = f"ids 0-{count - 1}" if count > 1 else "id 0" if count else "omit --gpus for CPU workers"
        raise ValueError(f"--gpus {','.join(gpus)}: no CUDA device {','.join(missing)} on this machine "
                         f"(it has {count} CUDA device{'' if count == 1 else 's'}; {hint})")


def parse_queues(text: str | None, default: str) -> tuple[str, ...]:
    queues = tuple(q.strip() for q in (text or default).split(",") if q.strip())
    unknown = [q for q in queues if q not in QUEUES]
    if not queues or unknown:
        raise ValueError(f"--queues {text!r}: choose from {', '.join(QUEUES)}")
    return queues


def plan(gpus: list[str], queues: tuple[str, ...] | None = None, concurrency: int = 1,
         host: str | None = None) -> list[WorkerSpec]:
    """The worker processes to start: ``concurrency`` per GPU, or ``concurrency`` CPU workers."""
    if concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    from kanfarm.local import usable_cpus

    host = host or socket.gethostname()
    specs = []
    # the cores this machine (or container) lets us use, split between the worker processes
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, usable_cpus() // (concurrency * max(1, len(gpus))))))
    if gpus:
        for gpu in gpus:
            for slot in range(concurrency):
                specs.append(WorkerSpec(
                    f"gpu{gpu}-{slot}@{host}", queues or ("gpu",),
                    {"CUDA_VISIBLE_DEVICES": gpu, "KANFARM_DEVICE": "cuda", "OMP_NUM_THREADS": threads}))
    else:
        for slot in range(concurrency):
            # hide GPUs so a CPU worker never opens a CUDA context
            specs.append(WorkerSpec(
                f"cpu-{slot}@{host}", queues or ("cpu",),
                {"CUDA_VISIBLE_DEVICES": "", "KANFARM_DEVICE": "cpu", "OMP_NUM_THREADS": threads}))
    return specs


#: the launcher's pid, given to each worker: a worker whose parent is no longer that process
#: (the launcher was killed) shuts down warm instead of consuming on as an orphan
LAUNCHER_PID_ENV = "KANFARM_LAUNCHER_PID"

#: a worker that crashes (exits non-zero without being told to stop) is started again after
#: RESTART_DELAY_S, unless it has crashed MAX_CRASHES times within CRASH_WINDOW_S: then it stays down
#: (a crash loop, e.g. a broken environment) and its exit code becomes the launcher's.
RESTART_DELAY_S = 5.0
MAX_CRASHES = 5
CRASH_WINDOW_S = 600.0


def launch(specs: list[WorkerSpec], loglevel: str = "INFO", poll_s: float = 0.5) -> int:
    """Start every worker and watch them until they have all stopped; the worst exit code wins.

    The first SIGTERM/SIGINT (Ctrl-C)/SIGHUP is forwarded as SIGTERM, Celery's warm shutdown: each worker
    checkpoints and releases its run. A second one kills them (SIGKILL), a crash as far as their
    runs go: they come back when their leases expire. (Not SIGQUIT, Celery's cold shutdown: the solo
    pool cannot cancel a task, and the error it raises inside the run would mark the run failed.)
    A worker that crashes while nobody asked it to stop is restarted (see ``RESTART_DELAY_S``)."""
    procs: list[subprocess.Popen | None] = [None] * len(specs)
    codes: list[int | None] = [None] * len(specs)
    crashes: list[list[float]] = [[] for _ in specs]
    restart_at: dict[int, tuple[float, int]] = {}  # worker -> (when, the code it crashed with)
    signals_seen = []

    def stop_signal() -> signal.Signals:
        return signal.SIGTERM if len(signals_seen) == 1 else signal.SIGKILL

    def start(i: int) -> None:
        # own process group: a terminal's Ctrl-C reaches only the launcher, which forwards it
        # LAUNCHER_PID_ENV: the worker stops (warm) when this process dies, even by SIGKILL
        procs[i] = subprocess.Popen(specs[i].argv(loglevel),
                                    env={**os.environ, **specs[i].env, LAUNCHER_PID_ENV: str(os.getpid())},
                                    start_new_session=True)
        if signals_seen:  # a signal that came while it started found it missing from procs
            procs[i].send_signal(stop_signal())

    def forward(signum, _frame) -> None:
        signals_seen.append(signum)
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(stop_signal())

    # SIGHUP: the terminal closed; its workers (in their own sessions) would train on as orphans.
    # Unless it is ignored already: `nohup kanfarm worker &` asks the workers to outlive the terminal.
    stops = [signal.SIGTERM, signal.SIGINT] + ([] if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
                                               else [signal.SIGHUP])
    previous = {sig: signal.signal(sig, forward) for sig in stops}
    try:
        for i in range(len(specs)):
            if signals_seen:  # stopped while starting: the rest never start
                codes[i] = 0
            else:
                start(i)
        while any(code is None for code in codes):
            time.sleep(poll_s)
            now = time.monotonic()
            for i, proc in enumerate(procs):
                if codes[i] is not None:
                    continue
                if i in restart_at:
                    when, crashed_with = restart_at[i]
                    if signals_seen:  # stopping: a worker waiting to restart stays down
                        codes[i] = crashed_with
                        del restart_at[i]
                    elif now >= when:
                        del restart_at[i]
                        start(i)
                    continue
                code = proc.poll()
                if code is None:
                    continue
                if code == -signal.SIGTERM and len(signals_seen) == 1:
                    code = 0  # stopped before Celery took over SIGTERM: it held no run, a clean stop
                crashes[i] = [t for t in crashes[i] if now - t < CRASH_WINDOW_S] + [now]
                if signals_seen or code == 0 or len(crashes[i]) >= MAX_CRASHES:
                    codes[i] = code
                    if code and not signals_seen:
                        print(f"kanfarm worker: {specs[i].name} exited with code {code}, its "
                              f"{MAX_CRASHES}th crash within {CRASH_WINDOW_S:.0f} s; not restarting it",
                              file=sys.stderr, flush=True)
                else:
                    print(f"kanfarm worker: {specs[i].name} exited with code {code}; restarting it in "
                          f"{RESTART_DELAY_S:.0f} s", file=sys.stderr, flush=True)
                    restart_at[i] = (now + RESTART_DELAY_S, code)
    except BaseException:
        forward(signal.SIGTERM, None)  # never leave half a node running
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return max((abs(c) for c in codes if c is not None), default=0)
