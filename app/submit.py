"""Submit a job: record it (queued) in Redis, then send it to the worker by Celery task name."""
from __future__ import annotations

import logging

from celery import Celery
from fastapi import HTTPException

from worker.jobs import JobStore, QueueFull
from worker.settings import Settings

log = logging.getLogger(__name__)


def submit(record: dict, task: str, store: JobStore, celery: Celery, settings: Settings) -> dict:
    """Queue ``record``'s job as task ``task``; 429 when the queue is full, 503 when the broker is gone.

    Returns the stored record. The message carries only the job id and its request.
    """
    job_id = record["id"]
    try:
        store.create(record, settings.max_queued)
    except QueueFull as e:
        raise HTTPException(429, str(e), headers={"Retry-After": "30"}) from None
    try:
        celery.send_task(task, kwargs={"job_id": job_id, "request": record["request"]}, task_id=job_id,
                         queue=settings.queue)
    except Exception as e:  # the broker went away between the record and the message: leave no orphan
        log.exception("could not enqueue job %s", job_id)
        store.forget(job_id)
        raise HTTPException(503, f"could not enqueue the job ({type(e).__name__}); try again") from None
    return store.get(job_id)
