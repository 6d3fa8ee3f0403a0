"""The Celery application: a Redis queue of run ids in front of the database.

The database is the source of truth (claims, leases, epoch rows); the broker only says "try run
N". So messages carry run ids and nothing else, no task result is ever stored in Redis, and a
message delivered twice is harmless (the second claim fails and is a logged no-op).

Configured from the environment so one image serves every machine:

- ``KANFARM_BROKER_URL`` (default ``redis://localhost:6379/0``)
- ``KANFARM_VISIBILITY_TIMEOUT`` seconds (default 12 h): Redis re-delivers an unacked message
  after this long, so it must exceed the longest run or a healthy run gets a twin delivery.
- ``KANFARM_DATABASE_URL``, ``KANFARM_CHECKPOINT_DIR``, ``KANFARM_DEVICE``,
  ``KANFARM_LEASE_SECONDS``, ``KANFARM_MAX_ATTEMPTS``: read by :mod:`workers.tasks`.
"""
from __future__ import annotations

import os

from celery import Celery
from kombu import Queue

BROKER_ENV = "KANFARM_BROKER_URL"
DEFAULT_BROKER_URL = "redis://localhost:6379/0"
VISIBILITY_ENV = "KANFARM_VISIBILITY_TIMEOUT"
DEFAULT_VISIBILITY_S = 12 * 3600
QUEUES = ("gpu", "cpu")
DEFAULT_QUEUE = "cpu"
TASK_NAME = "kanfarm.execute_run"


def broker_url(url: str | None = None) -> str:
    return url or os.environ.get(BROKER_ENV) or DEFAULT_BROKER_URL


def visibility_timeout() -> int:
    from kanfarm.config import ConfigError
    from kanfarm.settings import env_number

    value = env_number(VISIBILITY_ENV, DEFAULT_VISIBILITY_S, unit="seconds")
    if value < 1:  # Redis counts whole seconds
        raise ConfigError(VISIBILITY_ENV, f"{value!r} must be at least 1 second")
    return int(value)


def settings(url: str | None = None) -> dict:
    """Celery settings; each one is here for the crash-safety story in docs/distributed.md."""
    return {
        "broker_url": broker_url(url),
        "broker_connection_retry_on_startup": True,
        # Redis redelivers unacked messages after this; longer than any run (see module doc).
        "broker_transport_options": {"visibility_timeout": visibility_timeout()},
        # JSON only: a pickle payload from the broker would be code execution on the worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        # Results live in the database; nothing is written back to Redis.
        "result_backend": None,
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        # Ack after the run ends, so a worker dying mid-run leaves its message to be redelivered.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One run at a time per worker process: no message waits behind an hours-long run.
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        # solo: the run trains in the worker's own process, so CUDA is never initialised before a
        # fork and Celery's warm-shutdown signal reaches the training loop directly.
        "worker_pool": "solo",
        "task_queues": [Queue(name, routing_key=name) for name in QUEUES],
        "task_default_queue": DEFAULT_QUEUE,
        "task_create_missing_queues": False,
        # Flower reads task events.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
    }


def make_app(url: str | None = None) -> Celery:
    """A Celery app on broker ``url`` (default from the environment); the task is registered by
    importing :mod:`workers.tasks` (the worker does that through ``include``)."""
    app = Celery("kanfarm", include=["workers.tasks"])
    app.conf.update(settings(url))
    return app


app = make_app()
