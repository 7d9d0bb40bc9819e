"""The Celery app: Redis broker and result backend, configured for crash-safe long jobs.

The API sends tasks by name (``TASK_GENERATE``, ``TASK_EVALUATE``) through :func:`celery_for`, so it never imports
the task code (or torch). The worker runs ``celery_for(get_settings())``; ``celery -A
worker.celery_app worker`` finds the same app as the module attribute ``app``.

Crash safety: a task is acknowledged only when it returns (``task_acks_late``), a pool child
that dies puts its task back (``task_reject_on_worker_lost``), a worker takes one task at a
time (``worker_prefetch_multiplier=1``), and a task whose whole worker died (kill -9, lost
host) is delivered again once ``visibility_timeout`` has passed; that is longer than the longest
hard time limit (evaluations have their own, longer one), so a live job is never delivered twice.
"""
from __future__ import annotations

from functools import lru_cache

from celery import Celery

from .settings import Settings, get_settings

TASK_GENERATE = "dreamdata.generate"
TASK_EVALUATE = "dreamdata.evaluate"
SOFT_SHUTDOWN_S = 10.0


def celery_config(s: Settings) -> dict:
    """Celery settings derived from ours (all in one place so API and worker agree)."""
    return {
        "broker_url": s.redis_url,
        "result_backend": s.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": s.effective_visibility_timeout,
            "unacked_restore_interval": 2,   # look for abandoned tasks every 2 s ...
            "unacked_restore_throttle": 1,   # ... (one ZRANGE; cheap)
            "socket_connect_timeout": 2,
        },
        "result_backend_transport_options": {"socket_connect_timeout": 2},
        "result_expires": 24 * 3600,
        "task_default_queue": s.queue,
        "task_routes": {TASK_GENERATE: {"queue": s.queue}, TASK_EVALUATE: {"queue": s.queue}},
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_soft_time_limit": s.job_time_limit,
        "task_time_limit": s.hard_time_limit,
        # read by the worker when it registers the task (the message carries no limits)
        "task_annotations": {TASK_EVALUATE: {"soft_time_limit": s.eval_time_limit,
                                             "time_limit": s.eval_hard_time_limit}},
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.2,
                                      "interval_max": 0.5},
        "worker_prefetch_multiplier": 1,
        # Cold shutdown (SIGQUIT; SIGTERM too with REMAP_SIGTERM=SIGQUIT, as in docker-compose.yml): a prefork
        # pool's running job gets this long to finish, then goes back to the queue and resumes elsewhere; a
        # threads pool's jobs go back at their next check (worker.tasks._requeue_on_cold_shutdown).
        "worker_soft_shutdown_timeout": SOFT_SHUTDOWN_S,
        "worker_proc_alive_timeout": 120,    # a pool child imports torch and loads the model first
        "worker_hijack_root_logger": False,
    }


def worker_names(replies: list[dict] | None) -> list[str]:
    """The node names in ``control.ping`` replies (``[{name: {"ok": "pong"}}, ...]``), sorted."""
    return sorted(name for reply in replies or [] for name in reply)


@lru_cache(maxsize=8)
def celery_for(settings: Settings) -> Celery:
    """One Celery app per distinct settings (cached), with the task module included for workers."""
    app = Celery("dreamdata", include=["worker.tasks"])
    app.conf.update(celery_config(settings))
    return app


def __getattr__(name: str) -> Celery:
    # ``celery -A worker.celery_app`` looks up ``app``; built on first use, not at import.
    if name in ("app", "celery"):
        return celery_for(get_settings())
    raise AttributeError(name)
