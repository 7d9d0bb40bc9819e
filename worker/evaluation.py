"""The body of the ``evaluate`` task: an augmentation experiment (``training.evaluate``) run as a job.

Output goes into ``<data dir>/jobs/<id>/``: ``report.json``, ``report.md``, ``accuracy.png``,
``per_class.png`` and ``confusion_<arm>.png`` (see ``training.evaluate_report``). The data set is
the worker's own ``eval_data`` setting, never a path from the request, and the report a client
downloads names files, not server paths. Decoded data and synthetic image sets are cached under
``<data dir>/cache/``, and every finished training run is saved in the job's ``runs/`` folder, so a
job delivered again after a crash samples nothing twice and trains only the runs it had not finished.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from training.evaluate import RUNS_DIR, EvaluationSettings, run_evaluation
from training.evaluate_report import markdown

from .generation import (end_run, job_sampler, not_run, record_canceled, record_failed, start_job,
                         stopped_by_shutdown, superseded, worker_model, write_json)
from .jobs import RUNNING, SUCCEEDED, JobStore
from .progress import JobCanceled, StageProgress, job_hooks
from .stopping import WorkerStopping
from .settings import Settings

log = logging.getLogger(__name__)

# The request keys the worker takes from the API (EvaluationBody); everything else is the server's.
REQUEST_KEYS = ("classifier", "synthetic_per_class", "real_fraction", "epochs", "budget", "seeds", "sampler",
                "steps", "guidance", "guidance_interval", "spacing", "synthetic_seed")


def evaluation_settings(request: dict, settings: Settings) -> EvaluationSettings:
    """The experiment of ``request`` on the server's data set; raises if the worker has none."""
    if settings.eval_data is None:
        raise RuntimeError("evaluation data set not configured on the worker (set DREAMDATA_EVAL_DATA)")
    chosen = {k: request[k] for k in REQUEST_KEYS if k in request}
    # the API resolves every default into the request; one queued before the spacing was a setting was time-spaced
    chosen.setdefault("spacing", "time")
    return EvaluationSettings.from_dict(dict(chosen, data=str(settings.eval_data), checkpoint=str(settings.checkpoint),
                                             sample_batch_size=settings.model_batch,
                                             cache_dir=str(settings.cache_dir)))


def publish(report: dict, out: Path) -> None:
    """Rewrite report.json and report.md with names in place of server paths (the plots hold none).

    report.md links its plots where the API serves them beside it: ``/jobs/{id}/plots/<name>.png`` from
    ``/jobs/{id}/report.md``."""
    s = report["settings"]
    s["data"] = report["data"]["source"] = Path(s["data"]).name
    s["checkpoint"] = Path(s["checkpoint"]).name
    s["cache_dir"] = None
    report["synthetic"]["cache_dir"] = Path(report["synthetic"]["cache_dir"]).name
    files = report["files"]

    def served(f: str) -> str:
        return f"plots/{Path(f).name}"
    links = dict(files, accuracy=served(files["accuracy"]), per_class=served(files["per_class"]),
                 confusion={arm: served(f) for arm, f in files["confusion"].items()})
    (out / files["report_md"]).write_text(markdown(dict(report, files=links)))
    write_json(out / files["report_json"], report)


def plot_names(files: dict) -> list[str]:
    """The PNG files a report wrote, without ``.png``: accuracy, per_class, confusion_<arm> ..."""
    pngs = [files["accuracy"], files["per_class"], *files["confusion"].values()]
    return [Path(f).stem for f in pngs]


def clear_partial_report(out: Path) -> None:
    """Remove what a crashed attempt wrote into ``out``, except its finished training runs (RUNS_DIR)."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.name == RUNS_DIR and p.is_dir():
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def run_evaluation_job(job_id: str, request: dict, *, store: JobStore, settings: Settings,
                       worker: str | None = None) -> dict:
    """Run the experiment of job ``job_id`` into ``<data dir>/jobs/<id>/``; returns a short summary.

    ``request``: the fields of ``app.schemas.EvaluationBody`` (as validated by the API). A job that
    is already finished, canceled or unknown is skipped; one delivered again keeps its finished training
    runs (``training.evaluate`` resumes) and writes its report anew.
    """
    out = settings.jobs_dir / job_id
    rec = start_job(store, job_id, settings, worker)
    if rec is None or rec["status"] != RUNNING:
        return not_run(job_id, rec, out, "evaluation")
    try:
        config = evaluation_settings(request, settings)
        ckpt = worker_model(settings)
        progress = StageProgress(*job_hooks(store, job_id, rec["delivery"]), interval=settings.progress_interval,
                                 time_limit=settings.eval_time_limit, start=rec.get("progress") or 0.0)
        clear_partial_report(out)
        # the generation jobs' batching sampler: on a threads-pool worker the set's batches share model calls with
        # them, padded to the compiled shapes; progress.check stops a batch waiting its turn (or the cache's lock)
        report = run_evaluation(config, out, progress=progress, checkpoint=ckpt, show_bars=False,
                                sample_fn=job_sampler(settings), check=progress.check)
        publish(report, out)
    except JobCanceled:
        return record_canceled(store, job_id, out, rec["delivery"])
    except WorkerStopping:
        return stopped_by_shutdown(store, job_id, rec)
    except Exception as e:
        if record_failed(store, job_id, e, settings.eval_time_limit, settings, rec["delivery"]):
            raise
        log.exception("evaluation %s: this delivery failed, but the job is no longer its run (left as it is)", job_id)
        return superseded(job_id)
    arms = report["arms"]
    output = {"plots": plot_names(report["files"]), "accuracy_mean": {a: arms[a]["accuracy_mean"] for a in arms},
              "delta_mean": report["delta"]["mean"], "seconds": report["seconds"],
              "checkpoint_sha256": report["synthetic"]["checkpoint_sha256"]}
    if not end_run(store, job_id, rec["delivery"], {"status": SUCCEEDED, "finished_at": time.time(),
                                                     "progress": 1.0, "message": "done", "output": output}):
        return superseded(job_id)
    log.info("evaluation %s: %s in %.1f s", job_id, output["accuracy_mean"], report["seconds"])
    return {"id": job_id, "status": SUCCEEDED, "attempts": rec["attempts"], "worker": worker, **output}
