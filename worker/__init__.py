"""dreamdata worker: the Celery app, its tasks, job records in Redis, and the local launcher.

Torch-free on import: ``settings``, ``jobs``, ``progress`` and ``celery_app`` are shared with the
API (``app``), which must never import torch; only ``generation`` (run inside the task) does.
"""
