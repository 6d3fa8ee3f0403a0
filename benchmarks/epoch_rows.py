"""Writing a pack's epoch rows: one transaction per member's row against one per epoch.

A pack of 27 members emits 27 rows per epoch; on an H200 a small pack's epoch takes ~0.1 s, so the
per-row cost matters. Prints the median time of one epoch's rows written each way, on a fresh
SQLite file (or ``--url``: a scratch PostgreSQL database).

    python benchmarks/epoch_rows.py [--members 27] [--epochs 30] [--url sqlite:///...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kanfarm.config import RunConfig  # noqa: E402
from kanfarm.store import Store  # noqa: E402
from kanfarm.training.records import EpochRecord  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=27)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--url", help="database URL (default: a new SQLite file in a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        store = Store(args.url or f"sqlite:///{folder}/rows.db")
        store.upgrade()
        cells = [(RunConfig(dataset="mnist", model="mlp", depth="shallow", lr=1e-4 * (i + 1)), 1000, None)
                 for i in range(args.members)]
        store.submit_grid("epoch-rows-benchmark", {}, cells)
        ids = store.run_ids("epoch-rows-benchmark")
        for run_id in ids:
            store.claim(run_id, "bench", 3600)
        per_row, per_epoch = [], []
        for epoch in range(args.epochs):
            record = EpochRecord(epoch, 1.0, 0.5, 1.0, 0.5, 0.1, {})
            start = time.perf_counter()
            for run_id in ids:
                store.write_epoch(run_id, record, worker="bench")
            per_row.append(time.perf_counter() - start)
            record = EpochRecord(args.epochs + epoch, 1.0, 0.5, 1.0, 0.5, 0.1, {})
            start = time.perf_counter()
            store.write_epochs([(run_id, record) for run_id in ids], "bench")
            per_epoch.append(time.perf_counter() - start)
        store.dispose(close=True)
    backend = (args.url or "sqlite").split(":")[0]
    print(f"{args.members} rows per epoch, {backend}: one transaction per row "
          f"{statistics.median(per_row) * 1e3:.1f} ms, one per epoch {statistics.median(per_epoch) * 1e3:.1f} ms "
          f"(median of {args.epochs} epochs)")


if __name__ == "__main__":
    main()
