"""docker-compose.yml and Dockerfile, checked by parsing (no docker engine is needed)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

# the test extra brings PyYAML: skipped without it, except under CI=true, where it must be there
yaml = __import__("yaml") if os.environ.get("CI", "").lower() == "true" else pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # merges the x- anchors


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _workers(services):
    return {name: s for name, s in services.items() if "worker" in name and isinstance(s.get("command"), list)
            and s["command"][:1] == ["worker"]}


def test_services_present(services):
    assert {"redis", "postgres", "migrate", "gpu-worker-0", "cpu-worker", "flower"} <= services.keys()


def test_a_sweeper_gives_dead_workers_runs_back(services):
    """Without it a run whose worker was killed waits for the broker's visibility timeout (12 h)."""
    sweeper = services["sweeper"]
    assert sweeper["command"][:2] == ["sweep", "--every"] and 10 <= float(sweeper["command"][2]) <= 600
    assert sweeper["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert {"KANFARM_BROKER_URL", "KANFARM_DATABASE_URL"} <= sweeper["environment"].keys()
    assert sweeper["restart"] == "unless-stopped" and sweeper["init"] is True


def test_redis_health_and_no_eviction(services):
    redis = services["redis"]
    assert "noeviction" in " ".join(redis["command"])
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])


def test_postgres_health_check_uses_loopback(services):
    test = " ".join(services["postgres"]["healthcheck"]["test"])
    assert "pg_isready" in test and "-h 127.0.0.1" in test


def test_migrate_is_one_shot_db_upgrade(services):
    migrate = services["migrate"]
    assert migrate["command"] == ["db", "upgrade"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate.get("restart") in ("no", None)


def test_workers_wait_for_services_and_migration(services):
    workers = _workers(services)
    assert {"gpu-worker-0", "cpu-worker"} <= workers.keys()
    for name, worker in workers.items():
        deps = worker["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name
        assert deps["postgres"]["condition"] == "service_healthy", name
        env = worker["environment"]
        for key in ("KANFARM_BROKER_URL", "KANFARM_DATABASE_URL", "KANFARM_CHECKPOINT_DIR"):
            assert key in env, (name, key)
        # the renamed variable reaches the worker, which refuses it, instead of being dropped unsaid
        assert env["KANFARM_PACK_CHECKPOINT_SECONDS"] == "${KANFARM_PACK_CHECKPOINT_SECONDS:-}", name
        assert env["KANFARM_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert any(v.endswith(":" + env["KANFARM_CHECKPOINT_DIR"]) for v in worker["volumes"]), name
        assert f"compile-cache:{env['TORCHINDUCTOR_CACHE_DIR']}" in worker["volumes"], name
        assert worker["stop_signal"] == "SIGTERM" and worker["init"] is True, name
        grace = re.fullmatch(r"(\d+)(s|m|h)", worker["stop_grace_period"])
        assert grace and int(grace[1]) * {"s": 1, "m": 60, "h": 3600}[grace[2]] >= 120, name


def test_gpu_worker_reserves_its_gpu(services):
    gpu = services["gpu-worker-0"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert gpu["command"][:3] == ["worker", "--gpus", "0"]
    assert "gpu" in gpu["command"][gpu["command"].index("--queues") + 1].split(",")


def test_one_service_per_gpu_is_an_anchor_away(compose):
    """x-gpu-worker holds everything but the reservation, so another GPU is a short service:
    ``<<: *gpu-worker`` plus its deploy block."""
    text = (ROOT / "docker-compose.yml").read_text()
    assert "x-gpu-worker: &gpu-worker" in text and "<<: *gpu-worker" in text
    gpu0 = dict(compose["services"]["gpu-worker-0"])
    gpu0.pop("deploy")
    assert gpu0 == compose["x-gpu-worker"]
    assert compose["x-gpu-worker"]["image"] != compose["services"]["cpu-worker"]["image"]  # CUDA torch


def test_cpu_worker_scales(services):
    cpu = services["cpu-worker"]
    assert "container_name" not in cpu and "ports" not in cpu  # both would break --scale
    assert "deploy" not in cpu or "devices" not in str(cpu["deploy"])
    assert cpu["command"][:1] == ["worker"] and "cpu" in cpu["command"]


def test_flower_and_shared_checkpoints(compose, services):
    flower = services["flower"]
    assert "flower" in flower["command"] or "flower" in flower.get("entrypoint", [])
    assert all(p.startswith("127.0.0.1:") for p in flower.get("ports", []))
    assert set(flower["environment"]) == {"KANFARM_BROKER_URL", "KANFARM_VISIBILITY_TIMEOUT"}  # no database password
    assert "checkpoints" in compose["volumes"]


def test_no_credentials_in_clear(services):
    """Passwords come from the environment (.env), with a default only for a local machine."""
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key:
                assert str(value).startswith("${"), (name, key)


def test_dockerfile_entrypoint_and_torch_choice():
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["kanfarm"]' in text
    assert "ARG TORCH_INDEX_URL" in text and "--index-url" in text
    assert re.search(r"pip install .*\.\[monitor\]", text)  # flower
    assert "USER " in text
