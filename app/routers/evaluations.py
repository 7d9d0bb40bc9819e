"""POST /evaluations, GET /evaluations/{id}: augmentation experiments as jobs on the worker.

The data set is the server's (``DREAMDATA_EVAL_DATA``); a client chooses the experiment, never a
path. Files (report.json, report.md, plots) are served by the job file routes (``files.py``).
"""
from __future__ import annotations

import json
import logging
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Request, Response

from worker.celery_app import TASK_EVALUATE
from worker.jobs import EVALUATION, SUCCEEDED, new_job_id, new_record

from diffusion.spec import request_defaults

from ..catalog import model_info
from ..deps import CeleryDep, JobDep, SettingsDep, StoreDep
from ..job_view import evaluation_url, job_view
from ..schemas import EvaluationBody, EvaluationJob
from ..submit import submit
from ..validate import check_query, resolve_evaluation
from .files import job_file

log = logging.getLogger(__name__)
router = APIRouter(prefix="/evaluations", tags=["evaluations"])
NOT_CONFIGURED = "evaluation data set not configured (set DREAMDATA_EVAL_DATA on the server)"

_BODY_EXAMPLES = {
    "quick": {"summary": "an MLP, 500 synthetic images per class, 10% of the real data, 3 seeds",
              "value": {"classifier": "mlp", "synthetic_per_class": 500, "real_fraction": 0.1, "epochs": 10,
                        "seeds": [0, 1, 2]}},
    "full": {"summary": "every setting", "value": {
        "classifier": "cnn", "synthetic_per_class": 1000, "real_fraction": 0.2, "epochs": 20, "budget": "steps",
        "seeds": [0, 1, 2, 3, 4],
        **request_defaults(), "synthetic_seed": 0}},
    "defaults": {"summary": "every setting at its default (cnn, k=500, f=0.1, 10 epochs, seeds 0-2)", "value": {}},
}


@router.post("", status_code=202, response_model=EvaluationJob, responses={
    202: {"description": "queued; poll the URL in the Location header",
          "headers": {"Location": {"description": "/evaluations/<id>", "schema": {"type": "string"}}}},
    422: {"description": "a field is invalid; `detail[].loc` names it"},
    413: {"description": "the body is over 64 KiB"},
    429: {"description": "the queue is full; retry later"},
    503: {"description": "no evaluation data set configured, or Redis or the checkpoint is unavailable"}})
def create_evaluation(request: Request, response: Response, settings: SettingsDep, store: StoreDep,
                      celery: CeleryDep,
                      body: Annotated[EvaluationBody, Body(openapi_examples=_BODY_EXAMPLES)]) -> EvaluationJob:
    """Queue an augmentation experiment: real, real+synthetic and synthetic-only classifiers, tested on real data."""
    check_query(request, ())  # the settings are the body's: a query would be silently ignored
    if settings.eval_data is None:
        raise HTTPException(503, NOT_CONFIGURED)
    info = model_info(settings.checkpoint)
    job_input = resolve_evaluation(body, info)
    images = job_input["synthetic_per_class"] * len(info.class_names)
    record = new_record(new_job_id(), job_input, images, job_input["steps"], job_type=EVALUATION)
    record = submit(record, TASK_EVALUATE, store, celery, settings)
    response.headers["Location"] = evaluation_url(record["id"])
    return job_view(record, store)


@router.get("/{job_id}", response_model=EvaluationJob, responses={
    404: {"description": "no such job, or it is not an evaluation"}})
def get_evaluation(job: JobDep, store: StoreDep, settings: SettingsDep) -> EvaluationJob:
    """One evaluation: status, progress and stage, input, output URLs; report.json inline once it succeeded."""
    if job.get("type") != EVALUATION:
        raise HTTPException(404, "no such evaluation")
    report = None
    if job["status"] == SUCCEEDED:
        try:
            report = json.loads(job_file(settings, job, "report.json").read_text())
        except (HTTPException, OSError, json.JSONDecodeError) as e:  # the record outlived its files
            log.warning("evaluation %s: no readable report.json (%s)", job["id"], e)
    return job_view(job, store, report=report)
