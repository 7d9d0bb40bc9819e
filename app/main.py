"""The dreamdata HTTP API: ``create_app()`` builds it (``uvicorn app.main:create_app --factory``).

Importing this module reads no settings and never imports torch (a test checks): work goes to
the worker by Celery task name, and model facts come from the checkpoint's config.json.
"""
from __future__ import annotations

import logging
import math

import redis
from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError

from .catalog import CheckpointMissing
from .deps import require_api_key
from .routers import evaluations, files, generate, health, jobs, models

log = logging.getLogger(__name__)

DESCRIPTION = """On-demand synthetic images from a class-conditional DDPM.

`POST /generate?class=cat&n=100` queues a job and answers 202 with its URL; poll `GET /jobs/{id}`
until `status` is `succeeded`, then fetch `grid.png`, `images/{i}.png`, `images.zip` or
`manifest.json`. Image i of a job has seed `seed + i`: the same request gives the same images.

`POST /evaluations` queues an augmentation experiment on the server's data set: classifiers trained on
real, real+synthetic and synthetic images, tested on real data. `GET /evaluations/{id}` shows its
progress and, once it succeeded, the report; `report.json`, `report.md` and the plots are files of the job.

When the service has an API key, send it in the `X-API-Key` header.
"""

TAGS = [
    {"name": "generate", "description": "queue generation jobs"},
    {"name": "evaluations", "description": "queue augmentation experiments, read their reports"},
    {"name": "jobs", "description": "job status, progress and cancellation (both types)"},
    {"name": "files", "description": "a finished job's images, report and plots"},
    {"name": "models", "description": "the model and its classes"},
    {"name": "health", "description": "liveness and readiness probes"},
]


async def _store_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("job store unreachable: %s", exc)
    return JSONResponse({"detail": f"job store (Redis) unreachable: {type(exc).__name__}"}, status_code=503)


def json_safe(value: object) -> object:
    """``value`` with every NaN or infinite float, which JSON cannot hold, as its string ('nan', 'inf')."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own 422, except that a NaN or infinite input is echoed as a string, and a body of bytes that
    are not UTF-8 as text: the default handler cannot encode either, so ``guidance=nan`` would be a 500."""
    text = {bytes: lambda b: b.decode("utf-8", "replace")}  # a body that is not JSON, echoed as the input
    return JSONResponse({"detail": json_safe(jsonable_encoder(exc.errors(), custom_encoder=text))}, status_code=422)


async def _no_checkpoint(request: Request, exc: CheckpointMissing) -> JSONResponse:
    log.warning("%s", exc)  # the whole path for the operator; the client gets the checkpoint's name
    return JSONResponse({"detail": exc.public()}, status_code=503)


GUARDED_RESPONSES: dict[int | str, dict] = {
    401: {"description": "the service has an API key, and the X-API-Key header is missing or wrong"},
    403: {"description": "the service has no API key and the client is not on its machine (loopback)"}}

# The largest request body read (bytes). The biggest real ones, a generation or evaluation request in JSON,
# are under 1 KiB; without a limit a body of any size was read and parsed before the API key was checked.
MAX_BODY_BYTES = 64 * 1024


def create_app() -> FastAPI:
    """The FastAPI application: routers, API-key guard, error handlers, a cap on request bodies (413)."""
    app = FastAPI(title="dreamdata", version="0.1.0", description=DESCRIPTION, openapi_tags=TAGS,
                  max_body_size=MAX_BODY_BYTES)
    guarded = [Depends(require_api_key)]
    for module in (generate, evaluations, jobs, files, models):
        app.include_router(module.router, dependencies=guarded, responses=GUARDED_RESPONSES)
    app.include_router(health.router)
    app.add_exception_handler(redis.exceptions.ConnectionError, _store_down)
    app.add_exception_handler(redis.exceptions.TimeoutError, _store_down)
    app.add_exception_handler(OperationalError, _store_down)
    app.add_exception_handler(CheckpointMissing, _no_checkpoint)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    return app
