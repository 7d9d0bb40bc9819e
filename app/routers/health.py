"""Liveness and readiness: GET /healthz, GET /readyz."""
from __future__ import annotations

import logging
import threading

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..deps import CeleryDep, SettingsDep, StoreDep
from ..schemas import Health, Readiness

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
_ping_lock = threading.Lock()  # one broadcast at a time; replies go to a shared reply queue


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
    try:
        with _ping_lock:
            replies = celery.control.ping(timeout=settings.ping_timeout) or []
    except Exception:
        log.exception("worker ping failed")
        replies = []
    workers = sorted(name for reply in replies for name in reply)
    body = Readiness(status="ready" if workers else "not ready", broker="ok", workers=workers, queued=queued)
    return JSONResponse(body.model_dump(), status_code=200 if workers else 503)
