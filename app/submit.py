"""Submit a job: record it (queued) in Redis, then send it to the worker by Celery task name."""
from __future__ import annotations

import logging

import redis
from celery import Celery
from fastapi import HTTPException

from worker.jobs import PENDING_TTL, JobStore, QueueFull
from worker.settings import Settings

log = logging.getLogger(__name__)


def submit(record: dict, task: str, store: JobStore, celery: Celery, settings: Settings) -> dict:
    """Queue ``record``'s job as task ``task``; 429 when the queue is full, 503 when the broker is gone.

    Returns the stored record. The message carries only the job id and its request. The record is stored
    first, to expire unless its message is sent (``JobStore.create``): a job whose message never reaches the
    broker leaves no queued record behind, even when this process dies between the two.
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
        try:
            store.forget(job_id)
        except redis.exceptions.RedisError:  # the same Redis is gone: the record expires by itself
            log.warning("could not forget job %s; its record expires in %d s", job_id, PENDING_TTL)
        raise HTTPException(503, f"could not enqueue the job ({type(e).__name__}); try again") from None
    try:
        store.confirm(job_id)
        return store.get(job_id) or record
    except redis.exceptions.RedisError:
        # Sent, then Redis failed: the worker's start keeps the record, so the job runs unless it waits longer
        # than PENDING_TTL in the queue; the client still learns its id.
        log.warning("job %s sent, but its record could not be confirmed (it expires in %d s unless the job "
                    "starts first)", job_id, PENDING_TTL, exc_info=True)
        return record
