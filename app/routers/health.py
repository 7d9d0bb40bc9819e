"""Liveness and readiness: GET /healthz, GET /readyz."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from worker.celery_app import worker_names

from ..deps import CeleryDep, SettingsDep, StoreDep
from ..schemas import Health, Readiness

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


class _SharedPing:
    """One worker ping at a time per broker, its answer shared by every /readyz that arrived while it ran.

    A ping waits its whole timeout for replies, and replies go to one reply queue, so pings must not overlap.
    Callers used to queue for a ping each, so n concurrent /readyz calls held API threads for n timeouts, and
    past the thread pool's 40 every other route waited too."""

    def __init__(self):
        self._cond = threading.Condition()
        self._running: set[str] = set()          # brokers with a ping in flight
        self._answers: dict[str, list[str]] = {}  # broker -> worker names of its last ping
        self._finished: dict[str, int] = {}       # broker -> pings finished (a waiter waits for the next one)

    def workers(self, broker: str, ping: Callable[[], list | None]) -> list[str]:
        with self._cond:
            if broker in self._running:  # join the ping in flight: its answer, even if another has started since
                target = self._finished.get(broker, 0) + 1
                self._cond.wait_for(lambda: self._finished.get(broker, 0) >= target)
                return self._answers.get(broker, [])
            self._running.add(broker)
        names: list[str] = []
        try:
            names = worker_names(ping())
        except Exception:
            log.exception("worker ping failed")
        finally:
            with self._cond:
                self._answers[broker] = names
                self._finished[broker] = self._finished.get(broker, 0) + 1
                self._running.discard(broker)
                self._cond.notify_all()
        return names


_pings = _SharedPing()


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The API process is up (says nothing about Redis or workers)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness,
                                                                 "description": "no broker or no worker"}})
def readyz(settings: SettingsDep, store: StoreDep, celery: CeleryDep) -> JSONResponse:
    """Ready when Redis answers and at least one worker answers a ping (503 otherwise)."""
    try:
        store.r.ping()
        queued = store.queued_count()
    except Exception as e:
        body = Readiness(status="not ready", broker=f"unreachable: {type(e).__name__}", workers=[])
        return JSONResponse(body.model_dump(), status_code=503)
    workers = _pings.workers(settings.redis_url, lambda: celery.control.ping(timeout=settings.ping_timeout))
    body = Readiness(status="ready" if workers else "not ready", broker="ok", workers=workers, queued=queued)
    return JSONResponse(body.model_dump(), status_code=200 if workers else 503)
