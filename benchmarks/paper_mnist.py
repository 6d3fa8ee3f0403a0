"""Wall time of the study's first grid, ``paper-mnist`` (243 runs x 100 epochs), run as a researcher runs it.

Writes MNIST-shaped random IDX files (60,000 + 10,000 images of 28 x 28 uint8, 10 classes) into a
temporary ``KANFARM_DATA_DIR`` unless ``--data-dir`` already holds MNIST, makes a fresh SQLite
database, then times the two commands a researcher types:

    kanfarm db upgrade
    kanfarm run grid paper-mnist --device D --pack-size P --workers W

from the start of ``run grid`` to its exit: submission, training, evaluation, every epoch row and
every checkpoint included. Then prints runs by status, epoch rows and checkpoint files, and the
slowest and fastest runs' training seconds from the database.

    python benchmarks/paper_mnist.py [--device cuda] [--pack-size auto] [--workers 1]
                                     [--epochs 100] [--train-rows 60000] [--timeout 0]

``--epochs``/``--train-rows`` shrink the grid for a smoke test on a CPU (the grid keeps its 243
runs); ``--timeout`` stops the grid after that many seconds (Ctrl-C: runs checkpoint and are
released) and reports how far it got.
"""
from __future__ import annotations

import argparse
import gzip
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake_mnist(folder: Path, n_train: int, n_test: int) -> None:
    """Random images whose labels depend on the pixels a little, so accuracy can move above chance."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (images[:, 14, :10].argmax(axis=1)).astype(np.uint8)
        write_idx(folder / FILES[split][0], images)
        write_idx(folder / FILES[split][1], labels)


def kanfarm(*args: str, env: dict[str, str], cwd: Path, timeout: float = 0) -> tuple[int, float]:
    """Run the CLI as a subprocess; returns (exit code, seconds). ``timeout``: Ctrl-C after that long."""
    cmd = [sys.executable, "-c", "from cli.main import app; app()", *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd)
    try:
        code = proc.wait(timeout=timeout or None)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        code = proc.wait()
    return code, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--pack-size", default="auto")
    ap.add_argument("--workers", default="1")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--train-rows", type=int, default=60_000)
    ap.add_argument("--data-dir", help="a KANFARM_DATA_DIR that already holds mnist/ (else random files)")
    ap.add_argument("--timeout", type=float, default=0)
    ap.add_argument("--workdir", help="keep database and checkpoints here (default: a temporary folder)")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="kanfarm-paper-mnist-"))
    if (work / "kanfarm.db").exists():  # a second run would time only what the first left (2.4 s for "the grid")
        sys.exit(f"{work / 'kanfarm.db'} exists: the grid's wall time needs a fresh database (remove the folder)")
    work.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir) if args.data_dir else work / "data"
    if not args.data_dir:
        start = time.perf_counter()
        write_fake_mnist(data_dir / "mnist", args.train_rows, max(1, args.train_rows // 6))
        print(f"wrote MNIST-shaped random files in {time.perf_counter() - start:.1f} s", flush=True)
    spec = "paper-mnist"
    if args.epochs != 100:
        text = (ROOT / "kanfarm/grids/presets/paper-mnist.toml").read_text()
        spec = str(work / "paper-mnist-short.toml")
        Path(spec).write_text(text.replace('name = "paper-mnist"', f'name = "paper-mnist-e{args.epochs}"')
                              .replace("epochs = 100", f"epochs = {args.epochs}"))
    db = work / "kanfarm.db"
    env = dict(os.environ, KANFARM_DATABASE_URL=f"sqlite:///{db}", KANFARM_DATA_DIR=str(data_dir),
               KANFARM_OFFLINE="1", KANFARM_CHECKPOINT_DIR=str(work / "checkpoints"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    code, _ = kanfarm("db", "upgrade", env=env, cwd=work)
    if code:
        sys.exit(f"kanfarm db upgrade exited {code}")
    run_args = ["run", "grid", spec, "--device", args.device, "--pack-size", args.pack_size, "--workers", args.workers]
    print("kanfarm " + " ".join(run_args), flush=True)
    code, seconds = kanfarm(*run_args, env=env, cwd=work, timeout=args.timeout)

    con = sqlite3.connect(db)
    status = dict(con.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())
    rows = con.execute("SELECT COUNT(*) FROM epoch_metrics").fetchone()[0]
    expected = sum(status.values()) * (args.epochs + 1)
    per_run = con.execute("SELECT MIN(s), MAX(s) FROM (SELECT run_id, SUM(seconds) AS s FROM epoch_metrics "
                          "GROUP BY run_id)").fetchone()
    diverged = status.get("diverged", 0)
    checkpoints = sum(1 for _ in (work / "checkpoints").rglob("*") if _.is_file()) if (work / "checkpoints").exists() else 0
    print(f"| grid | device | pack size | workers | wall s (run grid) | runs by status | epoch rows "
          f"(complete grid: {expected}) | checkpoint files | exit |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {spec if args.epochs == 100 else f'paper-mnist, {args.epochs} epochs'}, {args.train_rows} train rows "
          f"| {args.device} | {args.pack_size} | {args.workers} | {seconds:.1f} | {status} | {rows} | {checkpoints} "
          f"| {code} |")
    if per_run[0] is None:  # stopped before any epoch row
        print(f"no epoch rows; diverged runs: {diverged}")
    else:
        print(f"per-run training seconds (sum of epoch seconds; a pack member's are its share of the pack's): min {per_run[0]:.1f}, "
              f"max {per_run[1]:.1f}; diverged runs: {diverged}")


if __name__ == "__main__":
    main()
