"""Dynamic batching: concurrent sampling calls with the same settings share one model call per step.

A worker that runs several jobs at once (``--pool threads --concurrency N``) gives every job's
``generate_to_dir`` the process-wide :class:`BatchingSampler` as its ``sample_fn``. Each call
becomes a request in a queue; one engine thread takes the oldest request, waits ``window``
seconds for others to arrive, merges every queued request with the same model and sampler
settings (up to ``max_batch`` images) into one :func:`diffusion.samplers.sample` call, and hands
each caller its own rows. Noise comes from one generator per image seed and every image's
update is row-wise, so an image is the same whichever batch it lands in, up to float rounding (tested: a
convolution may sum in another order at another batch size, so a pixel may rarely round to the next level).

The callers' progress callbacks run on the engine thread after each step. One that raises
(a canceled job) or a caller that stops waiting (a soft time limit) drops out: its caller gets
the exception, the batch goes on for the others, and stops early only when nobody is left.

With ``pad=True`` (the worker does this when the model is compiled) every merged batch is padded
to a power of two, capped at ``max_batch``, by repeating its last image's label and seed; the
extra rows are dropped. A compiled model (or a CUDA graph) then sees at most ceil(log2(max_batch)) + 1
batch sizes, and a guided sampler's twice-as-large calls add at most two more shapes, each compiled once,
instead of one per job size.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from diffusion.samplers import sample

log = logging.getLogger(__name__)


class _Abandoned(Exception):
    """Raised inside a merged run when every request in it has dropped out."""


@dataclass(eq=False)
class _Request:
    model: torch.nn.Module
    schedule: object
    labels: torch.Tensor
    seeds: list[int]
    options: dict
    progress: Callable[[int, int], None] | None
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None
    abandoned: bool = False   # the caller stopped waiting; nobody reads the result

    @property
    def key(self) -> tuple:
        """Requests with equal keys can share a batch."""
        return (id(self.model), id(self.schedule), tuple(sorted(self.options.items())))

    @property
    def live(self) -> bool:
        return not self.abandoned and self.error is None

    def finish(self, result: torch.Tensor | None = None, error: BaseException | None = None) -> None:
        if self.error is None:
            self.result, self.error = result, error
        self.done.set()


@dataclass
class BatchStats:
    """What the engine did (for tests, logs and benchmarks)."""
    batches: int = 0
    requests: int = 0
    images: int = 0
    largest: int = 0
    padded: int = 0   # rows added by padding (computed, then dropped)


def padded_size(n: int, max_batch: int) -> int:
    """The batch size ``n`` images are padded to: the next power of two, capped at ``max_batch``
    (never below ``n``: a single request larger than ``max_batch`` runs unpadded)."""
    if n >= max_batch:
        return n
    return min(1 << (n - 1).bit_length(), max_batch)


class BatchingSampler:
    """A thread-safe drop-in for :func:`diffusion.samplers.sample` that merges concurrent calls.

    ``max_batch``: most images in one merged call (a single larger request still runs, alone).
    ``window``: seconds the engine waits after the first request of a batch for others to join;
    requests that arrive while a batch runs join the next one, so under load no time is lost.
    ``pad``: pad each model batch to :func:`padded_size` (few distinct shapes, for a compiled model).
    """

    def __init__(self, *, max_batch: int = 100, window: float = 0.02, sample_fn: Callable = sample,
                 pad: bool = False):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch, self.window, self.sample_fn, self.pad = max_batch, window, sample_fn, pad
        self.stats = BatchStats()
        self._queue: deque[_Request] = deque()
        self._cv = threading.Condition()
        self._engine: threading.Thread | None = None

    def __call__(self, model, schedule, labels: torch.Tensor, seeds: Sequence[int], *,
                 progress: Callable[[int, int], None] | None = None,
                 check: Callable[[], None] | None = None, **options) -> torch.Tensor:
        """``sample(model, schedule, labels, seeds, progress=..., **options)``, merged with concurrent calls.
        ``check()``, called every half second while the request waits (its turn, or its batch), may raise to stop
        waiting (a job canceled or out of time): the request's rows are then dropped."""
        if len(labels) != len(seeds):
            raise ValueError(f"{len(labels)} labels but {len(seeds)} seeds")
        req = _Request(model, schedule, labels.detach().cpu(), [int(s) for s in seeds], options, progress)
        with self._cv:
            self._queue.append(req)
            self._start_engine()
            self._cv.notify_all()
        try:
            while not req.done.wait(0.5):  # short waits: a signal (soft time limit) can interrupt them
                if check is not None:
                    check()
        except BaseException:
            req.abandoned = True  # e.g. SoftTimeLimitExceeded in this thread: the engine drops the rows
            raise
        if req.error is not None:
            raise req.error
        return req.result

    # ------------------------------------------------------------------ engine

    def _start_engine(self) -> None:
        if self._engine is None or not self._engine.is_alive():
            self._engine = threading.Thread(target=self._run, name="dreamdata-batcher", daemon=True)
            self._engine.start()

    def _take_batch(self) -> list[_Request]:
        """Wait for work, then the oldest request and every compatible one queued within the window."""
        with self._cv:
            while not self._queue:
                self._cv.wait()
            first = self._queue[0]
        if self.window > 0:
            time.sleep(self.window)
        with self._cv:
            batch, size = [], 0
            for req in list(self._queue):
                if req.key != first.key:
                    continue
                n = len(req.seeds)
                if batch and size + n > self.max_batch:
                    break
                batch.append(req)
                size += n
                self._queue.remove(req)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            batch = [r for r in batch if not r.abandoned]
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: list[_Request]) -> None:
        first = batch[0]
        labels = torch.cat([r.labels for r in batch])
        seeds = [s for r in batch for s in r.seeds]

        def progress(step: int, steps: int) -> None:
            for r in batch:
                if r.live and r.progress is not None:
                    try:
                        r.progress(step, steps)
                    except Exception as e:  # this caller drops out (canceled); the others go on
                        r.finish(error=e)
            if not any(r.live for r in batch):
                raise _Abandoned()

        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.images += len(seeds)
        self.stats.largest = max(self.stats.largest, len(seeds))
        if len(batch) > 1:
            log.info("batching %d requests, %d images", len(batch), len(seeds))
        extra = padded_size(len(seeds), self.max_batch) - len(seeds) if self.pad else 0
        if extra:
            labels = torch.cat([labels, labels[-1:].expand(extra)])
            seeds = seeds + [seeds[-1]] * extra
            self.stats.padded += extra
        try:
            x = self.sample_fn(first.model, first.schedule, labels, seeds, progress=progress, **first.options)
        except _Abandoned:
            for r in batch:
                r.finish()  # each already holds its error, or nobody waits for it
            return
        except BaseException as e:  # a failed model call fails every request in it
            for r in batch:
                r.finish(error=e)
            return
        start = 0
        for r in batch:
            n = len(r.seeds)
            r.finish(result=x[start: start + n])
            start += n
