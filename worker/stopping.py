"""A worker's cold shutdown, as its running jobs see it (torch-free: the worker's main process imports it).

``worker.tasks`` sets :data:`STOPPING` when this process's worker begins a cold shutdown; a running job's next
check (``worker.progress``) then raises :class:`WorkerStopping`, and the job goes back to the queue. The jobs of a
threads pool run in this process, and Celery cannot cancel a thread.
"""
from __future__ import annotations

import threading

STOPPING = threading.Event()


class WorkerStopping(Exception):
    """Raised from a running job's checks once its worker has begun a cold shutdown: the job goes back to the
    queue (``worker.generation.record_requeued``) and resumes, finished batches kept, on the next worker."""
