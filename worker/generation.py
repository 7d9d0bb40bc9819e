"""The body of the ``generate`` task: a plain function, run by the worker and by tests without a broker.

Output goes through :func:`training.generate.generate_to_dir` (the layout of ``dreamdata sample``)
into ``<data dir>/jobs/<id>/``, plus ``result.json``. A job delivered again after a crash finds
the images of its finished batches on disk and skips them; image i always has seed base + i,
so the finished job holds the same images as an uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch
from celery.exceptions import SoftTimeLimitExceeded

from diffusion.checkpoint import Checkpoint, load_for_sampling
from diffusion.precision import compile_for_sampling, default_device
from diffusion.spec import SamplerSettings, requested_precision
from training.generate import generate_to_dir, resolve_class, tmp_path

from .batching import BatchingSampler
from .jobs import ACTIVE, CANCELED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobStore
from .progress import JobCanceled, ProgressReporter, job_hooks
from .stopping import WorkerStopping
from .settings import Settings

log = logging.getLogger(__name__)
_load_lock = threading.Lock()  # the threads pool: concurrent first jobs load the model once


@lru_cache(maxsize=2)
def _load(path: str, compile_mode: str = "off", precision: str = "auto") -> Checkpoint:
    device = default_device()
    t0 = time.perf_counter()
    ckpt = load_for_sampling(path, device=device, precision=precision)  # decides bf16 / fp32 and the layout
    log.info("loaded %s on %s in %.1f s (sha256 %s); precision %s", path, device, time.perf_counter() - t0,
             ckpt.sha256[:12], ckpt.precision.reason)
    if compile_mode != "off":
        # Compiles lazily, on the first call of each batch shape; job_sampler pads batches to few shapes.
        # Guided and unguided calls differ in batch (2n vs n), so allow twice the padded sizes before
        # dynamo's recompile limit (8 by default) would silently fall back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        ckpt = replace(ckpt, model=compile_for_sampling(ckpt.model, compile_mode))
        log.info("model wrapped in torch.compile(mode=%s); each new batch shape compiles on first use", compile_mode)
    return ckpt


def model_for(path: str | Path, threads: int | None = None, compile_mode: str = "off",
              precision: str | None = None) -> Checkpoint:
    """The checkpoint at ``path``, loaded once per process (cached by resolved path, compile mode and precision).

    ``threads``: torch CPU threads for this process (None: leave torch's default).
    ``compile_mode``: ``off`` or a ``torch.compile`` mode (``Settings.compile``).
    ``precision``: ``auto``, ``fp32`` or ``bf16`` (``Settings.precision``, ``diffusion.precision``; None:
    ``$DREAMDATA_PRECISION`` or auto).
    """
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {p} (set DREAMDATA_CHECKPOINT or --checkpoint)")
    with _load_lock:
        return _load(str(p.resolve()), compile_mode, requested_precision(precision))


@lru_cache(maxsize=1)
def batcher_for(max_batch: int, window: float, pad: bool = False) -> BatchingSampler:
    """The process-wide sampler every job of this worker goes through (merges concurrent jobs' batches)."""
    return BatchingSampler(max_batch=max_batch, window=window, pad=pad)


def job_sampler(settings: Settings) -> BatchingSampler:
    return batcher_for(settings.model_batch, settings.batch_window if settings.batching else 0.0,
                       pad=settings.compile != "off")


def worker_model(settings: Settings) -> Checkpoint:
    """The model this worker's jobs use, as its settings say (path, CPU threads, compile mode)."""
    return model_for(settings.checkpoint, settings.torch_threads, settings.compile, settings.precision)


SUPERSEDED = "superseded"  # a delivery's result when another delivery has taken the job over (not a job status)


def end_run(store: JobStore, job_id: str, delivery: str | None, fields: dict | Callable[[dict], dict]) -> bool:
    """Apply a running job's status change ``fields`` (a dict, or a function of the old record) only while the job
    is still this ``delivery``'s run. False, and nothing changed, when it is not running, or when another delivery
    has started it since (this one outlived its worker's shutdown and its message was restored meanwhile): that
    run decides how the job ends."""
    mine = [False]

    def apply(old: dict) -> dict:
        mine[0] = old.get("delivery") == delivery
        return (fields(old) if callable(fields) else fields) if mine[0] else {}

    store.transition(job_id, (RUNNING,), apply)
    return mine[0]


def superseded(job_id: str) -> dict:
    log.info("job %s is no longer this delivery's run (another delivery has it, or it ended); left as it is",
             job_id)
    return {"id": job_id, "status": SUPERSEDED}


def record_canceled(store: JobStore, job_id: str, out: Path, delivery: str | None) -> dict:
    """A run stopped by its cancel flag: mark the job canceled, drop the partial output."""
    if not end_run(store, job_id, delivery, {"status": CANCELED, "finished_at": time.time()}):
        return superseded(job_id)  # the folder is the other run's now
    shutil.rmtree(out, ignore_errors=True)
    log.info("job %s canceled", job_id)
    return {"id": job_id, "status": CANCELED}


def record_requeued(store: JobStore, job_id: str, delivery: str | None) -> bool:
    """A run stopped by its worker's cold shutdown: the job is queued again, and this delivery is not counted
    against ``max_attempts`` (a planned stop is no crash). Its files stay, so the next delivery resumes.

    Only while the record is still this ``delivery``'s run: True, and the caller puts the message back
    (``worker.tasks``). False when another delivery has started it since: that run is left alone, and this
    message just ends."""
    mine = end_run(store, job_id, delivery, lambda old: {
        "status": QUEUED, "attempts": max(old["attempts"] - 1, 0), "delivery": None, "worker": None})
    if mine:
        log.info("job %s: the worker is shutting down; back in the queue", job_id)
    else:
        log.info("job %s: the worker is shutting down; the job is no longer this delivery's run", job_id)
    return mine


def stopped_by_shutdown(store: JobStore, job_id: str, rec: dict) -> dict:
    """The ``except WorkerStopping`` of a task body: raise it again if the job went back to the queue (the task
    then puts its message back), else this delivery's result (another delivery has the job)."""
    if record_requeued(store, job_id, rec.get("delivery")):
        raise WorkerStopping()
    return {"id": job_id, "status": SUPERSEDED}


def not_run(job_id: str, rec: dict | None, out: Path, what: str) -> dict:
    """A delivery that ``start_job`` did not turn into a run (the job is finished, canceled, unknown, or another
    delivery's).

    A canceled job keeps no files: a cancel asked for while its worker was down is applied here, at the
    next delivery, after that worker had written some (as :func:`record_canceled` drops them)."""
    status = rec["status"] if rec else "skipped"
    if status == CANCELED:
        shutil.rmtree(out, ignore_errors=True)
    log.info("%s %s not run: %s", what, job_id, status)
    return {"id": job_id, "status": status}


def record_failed(store: JobStore, job_id: str, exc: BaseException, time_limit: int,
                  settings: Settings | None = None, delivery: str | None = None) -> bool:
    """A run that raised: mark the job failed with the message a user sees (the caller re-raises; the worker's
    log keeps the whole traceback).  False when the job is another delivery's run now, or no longer running
    (:func:`end_run`): the caller then logs the error and leaves the job as it is. True also when the record is
    gone (a Redis that lost its data): there is no other run to leave it to, so the task fails as it should."""
    hide = server_paths(settings) if settings is not None else ()
    return end_run(store, job_id, delivery, {"status": FAILED, "finished_at": time.time(),
                                             "error": describe(exc, time_limit, hide)}) or store.get(job_id) is None


def server_paths(settings: Settings) -> list[Path]:
    """The worker's folders and files that an error message may name: the API shows their names only."""
    paths = [settings.data_dir, settings.checkpoint] + ([settings.eval_data] if settings.eval_data else [])
    return paths + [p.resolve() for p in paths]


def describe(exc: BaseException, time_limit: int, hide: Iterable[Path] = ()) -> str:
    """The error message a user sees on a failed job (``time_limit``: the job's soft limit, seconds), each of
    ``hide`` named by its last part (no server paths in what the API serves)."""
    if isinstance(exc, SoftTimeLimitExceeded):
        return f"time limit of {time_limit} s exceeded"
    message = f"{type(exc).__name__}: {exc}"
    for path in sorted({str(p) for p in hide if str(p) not in ("", ".")}, key=len, reverse=True):
        message = message.replace(path, Path(path).name or path)
    return message


def start_job(store: JobStore, job_id: str, settings: Settings, worker: str | None) -> dict | None:
    """queued/running -> running (or canceled, or failed after too many deliveries).

    Returns the record as it is now (None for an unknown job; status ``superseded`` when another delivery started
    it between this start and the read that follows); run only if it says running.
    """
    delivery = uuid.uuid4().hex  # marks this delivery's start, so a retried start is not counted twice

    def fields(old: dict) -> dict:
        now = time.time()
        if old["status"] == RUNNING and old.get("delivery") == delivery:  # our own start, whose reply was lost
            return {}
        if store.cancel_requested(job_id):
            return {"status": CANCELED, "finished_at": now}
        if old["attempts"] >= settings.max_attempts:
            return {"status": FAILED, "finished_at": now,
                    "error": f"gave up after {old['attempts']} attempts (the worker was lost each time)"}
        # started_at: the first start (queued_seconds is the wait for it; run_seconds spans every delivery)
        return {"status": RUNNING, "started_at": old.get("started_at") or now, "attempts": old["attempts"] + 1,
                "worker": worker, "eta_seconds": None,
                "delivery": delivery}

    store.transition(job_id, ACTIVE, fields)  # not applied to a finished job: it stays as it is
    rec = store.get(job_id)
    if rec is not None and rec["status"] == RUNNING and rec.get("delivery") != delivery:
        # another delivery started it between our start and this read: its run, not ours
        return dict(rec, status=SUPERSEDED)
    return rec


def run_generation(job_id: str, request: dict, *, store: JobStore, settings: Settings,
                   worker: str | None = None) -> dict:
    """Generate the images of job ``job_id`` into ``<data dir>/jobs/<id>/``; returns result.json's content.

    ``request``: {"classes": {name: n, ...}, "sampler", "steps", "guidance", "guidance_interval", "spacing", "seed"} (as
    validated by the API). A job that is already finished, canceled or unknown is skipped.
    """
    out = settings.jobs_dir / job_id
    rec = start_job(store, job_id, settings, worker)
    if rec is None or rec["status"] != RUNNING:
        return not_run(job_id, rec, out, "job")
    try:
        ckpt = worker_model(settings)
        counts = [(resolve_class(name, ckpt.class_names), int(n)) for name, n in request["classes"].items()]
        # a job queued before guidance intervals existed has none: guided at every step, as it was asked
        # and one queued before the spacing was a setting: steps evenly spaced in time
        sampler = SamplerSettings(request["sampler"], int(request["steps"]), float(request["guidance"]),
                                  guidance_interval=request.get("guidance_interval"),
                                  spacing=request.get("spacing", "time"))
        reporter = ProgressReporter(*job_hooks(store, job_id, rec["delivery"]),
                                    batch_size=settings.model_batch, interval=settings.progress_interval,
                                    time_limit=settings.job_time_limit, start=rec.get("progress") or 0.0)
        manifest = generate_to_dir(ckpt, counts, out, settings=sampler, base_seed=int(request["seed"]),
                                   batch_size=settings.model_batch, make_zip=True, progress=reporter,
                                   sample_fn=job_sampler(settings), check=reporter.check)
    except JobCanceled:
        return record_canceled(store, job_id, out, rec["delivery"])
    except WorkerStopping:
        return stopped_by_shutdown(store, job_id, rec)
    except Exception as e:
        if record_failed(store, job_id, e, settings.job_time_limit, settings, rec["delivery"]):
            raise
        log.exception("job %s: this delivery failed, but the job is no longer its run (left as it is)", job_id)
        return superseded(job_id)
    total = len(manifest["images"])
    result = {
        "id": job_id, "status": SUCCEEDED, "input": request, "images": total,
        "checkpoint": manifest["checkpoint"], "seconds": manifest["seconds"], "precision": manifest["precision"],
        "attempts": rec["attempts"], "worker": worker,
        "files": {"grid": "grid.png", "zip": "images.zip", "manifest": "manifest.json",
                  "images": "images/{i:05d}.png"},
    }
    write_json(out / "result.json", result)
    if not end_run(store, job_id, rec["delivery"], {
            "status": SUCCEEDED, "finished_at": time.time(), "images_done": total, "step": sampler.steps,
            "progress": 1.0, "output": {"images": total, "seconds": manifest["seconds"],
                                        "checkpoint_sha256": ckpt.sha256, "precision": manifest["precision"]}}):
        return superseded(job_id)
    log.info("job %s: %d images in %.1f s", job_id, total, manifest["seconds"])
    return result


def write_json(path: Path, obj: dict) -> None:
    tmp = tmp_path(path)
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)
