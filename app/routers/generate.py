"""POST /generate: validate at the edge, record the job (queued), send it to the worker by task name."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Request, Response

from diffusion.spec import (DEFAULT_SETTINGS, SAMPLER_LIST, SamplerName, Spacing, format_guidance_interval,
                            request_defaults)
from worker.celery_app import TASK_GENERATE
from worker.jobs import new_job_id, new_record

from ..catalog import model_info
from ..deps import CeleryDep, SettingsDep, StoreDep
from ..job_view import job_url, job_view
from ..schemas import CLASS_HELP, GUIDANCE_INTERVAL_HELP, SPACING_HELP, STEPS_HELP, GenerateBody, GenerationJob
from ..submit import submit
from ..validate import check_query, resolve_request

router = APIRouter(tags=["generate"])

_BODY_EXAMPLES = {
    "two classes": {"summary": "50 cats and 50 dogs, fixed seed",
                    "value": {"classes": {"cat": 50, "dog": 50}, **request_defaults(), "seed": 0}},
    "by index": {"summary": "classes by index, other settings default", "value": {"classes": {"0": 10, "9": 10}}},
}


@router.post("/generate", status_code=202, response_model=GenerationJob, responses={
    202: {"description": "queued; poll the URL in the Location header",
          "headers": {"Location": {"description": "/jobs/<id>", "schema": {"type": "string"}}}},
    422: {"description": "a field is invalid; `detail[].loc` names it"},
    413: {"description": "the body is over 64 KiB"},
    429: {"description": "the queue is full; retry later"},
    503: {"description": "Redis or the checkpoint is unavailable"}})
def generate(
    request: Request, response: Response, settings: SettingsDep, store: StoreDep, celery: CeleryDep,
    class_: Annotated[str | None, Query(alias="class", description=f"{CLASS_HELP}, or 'all'",
                                        openapi_examples={"cat": {"value": "cat"}, "index": {"value": "3"}})] = None,
    n: Annotated[int | None, Query(description="images per class (default 10)",
                                   openapi_examples={"hundred": {"value": 100}})] = None,
    sampler: Annotated[SamplerName | None, Query(
        description=f"{SAMPLER_LIST} (default {DEFAULT_SETTINGS.sampler})",
        openapi_examples={"default": {"value": DEFAULT_SETTINGS.sampler}})] = None,
    steps: Annotated[int | None, Query(description=f"{STEPS_HELP} (default {DEFAULT_SETTINGS.steps})",
                                       openapi_examples={"default": {"value": DEFAULT_SETTINGS.steps}})] = None,
    guidance: Annotated[float | None, Query(description=f"guidance scale 0-20 (default {DEFAULT_SETTINGS.guidance:g})",
                                            openapi_examples={"default": {"value": DEFAULT_SETTINGS.guidance}})] = None,
    guidance_interval: Annotated[str | None, Query(
        description=f"{GUIDANCE_INTERVAL_HELP}, e.g. 0.28,2.9 "
                    f"(default {format_guidance_interval(DEFAULT_SETTINGS.guidance_interval)})",
        openapi_examples={"default": {"value": format_guidance_interval(DEFAULT_SETTINGS.guidance_interval)},
                          "every step": {"value": "all"}})] = None,
    spacing: Annotated[Spacing | None, Query(
        description=f"{SPACING_HELP} (default {DEFAULT_SETTINGS.spacing})",
        openapi_examples={"default": {"value": DEFAULT_SETTINGS.spacing}, "logsnr": {"value": "logsnr"}})] = None,
    seed: Annotated[int | None, Query(description="base seed 0..2^31-1; image i gets seed + i (default: drawn)",
                                      openapi_examples={"zero": {"value": 0}})] = None,
    body: Annotated[GenerateBody | None, Body(openapi_examples=_BODY_EXAMPLES)] = None,
) -> GenerationJob:
    """Queue a generation job: ``?class=cat&n=100``, or a JSON body for several classes at once."""
    query = {"class": class_, "n": n, "sampler": sampler, "steps": steps, "guidance": guidance,
             "guidance_interval": guidance_interval, "spacing": spacing, "seed": seed}
    check_query(request, tuple(query))
    job_input = resolve_request(query, body, model_info(settings.checkpoint), settings)
    total = sum(job_input["classes"].values())
    record = submit(new_record(new_job_id(), job_input, total, job_input["steps"]), TASK_GENERATE, store, celery,
                    settings)
    response.headers["Location"] = job_url(record["id"])
    return job_view(record, store)
