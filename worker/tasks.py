"""Celery tasks, registered by name; the API sends them with ``send_task`` and never imports this.

The task bodies are :func:`worker.generation.run_generation` and
:func:`worker.evaluation.run_evaluation_job` (imported when a task runs, so the worker's main
process stays torch-free and its pool children load torch after the fork).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import lru_cache

from celery import Task, shared_task
from celery.exceptions import Reject, TimeLimitExceeded
from celery.signals import worker_process_init, worker_ready

from .celery_app import TASK_EVALUATE, TASK_GENERATE
from .jobs import ACTIVE, FAILED, JobStore, connect, prune_cache, prune_job_dirs
from .settings import Settings, get_settings
from .stopping import STOPPING, WorkerStopping

log = logging.getLogger(__name__)


# Seconds a job's status change is tried again while Redis is unreachable (a restart, a failover): a job that
# finished meanwhile must not stay "running" for ever.
STATUS_RETRY_S = 60.0
ON_FAILURE_RETRY_S = 5.0


@lru_cache(maxsize=4)
def job_store(settings: Settings) -> JobStore:
    """The job-record store of this process (redis-py reconnects after a fork)."""
    return JobStore(connect(settings.redis_url), settings.key_prefix, settings.keep_jobs, retry_for=STATUS_RETRY_S)


class JobTask(Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        """Mark the record failed if the body could not (a hard time limit kills the pool child)."""
        job_id = kwargs.get("job_id") or (args[0] if args else task_id)
        settings = get_settings()
        if isinstance(exc, TimeLimitExceeded):
            limit = settings.eval_hard_time_limit if self.name == TASK_EVALUATE else settings.hard_time_limit
            error = f"hard time limit of {limit} s exceeded"
        else:
            error = f"{type(exc).__name__}: {exc}"
        # a hard limit runs this in the worker's main process, which must not stall for a minute on Redis
        job_store(settings).transition(job_id, ACTIVE, {"status": FAILED, "finished_at": time.time(), "error": error},
                                       retry_for=ON_FAILURE_RETRY_S)


@shared_task(name=TASK_GENERATE, bind=True, base=JobTask)
def generate(self: Task, job_id: str, request: dict) -> dict:
    """Generate the images of one job (see ``run_generation``)."""
    from .generation import run_generation

    return _run_job(self, run_generation, job_id, request)


@shared_task(name=TASK_EVALUATE, bind=True, base=JobTask)
def evaluate(self: Task, job_id: str, request: dict) -> dict:
    """Run the augmentation experiment of one job (see ``run_evaluation_job``)."""
    from .evaluation import run_evaluation_job

    return _run_job(self, run_evaluation_job, job_id, request)


def _run_job(task: Task, body: Callable[..., dict], job_id: str, request: dict) -> dict:
    """A task body run with this process's settings and store: a job its worker's cold shutdown stopped goes back
    to the queue (``Reject(requeue=True)``), and expired job folders and cache entries are pruned after."""
    settings = get_settings()
    try:
        return body(job_id, request, store=job_store(settings), settings=settings, worker=task.request.hostname)
    except WorkerStopping:
        raise Reject("the worker is shutting down; the job goes back to the queue", requeue=True) from None
    finally:
        prune_expired(settings)


PRUNE_EVERY_S = 3600.0
_pruned_at = [float("-inf")]


def prune_expired(settings: Settings) -> list[str]:
    """Delete the folders of jobs whose records expired (``DREAMDATA_KEEP_JOBS``), and the cached data and
    synthetic sets unused for ``DREAMDATA_KEEP_CACHE`` (never one an evaluation may still be using), at most
    once an hour per process: after jobs, and as a prefork pool process starts.  Returns the ids of the deleted
    job folders.  Never raises (a job's outcome does not depend on it)."""
    if time.monotonic() - _pruned_at[0] < PRUNE_EVERY_S or STOPPING.is_set():  # not in a shutdown's short wait
        return []
    _pruned_at[0] = time.monotonic()
    removed: list[str] = []
    try:
        removed = prune_job_dirs(settings.jobs_dir, job_store(settings))
    except Exception:
        log.exception("could not delete expired job folders")
    if removed:
        log.info("deleted the folders of %d expired jobs", len(removed))
    try:
        unused_for = settings.keep_cache and max(settings.keep_cache, settings.eval_hard_time_limit)
        cached = prune_cache(settings.cache_dir, unused_for)
    except Exception:
        log.exception("could not prune the cache")
        cached = []
    if cached:
        log.info("deleted %d cache entries unused for %d s: %s", len(cached), unused_for, ", ".join(cached))
    return removed


@worker_process_init.connect
def _warm_up(**_: object) -> None:
    """Load the model in every new pool process, before its first job."""
    try:
        from .generation import worker_model

        worker_model(get_settings())
    except Exception:  # the job will fail with the same, clearer error; keep the worker up
        log.exception("could not load the checkpoint at start-up")
    prune_expired(get_settings())


@worker_ready.connect
def _requeue_on_cold_shutdown(sender: object = None, **_: object) -> None:
    """Every cold shutdown (SIGQUIT; SIGTERM with ``REMAP_SIGTERM=SIGQUIT``, as in docker-compose.yml; a second
    Ctrl-C) goes through the worker's ``wait_for_soft_shutdown``: wrapped here to set ``STOPPING`` first, so the
    jobs running in this process stop at their next check and go back to the queue (``WorkerStopping``) while
    Celery waits, instead of lingering until the visibility timeout: Celery cannot cancel a thread of the
    threads pool (it raises NotImplementedError). A prefork pool's jobs run in child processes, which Celery
    terminates after the wait and requeues itself (``task_reject_on_worker_lost``)."""
    controller = getattr(sender, "controller", None)  # worker_ready's sender is the consumer
    original = getattr(controller, "wait_for_soft_shutdown", None)
    if original is None:
        log.warning("no worker to hook: running jobs will not be requeued at a cold shutdown")
        return

    def stop_jobs_then_wait() -> None:
        STOPPING.set()
        original()

    controller.wait_for_soft_shutdown = stop_jobs_then_wait
