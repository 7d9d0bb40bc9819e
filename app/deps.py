"""Dependencies shared by the routers: settings, job store, Celery client, API key, job lookup."""
from __future__ import annotations

import secrets
from functools import lru_cache
from typing import Annotated

from celery import Celery
from fastapi import Depends, HTTPException, Path, Request, Security
from fastapi.security import APIKeyHeader

from worker.celery_app import celery_for
from worker.jobs import JobStore, connect, is_job_id
from worker.settings import Settings, get_settings, is_loopback

SettingsDep = Annotated[Settings, Depends(get_settings)]


@lru_cache(maxsize=8)
def _store(url: str, prefix: str, keep: int) -> JobStore:
    return JobStore(connect(url), prefix, keep)


def get_store(settings: SettingsDep) -> JobStore:
    """The job-record store for the configured Redis (one connection pool per URL)."""
    return _store(settings.redis_url, settings.key_prefix, settings.keep_jobs)


def get_celery(settings: SettingsDep) -> Celery:
    """The Celery client that sends tasks by name (no task code, no torch)."""
    return celery_for(settings)


StoreDep = Annotated[JobStore, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]

_api_key = APIKeyHeader(name="X-API-Key", auto_error=False,
                        description="needed when the service has an API key (DREAMDATA_API_KEY)")


NO_KEY_REMOTE = ("this service has no API key, so it answers only clients on its own machine (loopback); its "
                 "operator can set DREAMDATA_API_KEY, or DREAMDATA_ALLOW_PUBLIC=1 when something else guards it")


def require_api_key(request: Request, settings: SettingsDep,
                    key: Annotated[str | None, Security(_api_key)] = None) -> None:
    """401 unless the X-API-Key header matches the configured key.

    No key configured: 403 unless ``allow_public`` or the request is local, whether the API was started by
    ``dreamdata api`` (which refuses a non-loopback host) or by ``uvicorn app.main:create_app --factory --host
    0.0.0.0``. Local means the connecting socket's peer is a loopback address and the request carries none of
    ``FORWARDING_HEADERS`` (``Forwarded``, ``X-Forwarded-For``, ``X-Real-IP``, ``Via`` ...): a request through a
    proxy that adds one, or over a Unix socket (no peer address), comes from elsewhere. A proxy or forwarder on
    this machine that adds none (nginx's plain ``proxy_pass``, ssh -R, socat) makes its clients local: guard
    such a setup with a key."""
    if settings.api_key is None:
        if settings.allow_public or _local(request):
            return
        raise HTTPException(403, NO_KEY_REMOTE)
    expected = settings.api_key.get_secret_value().encode()
    if key is None or not secrets.compare_digest(key.encode(), expected):
        raise HTTPException(401, "missing or wrong X-API-Key header", headers={"WWW-Authenticate": "APIKey"})


# Headers by which a proxy names the client it forwards (or itself): any of them makes a request non-local.
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip", "via", "true-client-ip", "cf-connecting-ip")


def _local(request: Request) -> bool:
    forwarded = any(h in request.headers for h in FORWARDING_HEADERS)
    return request.client is not None and is_loopback(request.client.host) and not forwarded


JobId = Annotated[str, Path(description="job id: 32 lowercase hex digits (uuid4)",
                            examples=["3f2b8c9d0e1f4a5b8c7d6e5f4a3b2c1d"])]


def get_job(job_id: JobId, store: StoreDep) -> dict:
    """The job record; 404 for an unknown id and for anything that is not a job id (never a path)."""
    record = store.get(job_id) if is_job_id(job_id) else None
    if record is None:
        raise HTTPException(404, "no such job")
    return record


JobDep = Annotated[dict, Depends(get_job)]
