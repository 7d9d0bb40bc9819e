"""Progress of a running job: throttled writes to its record, and the cancel check between steps.

``ProgressReporter`` is the callback of a generation job (``generate_to_dir``), ``StageProgress``
that of an evaluation job (``run_evaluation``: a fraction and a message saying what runs now).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from celery.exceptions import SoftTimeLimitExceeded

from training.generate import progress_fraction as fraction  # the share of a job's images finished

from .jobs import TRANSIENT, JobStore, transient
from .stopping import STOPPING, WorkerStopping

log = logging.getLogger(__name__)


def job_hooks(store: JobStore, job_id: str, delivery: str | None = None,
              ) -> tuple[Callable[..., None], Callable[[], bool]]:
    """The ``write(**fields)`` and ``is_canceled()`` of a running job's progress callback.

    ``delivery``: the run's delivery id (``worker.generation.start_job``); its writes then land only while the
    job is running as that delivery (``JobStore.update``).

    Both outlive a Redis that is briefly unreachable (or read-only, mid-failover): a progress write is then
    dropped and the cancel flag read as not set (each logged), so the job goes on; its final status change
    retries instead (``JobStore.retry_for``).
    """
    def write(**fields: Any) -> None:
        try:
            store.update(job_id, delivery, **fields)
        except TRANSIENT as e:
            if not transient(e):
                raise
            log.warning("job %s: progress not written, Redis unreachable (%s)", job_id, type(e).__name__)

    def is_canceled() -> bool:
        try:
            return store.cancel_requested(job_id)
        except TRANSIENT as e:
            if not transient(e):
                raise
            log.warning("job %s: cancel flag not read, Redis unreachable (%s)", job_id, type(e).__name__)
            return False

    return write, is_canceled


class JobCanceled(Exception):
    """Raised from the progress callback when the job's cancel flag is set."""


class _JobChecks:
    """What every job's callback checks, in this order: its cancel flag (a job canceled while its worker stops
    is canceled, not queued again), its worker stopping, its time limit."""
    is_canceled: Callable[[], bool]
    deadline: float | None
    clock: Callable[[], float]

    def check(self) -> None:
        """Raise if the job must stop now (JobCanceled, WorkerStopping, SoftTimeLimitExceeded); also called while
        a job waits for its turn in a shared batch (``worker.batching``)."""
        if self.is_canceled():
            raise JobCanceled()
        if STOPPING.is_set():
            raise WorkerStopping()
        if self.deadline is not None and self.clock() > self.deadline:
            raise SoftTimeLimitExceeded()


class ProgressReporter(_JobChecks):
    """The ``progress(done, total, step, steps)`` callback that ``generate_to_dir`` calls.

    Called after every sampler step and after every batch. It raises as soon as :meth:`check` does (the
    worker stopping, the job canceled, its time up), so a job stops between two steps, and writes
    progress through ``write(**fields)`` at most once per ``interval`` seconds (plus the last
    call of a job), so a progress bar moves without flooding Redis. Each write carries ``eta_seconds``: what the
    job still needs at this run's rate so far (the API counts it down from the write's ``updated_at``).
    ``start``: the progress already reported (a job delivered again, whose earlier attempt had reached part of
    a batch that this one samples again), below which the reported progress does not go back.
    """

    def __init__(self, write: Callable[..., None], is_canceled: Callable[[], bool], *,
                 batch_size: int,
                 interval: float = 0.5,
                 time_limit: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 start: float = 0.0):
        self.write, self.is_canceled = write, is_canceled
        self.batch_size, self.interval, self.clock = batch_size, interval, clock
        self.deadline = None if time_limit is None else clock() + time_limit
        self.last: float | None = None
        self.best = 0.0  # this run's progress so far (its rate, for the ETA)
        self.floor = min(max(start, 0.0), 1.0)  # reported progress never goes back, also across deliveries
        self.since: tuple[float, float] | None = None  # (time, progress) of this run's first call: its rate's origin
        self.writes = 0

    def __call__(self, done: int, total: int, step: int, steps: int) -> None:
        self.check()
        now = self.clock()
        p = fraction(done, total, step, steps, self.batch_size)
        if self.since is None:  # images an earlier attempt left on disk count as done, not toward the rate
            self.since = (now, p)
        finished = done >= total
        if not finished and self.last is not None and now - self.last < self.interval:
            return
        self.last = now
        self.writes += 1
        self.best = max(self.best, p)
        self.write(images_done=done, images_total=total, step=step, steps=steps,
                   progress=max(self.best, self.floor), eta_seconds=self.eta(now))

    def eta(self, now: float) -> float | None:
        """Seconds this run still needs at its rate so far; None for its first second (nothing measured yet).
        Called by ``__call__``, after its first call has set ``since``."""
        t0, p0 = self.since
        if self.best >= 1:
            return 0.0
        if now - t0 < 1.0 or self.best <= p0:
            return None
        return round((now - t0) * (1 - self.best) / (self.best - p0), 1)


class StageProgress(_JobChecks):
    """The ``progress(fraction, message)`` callback that ``training.evaluate.run_evaluation`` calls.

    Raises as soon as :meth:`check` does (every call: between two sampler or training steps; the job
    canceled, its ``time_limit`` seconds passed, its worker stopping), and writes ``progress`` and ``message``
    through ``write(**fields)`` at most once per ``interval`` seconds, plus the final call (fraction 1).
    ``start``: the progress already reported (a job delivered again), below which it does not go back while
    the resumed run reloads its data.
    """

    def __init__(self, write: Callable[..., None], is_canceled: Callable[[], bool], *,
                 interval: float = 0.5,
                 time_limit: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 start: float = 0.0):
        self.write, self.is_canceled = write, is_canceled
        self.interval, self.clock = interval, clock
        self.deadline = None if time_limit is None else clock() + time_limit
        self.last: float | None = None
        self.best = min(max(start, 0.0), 1.0)  # reported progress never goes back
        self.writes = 0

    def __call__(self, fraction: float, message: str) -> None:
        self.check()
        now = self.clock()
        if fraction < 1 and self.last is not None and now - self.last < self.interval:
            return
        self.last = now
        self.writes += 1
        self.best = max(self.best, round(min(max(fraction, 0.0), 1.0), 4))
        self.write(progress=self.best, message=message)
