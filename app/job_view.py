"""A job record (``worker.jobs``) as the API shows it: URLs, queue position, timings."""
from __future__ import annotations

import time
from datetime import datetime, timezone

import redis

from worker.jobs import EVALUATION, QUEUED, RUNNING, SUCCEEDED, JobStore

from .schemas import EvaluationInput, EvaluationJob, EvaluationOutput, GenerationJob, JobInput, JobOutput, Timings


def job_url(job_id: str) -> str:
    return f"/jobs/{job_id}"


def evaluation_url(job_id: str) -> str:
    return f"/evaluations/{job_id}"


def output_urls(job_id: str, count: int, sha256: str | None = None, precision: str | None = None) -> JobOutput:
    base = job_url(job_id)
    return JobOutput(grid=f"{base}/grid.png", zip=f"{base}/images.zip", manifest=f"{base}/manifest.json",
                     images=f"{base}/images/{{i}}.png", count=count, checkpoint_sha256=sha256, precision=precision)


def evaluation_output(job_id: str, out: dict) -> EvaluationOutput:
    """URLs of the report and of the plots the worker recorded, plus the headline numbers."""
    base = job_url(job_id)
    return EvaluationOutput(report=f"{base}/report.json", report_md=f"{base}/report.md",
                            plots={name: f"{base}/plots/{name}.png" for name in out["plots"]},
                            accuracy_mean=out["accuracy_mean"], delta_mean=out["delta_mean"], seconds=out["seconds"],
                            checkpoint_sha256=out.get("checkpoint_sha256"))


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


def timings(rec: dict, now: float | None = None) -> Timings:
    now = time.time() if now is None else now
    created, started, finished = rec["created_at"], rec.get("started_at"), rec.get("finished_at")
    queued_s = (started or (now if rec["status"] == QUEUED else finished or now)) - created
    run_s = None if started is None else (finished or now) - started
    return Timings(created_at=_dt(created), started_at=_dt(started), finished_at=_dt(finished),
                   queued_seconds=round(max(queued_s, 0.0), 3),
                   run_seconds=None if run_s is None else round(max(run_s, 0.0), 3))


ETA_STALE_S = 30.0  # past its estimate by this long with no new progress (a lost worker, a wait): unknown


def eta_seconds(rec: dict, now: float | None = None) -> float | None:
    """A running job's ``eta_seconds`` as its worker last wrote it, less the time since (``updated_at``); None once
    that has run out by ``ETA_STALE_S`` with no new write."""
    eta = rec.get("eta_seconds")
    if rec["status"] != RUNNING or eta is None:
        return None
    now = time.time() if now is None else now
    left = eta - (now - rec.get("updated_at", now))
    return None if left < -ETA_STALE_S else round(max(left, 0.0), 1)


def _queue_position(store: JobStore, job_id: str) -> int | None:
    """1 = next to start; None where Redis cannot say: a job just sent whose record Redis failed to confirm
    (``app.submit``) must still be answered with its id, not with a 503 that invites a second submission."""
    try:
        return store.queue_position(job_id)
    except redis.exceptions.RedisError:
        return None


def job_view(rec: dict, store: JobStore, report: dict | None = None) -> GenerationJob | EvaluationJob:
    """The public view of one record (asks Redis for the queue position and the cancel flag).

    ``report``: an evaluation's report.json, shown inline (GET /evaluations/{id}).
    """
    job_id, status = rec["id"], rec["status"]
    out = rec.get("output") if status == SUCCEEDED else None
    common = dict(
        id=job_id, status=status, progress=rec.get("progress", 0.0), message=rec.get("message"),
        queue_position=_queue_position(store, job_id) if status == QUEUED else None,
        cancel_requested=status == RUNNING and store.cancel_requested(job_id),
        attempts=rec.get("attempts", 0), timings=timings(rec), error=rec.get("error"))
    if rec.get("type") == EVALUATION:
        return EvaluationJob(**common, url=evaluation_url(job_id), input=EvaluationInput(**rec["request"]),
                             output=evaluation_output(job_id, out) if out else None, report=report)
    return GenerationJob(
        **common, url=job_url(job_id), images_done=rec.get("images_done", 0), images_total=rec["images_total"],
        step=rec.get("step", 0), steps=rec.get("steps", rec["request"]["steps"]), eta_seconds=eta_seconds(rec),
        input=JobInput(**rec["request"]),
        output=output_urls(job_id, out["images"], out.get("checkpoint_sha256"), out.get("precision")) if out else None)
