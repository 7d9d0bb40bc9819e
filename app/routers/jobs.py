"""Job records: GET /jobs, GET /jobs/{id}, POST /jobs/{id}/cancel."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response

from worker.jobs import CANCELED, QUEUED, TERMINAL

from ..deps import JobDep, StoreDep
from ..job_view import job_view
from ..schemas import AnyJob, EvaluationJob, GenerationJob, JobList, JobStatus
from ..validate import check_query

router = APIRouter(prefix="/jobs", tags=["jobs"])
_404 = {404: {"description": "no such job (or not a job id)"}}


@router.get("", response_model=JobList)
def list_jobs(request: Request, store: StoreDep,
              limit: Annotated[int, Query(ge=1, le=100, description="most jobs to return",
                                          openapi_examples={"ten": {"value": 10}})] = 20,
              status: Annotated[JobStatus | None, Query(description="only jobs in this status",
                                                        openapi_examples={"running": {"value": "running"}})] = None,
              ) -> JobList:
    """Recent jobs of both types (generation, evaluation), newest first."""
    check_query(request, ("limit", "status"))  # ?stauts=failed would otherwise list every job
    return JobList(jobs=[job_view(r, store) for r in store.recent(limit, status)])


@router.get("/{job_id}", response_model=AnyJob, responses=_404)
def get_job(job: JobDep, store: StoreDep) -> GenerationJob | EvaluationJob:
    """One job of either type: status, progress, queue position, timings, echoed input, output URLs, error."""
    return job_view(job, store)


@router.post("/{job_id}/cancel", response_model=AnyJob, responses={
    **_404, 200: {"description": "canceled (it was still queued)"},
    202: {"description": "cancel requested; the worker stops at its next sampler or training step"},
    409: {"description": "the job has already finished"}})
def cancel_job(job: JobDep, store: StoreDep, response: Response) -> GenerationJob | EvaluationJob:
    """Cancel a job: at once while queued, between two sampler (or training) steps while running."""
    if job["status"] in TERMINAL:
        raise HTTPException(409, f"job is {job['status']}; nothing to cancel")
    record = store.request_cancel(job["id"])
    # It may have changed since it was read: expired (an unconfirmed record, app.submit) or finished meanwhile.
    if record is None:
        raise HTTPException(404, "no such job")
    if record["status"] in TERMINAL and record["status"] != CANCELED:
        raise HTTPException(409, f"job is {record['status']}; nothing to cancel")
    # 200: canceled while queued.  202: a worker has it and stops at its next sampler step (it may
    # already have stopped by now: decide on what the job was, not on how fast the worker reacted).
    response.status_code = 200 if job["status"] == QUEUED and record["status"] == CANCELED else 202
    return job_view(record, store)
