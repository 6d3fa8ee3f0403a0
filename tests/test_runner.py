"""The runner's wiring of a claimed run to the store: a worker that lost its lease writes nothing more."""
from __future__ import annotations

import sqlalchemy as sa

from kanfarm.config import RunConfig
from kanfarm.runner import execute_run


def test_worker_whose_run_was_taken_over_writes_no_more_rows(sqlite_store, tmp_path, monkeypatch):
    monkeypatch.setenv("KANFARM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    store = sqlite_store
    config = RunConfig(dataset="digits", model="mlp", depth="shallow", batch_size=256, max_epochs=4)
    store.submit_grid("g", {}, [(config, 1000, None)])
    run_id = store.run_ids()[0]
    seen = []

    def take_over_after_epoch_1(rid, record):
        seen.append(record.epoch)
        if record.epoch == 1:  # w1 "paused" past its lease: the lease expires and w2 claims the run
            with store.engine.begin() as conn:
                conn.execute(sa.text("UPDATE runs SET lease_expires_at = '2000-01-01 00:00:00' WHERE id = :i"),
                             {"i": rid})
            assert store.claim(rid, "w2", 600) is not None

    outcome = execute_run(store, run_id, "w1", lease_s=600, on_epoch=take_over_after_epoch_1)
    assert outcome.status == "stopped"
    assert seen == [0, 1]
    assert [row["epoch"] for row in store.epoch_metrics(run_id)] == [0, 1]
    run = store.run(run_id)
    assert (run.status, run.worker, run.attempts) == ("running", "w2", 2)  # w1 left w2's claim alone
