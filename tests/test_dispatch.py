"""kanfarm.dispatch: which runs the distributed commands publish, decided on the store alone."""
from __future__ import annotations

import sqlalchemy as sa

from kanfarm import dispatch
from kanfarm.grids import parse_spec
from kanfarm.submission import submit


def _grid(store, name: str, lrs=(0.01, 0.005, 0.002)) -> list[int]:
    submit(store, parse_spec({"name": name, "datasets": ["digits"], "models": ["mlp"], "depths": ["shallow"],
                              "inits": ["kaiming_normal"], "optimizers": ["adam"], "learning_rates": list(lrs),
                              "seeds": [0], "epochs": 2, "batch_size": 128}))
    return store.run_ids(name)


def test_sweep_publishes_stale_runs_before_marking_them_queued_and_leaves_local_ones(sqlite_store):
    """A message published first finds its run claimable all the same (an expired lease); marking
    first would leave a window where a later sweep skips a queued run whose message was never sent."""
    enqueued, local, healthy = _grid(sqlite_store, "s")
    dispatch.enqueue(sqlite_store, "s", "gpu")
    for run_id in (enqueued, local):
        assert sqlite_store.claim(run_id, "dead", -1) is not None  # the lease has lapsed
    assert sqlite_store.claim(healthy, "alive", 300) is not None
    with sqlite_store._write() as conn:  # a local `run grid` run: never enqueued, no queue noted
        conn.execute(sa.text("UPDATE runs SET queue = NULL WHERE id = :id"), {"id": local})
    seen = []

    def publish(packs, queue, fit):
        seen.append((packs, queue, fit, [sqlite_store.run(i).status for p in packs for i in p]))
        return sum(map(len, packs))

    info = dispatch.sweep(sqlite_store, "s", 1, 0.0, publish)
    assert seen == [([[enqueued]], "gpu", False, ["running"])]
    assert (info["stale"], info["local"], info["published"], info["requeued"]) == (2, 1, 1, 1)
    assert [sqlite_store.run(i).status for i in (enqueued, local, healthy)] == ["queued", "running", "running"]
    seen.clear()
    assert dispatch.sweep(sqlite_store, "s", 1, 0.0, publish)["published"] == 0 and seen == []


def test_requeue_splits_failed_runs_by_attempts_and_notes_each_runs_queue(sqlite_store):
    fresh, once, twice = _grid(sqlite_store, "r")
    for run_id, attempts in ((once, 1), (twice, 2)):
        for n in range(attempts):
            sqlite_store.mark_queued([run_id], fresh_attempts=False)
            sqlite_store.claim(run_id, "w", 300)
            sqlite_store.finish(run_id, "w", "failed", error="boom")
    assert [sqlite_store.run(i).attempts for i in (once, twice)] == [1, 2]
    found = dispatch.requeue(sqlite_store, "r", failed_bound=3, workers_bound=2, queue=None)
    assert (found.queued, found.retried, found.exhausted, found.beyond_workers) == ([], [once, twice], [], [twice])
    assert found.by_queue == {"cpu": [once, twice]}  # never enqueued: the default queue, now noted
    assert [(sqlite_store.run(i).status, sqlite_store.run(i).attempts, sqlite_store.run(i).queue)
            for i in (fresh, once, twice)] == [("pending", 0, None), ("queued", 1, "cpu"), ("queued", 2, "cpu")]
    again = dispatch.requeue(sqlite_store, "r", queue="gpu")
    assert again.queued == [once, twice] and again.retried == [] and again.by_queue == {"gpu": [once, twice]}
    assert sqlite_store.queues([once, twice]) == {once: "gpu", twice: "gpu"}
    bounded = dispatch.requeue(sqlite_store, "r", failed_bound=2)
    assert bounded.retried == [] and bounded.exhausted == []  # none failed now: all queued


def test_enqueue_preview_counts_what_enqueue_then_publishes(sqlite_store):
    ids = _grid(sqlite_store, "p", lrs=(0.01, 0.005))
    sqlite_store.cancel("p")
    bigger = parse_spec({"name": "p", "datasets": ["digits"], "models": ["mlp"], "depths": ["shallow"],
                         "inits": ["kaiming_normal"], "optimizers": ["adam"], "learning_rates": [0.01, 0.001],
                         "seeds": [0], "epochs": 2, "batch_size": 128})
    hashes = {c.normalised_hash() for c in bigger.expand()}
    preview = dispatch.enqueue_preview(sqlite_store, "p", hashes)
    assert preview == {"added": 1, "skipped": 1, "published": 3}  # the new cell, both cancelled ones
    submit(sqlite_store, bigger)
    queued = dispatch.enqueue(sqlite_store, "p", "cpu")
    assert len(queued) == preview["published"] and set(ids) <= set(queued)
    assert set(sqlite_store.queues(queued).values()) == {"cpu"}
    # once queued (their messages perhaps lost), enqueue publishes them again, and the preview says so
    assert dispatch.enqueue_preview(sqlite_store, "p", hashes) == {"added": 0, "skipped": 2, "published": 3}
