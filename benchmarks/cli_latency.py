"""Wall time of the CLI commands a researcher types most, each in a fresh interpreter.

Why: a command that only reads the store (``status``, reports) or counts parameters (``grid
show``) should not pay torch's import (seconds); the table says whether each command imported it.

    python benchmarks/cli_latency.py [--repeats 5]

Uses a temporary SQLite database holding the ``demo`` grid (submitted, not trained). Prints the
median and the fastest of ``--repeats`` runs per command, and the load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
COMMANDS = (["--help"], ["status"], ["grid", "list"], ["grid", "show", "demo"], ["report", "summary", "--grid", "demo"],
            ["report", "efficiency"], ["export", "--format", "csv"])
#: runs the CLI, then says on stderr whether torch was imported, and exits as the CLI did
PROBE = ("import sys\nfrom cli.main import app\ncode = 0\ntry:\n    app(sys.argv[1:])\n"
         "except SystemExit as stop:\n    code = stop.code or 0\n"
         "sys.stderr.write('TORCH=%s\\n' % ('torch' in sys.modules))\nsys.exit(code)\n")


def kanfarm(args: list[str], env: dict[str, str]) -> tuple[float, bool]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or "TORCH=" not in done.stderr:  # a failing command's time says nothing
        sys.exit(f"kanfarm {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return seconds, "TORCH=True" in done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "PYTHONPATH": ROOT, "KANFARM_DATABASE_URL": f"sqlite:///{folder}/k.db"}
        for setup in (["db", "upgrade"], ["grid", "submit", "demo"]):
            kanfarm(setup, env)
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        print("| command | median s | fastest s | imports torch |")
        print("|---|---|---|---|")
        for command in COMMANDS:
            runs = [kanfarm(command, env) for _ in range(args.repeats)]
            times = [seconds for seconds, _ in runs]
            print(f"| kanfarm {' '.join(command)} | {statistics.median(times):.2f} | {min(times):.2f} | "
                  f"{'yes' if any(t for _, t in runs) else 'no'} |", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
