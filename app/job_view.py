"""A job record (``worker.jobs``) as the API shows it: URLs, queue position, timings."""
from __future__ import annotations

import time
from datetime import datetime, timezone

from worker.jobs import QUEUED, RUNNING, SUCCEEDED, JobStore

from .schemas import Job, JobInput, JobOutput, Timings


def job_url(job_id: str) -> str:
    return f"/jobs/{job_id}"


def output_urls(job_id: str, count: int, sha256: str | None = None) -> JobOutput:
    base = job_url(job_id)
    return JobOutput(grid=f"{base}/grid.png", zip=f"{base}/images.zip", manifest=f"{base}/manifest.json",
                     images=f"{base}/images/{{i}}.png", count=count, checkpoint_sha256=sha256)


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


def job_view(rec: dict, store: JobStore) -> Job:
    """The public view of one record (asks Redis for the queue position and the cancel flag)."""
    job_id, status = rec["id"], rec["status"]
    out = rec.get("output")
    return Job(
        id=job_id, url=job_url(job_id), type=rec.get("type", "generation"), status=status,
        progress=rec.get("progress", 0.0), images_done=rec.get("images_done", 0), images_total=rec["images_total"],
        step=rec.get("step", 0), steps=rec.get("steps", rec["request"]["steps"]),
        queue_position=store.queue_position(job_id) if status == QUEUED else None,
        cancel_requested=status == RUNNING and store.cancel_requested(job_id),
        attempts=rec.get("attempts", 0), timings=timings(rec), input=JobInput(**rec["request"]),
        output=output_urls(job_id, out["images"], out.get("checkpoint_sha256")) if status == SUCCEEDED and out
        else None,
        error=rec.get("error"),
    )
