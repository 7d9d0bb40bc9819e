"""Evaluation jobs: POST /evaluations -> Redis -> a `dreamdata worker` process -> report, plots and JSON served back.

The worker trains on the tiny 10-class data set of ``conftest.eval_data`` (6 train + 3 test
images per class) with synthetic images from the width-8 checkpoint: a few seconds per job.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import get_args
from urllib.parse import urljoin

import pytest

from app.schemas import BudgetName, ClassifierName
from diffusion.spec import DEFAULT_SETTINGS
from worker.celery_app import TASK_EVALUATE, celery_for
from worker.evaluation import run_evaluation_job
from worker.jobs import JobStore, connect, new_job_id, new_record
from worker.progress import JobCanceled, StageProgress

from .conftest import client_for
from .service_testlib import png_pixels, poll_job

QUICK = {"classifier": "mlp", "synthetic_per_class": 2, "real_fraction": 1, "epochs": 1, "seeds": [0, 1],
         "sampler": "dpmpp", "steps": 2}
ARMS = ["real", "real+synthetic", "synthetic"]
PLOTS = ["accuracy", "per_class", "confusion_real", "confusion_real_synthetic", "confusion_synthetic"]


@pytest.fixture(scope="module")
def idle(make_settings):
    """An API whose queue no worker reads: jobs stay queued."""
    tag = uuid.uuid4().hex[:8]
    with client_for(make_settings(queue=f"idle-{tag}", key_prefix=f"idle-{tag}")) as c:
        yield c


@pytest.mark.parametrize("body, loc, word", [
    ({"classifier": "svm"}, ["body", "classifier"], "mlp"),
    ({"synthetic_per_class": 5001}, ["body", "synthetic_per_class"], "5000"),
    ({"synthetic_per_class": 0}, ["body", "synthetic_per_class"], "1"),
    ({"real_fraction": 0}, ["body", "real_fraction"], "0"),
    ({"real_fraction": 1.5}, ["body", "real_fraction"], "1"),
    ({"epochs": 0}, ["body", "epochs"], "1"),
    ({"epochs": 201}, ["body", "epochs"], "200"),
    ({"seeds": []}, ["body", "seeds"], "1 item"),
    ({"seeds": list(range(11))}, ["body", "seeds"], "10 items"),
    ({"seeds": [1, 1]}, ["body", "seeds"], "distinct"),
    ({"seeds": [-1]}, ["body", "seeds", 0], "0"),
    ({"sampler": "euler"}, ["body", "sampler"], "dpmpp"),
    ({"sampler": "dpmpp", "steps": 101}, ["body", "steps"], "1..100"),
    ({"guidance": 21}, ["body", "guidance"], "20"),
    ({"spacing": "uniform"}, ["body", "spacing"], "'logsnr'"),
    ({"data": "/etc/passwd"}, ["body", "data"], "not permitted"),      # no path from a client
    ({"checkpoint": "/tmp/other"}, ["body", "checkpoint"], "not permitted"),
])
def test_bad_input_is_422_naming_the_field(idle, body, loc, word):
    r = idle.post("/evaluations", json=dict(QUICK, **body))
    assert r.status_code == 422, r.text
    errors = [e for e in r.json()["detail"] if e["loc"] == loc]
    assert errors and word in " ".join(e["msg"] for e in errors), r.json()


def test_the_spacing_of_a_request_reaches_the_experiment(idle, make_settings):
    """The API's spacing field is among the keys the worker takes (REQUEST_KEYS), into the synthetic set's
    settings; a record queued before it existed gets the default."""
    from worker.evaluation import evaluation_settings

    r = idle.post("/evaluations", json=dict(QUICK, spacing="logsnr"))
    assert r.status_code == 202 and r.json()["input"]["spacing"] == "logsnr", r.text
    settings = make_settings(queue="unused", key_prefix="unused")
    chosen = evaluation_settings(r.json()["input"], settings)
    assert chosen.spacing == "logsnr" and chosen.sampler_settings.spacing == "logsnr"
    old = {k: v for k, v in r.json()["input"].items() if k != "spacing"}
    assert evaluation_settings(old, settings).sampler_settings.spacing == "time"


def test_without_a_data_set_it_is_503(make_settings):
    tag = uuid.uuid4().hex[:8]
    with client_for(make_settings(queue=f"nodata-{tag}", key_prefix=f"nodata-{tag}", eval_data=None)) as c:
        r = c.post("/evaluations", json=QUICK)
        assert r.status_code == 503 and "evaluation data set not configured" in r.json()["detail"]
        assert c.get("/jobs").json()["jobs"] == []  # nothing was queued


def test_queued_evaluation_is_a_job_like_any_other(idle):
    assert idle.post("/evaluations").status_code == 422  # a body is required ({} means every default)
    r = idle.post("/evaluations", json=QUICK)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/evaluations/{job['id']}" == job["url"]
    assert (job["type"], job["status"], job["output"], job["report"]) == ("evaluation", "queued", None, None)
    interval = DEFAULT_SETTINGS.guidance_interval
    assert job["input"] == dict(QUICK, guidance=DEFAULT_SETTINGS.guidance, synthetic_seed=0, budget="steps",
                                guidance_interval=None if interval is None else list(interval),
                                spacing=DEFAULT_SETTINGS.spacing)
    assert job["queue_position"] >= 1
    assert idle.get(f"/jobs/{job['id']}").json()["input"] == job["input"]
    gen = idle.post("/generate?class=cat&n=1").json()
    listed = {j["id"]: j["type"] for j in idle.get("/jobs?limit=5").json()["jobs"]}
    assert listed[job["id"]] == "evaluation" and listed[gen["id"]] == "generation"
    assert idle.get(f"/evaluations/{gen['id']}").status_code == 404          # not an evaluation
    assert idle.get(f"/evaluations/{uuid.uuid4().hex}").status_code == 404
    assert idle.get("/evaluations/..%2F..%2Fetc").status_code == 404
    for f in ("report.json", "report.md", "plots/accuracy.png"):
        assert idle.get(f"/jobs/{job['id']}/{f}").status_code == 404, f     # not finished
    c = idle.post(f"/jobs/{job['id']}/cancel")
    assert c.status_code == 200 and c.json()["status"] == "canceled" and c.json()["type"] == "evaluation"


def test_evaluation_end_to_end(client, worker, settings, eval_data):
    r = client.post("/evaluations", json=QUICK)
    assert r.status_code == 202, r.text
    job = poll_job(client, r.headers["location"], timeout=60)
    assert job["status"] == "succeeded", job
    assert (job["progress"], job["message"], job["attempts"]) == (1.0, "done", 1)
    report, out = job["report"], job["output"]
    assert list(report["arms"]) == ARMS and list(out["accuracy_mean"]) == ARMS
    for arm, a in report["arms"].items():
        assert len(a["accuracies"]) == 2 and 0 <= a["accuracy_mean"] <= 1, arm
        assert out["accuracy_mean"][arm] == a["accuracy_mean"]
        assert sum(map(sum, a["confusion_matrix"])) == 2 * 30  # 2 seeds x 30 test images
    assert [report["arms"][a]["train_images"] for a in ARMS] == [60, 80, 20]
    assert report["settings"]["classifier"] == "mlp" and report["settings"]["seeds"] == [0, 1]

    served = client.get(out["report"])
    assert served.status_code == 200 and served.json() == report
    md = client.get(out["report_md"])
    assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
    assert md.text.startswith("# Augmentation experiment")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.text)
    assert len(links) == len(PLOTS)
    for link in links:  # the plots load from where the served report.md links them
        got = client.get(urljoin(out["report_md"], link))
        assert got.status_code == 200 and got.headers["content-type"] == "image/png", link
    for text in (served.text, md.text):  # names, never server paths
        assert str(eval_data) not in text and str(settings.data_dir.resolve()) not in text
    assert sorted(out["plots"]) == sorted(PLOTS)
    for name, url in out["plots"].items():
        png = client.get(url)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png", name
        assert png_pixels(png.content).ndim == 3

    base = f"/jobs/{job['id']}"
    (settings.jobs_dir / job["id"] / "secret.png").write_bytes(client.get(out["plots"]["accuracy"]).content)
    for name in ("secret", "ACCURACY", "confusion_unicorn", "..%2Freport", "%2e%2e", "..%2F..%2F..%2Fetc%2Fpasswd",
                 "accuracy.png%00", "report.json%23"):
        assert client.get(f"{base}/plots/{name}.png").status_code == 404, name
    gen = poll_job(client, client.post("/generate?class=cat&n=1&steps=1").headers["location"], timeout=60)
    for f in ("report.json", "report.md", "plots/accuracy.png"):
        assert client.get(f"/jobs/{gen['id']}/{f}").status_code == 404, f   # not an evaluation


def test_cancel_a_running_evaluation(client, worker, settings):
    # 500 synthetic images x 1000 ddpm steps: minutes (past the 15 s test time limit) unless canceled
    url = client.post("/evaluations", json=dict(QUICK, synthetic_per_class=50, sampler="ddpm", steps=1000,
                                                synthetic_seed=1)).headers["location"]
    running = poll_job(client, url, timeout=60, until=lambda j: j["status"] == "running" and j["progress"] > 0)
    assert running["message"].startswith("sampling synthetic images") and running["progress"] < 0.25
    c = client.post(f"/jobs/{running['id']}/cancel")
    assert c.status_code == 202 and (c.json()["cancel_requested"] is True or c.json()["status"] == "canceled")  # the worker may be that quick
    job = poll_job(client, url, timeout=30)
    assert job["status"] == "canceled" and job["output"] is None and job["report"] is None, job
    assert not (settings.jobs_dir / job["id"]).exists()


def test_task_fails_clearly_on_a_worker_without_the_data_set(make_settings, tmp_path):
    settings = make_settings(data_dir=tmp_path, key_prefix=f"body-{uuid.uuid4().hex[:8]}", eval_data=None)
    store = JobStore(connect(settings.redis_url), settings.key_prefix)
    job_id = new_job_id()
    store.create(new_record(job_id, QUICK, 20, 2, job_type="evaluation"), max_queued=10)
    with pytest.raises(RuntimeError, match="DREAMDATA_EVAL_DATA"):
        run_evaluation_job(job_id, QUICK, store=store, settings=settings)
    rec = store.get(job_id)
    assert rec["status"] == "failed" and "not configured on the worker" in rec["error"]


def test_an_evaluation_delivered_again_trains_only_the_runs_it_had_not_finished(make_settings, tmp_path, monkeypatch):
    import training.evaluate as evaluate

    settings = make_settings(data_dir=tmp_path, key_prefix=f"body-{uuid.uuid4().hex[:8]}")
    store = JobStore(connect(settings.redis_url), settings.key_prefix)
    job_id = new_job_id()
    store.create(new_record(job_id, QUICK, 20, 2, job_type="evaluation"), max_queued=10)

    class WorkerLost(BaseException):  # not an Exception: nothing records it, as when the process dies
        pass

    trained, crash, real_train = [], [True], evaluate.train_classifier

    def train(model, x, y, tset, **kw):  # the first attempt dies as its third run starts
        if crash[0] and len(trained) == 2:
            raise WorkerLost
        trained.append(kw["desc"])
        return real_train(model, x, y, tset, **kw)

    monkeypatch.setattr(evaluate, "train_classifier", train)
    with pytest.raises(WorkerLost):
        run_evaluation_job(job_id, QUICK, store=store, settings=settings)
    out = settings.jobs_dir / job_id
    assert store.get(job_id)["status"] == "running" and len(list((out / "runs").glob("*.json"))) == 2
    (out / "accuracy.png").write_bytes(b"half written")  # what else a crashed attempt may leave

    crash[0] = False
    done = run_evaluation_job(job_id, QUICK, store=store, settings=settings)
    assert done["status"] == "succeeded" and done["attempts"] == 2
    assert trained == ["real seed 0", "real+synthetic seed 0", "synthetic seed 0", "real seed 1",
                       "real+synthetic seed 1", "synthetic seed 1"]   # each run trained once over both attempts
    report = json.loads((out / "report.json").read_text())
    assert report["runs"]["reused"] == ["real seed 0", "real+synthetic seed 0"]
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_evaluation_samples_through_the_workers_batching_sampler(make_settings, tmp_path, monkeypatch):
    """Its synthetic set goes through the generation jobs' batching sampler (shared model calls on a threads-pool
    worker, padded shapes with compile on), with the job's check, so a batch waiting its turn can be stopped."""
    from worker.batching import BatchingSampler

    settings = make_settings(data_dir=tmp_path, key_prefix=f"body-{uuid.uuid4().hex[:8]}")
    store = JobStore(connect(settings.redis_url), settings.key_prefix)
    job_id = new_job_id()
    store.create(new_record(job_id, QUICK, 20, 2, job_type="evaluation"), max_queued=10)
    calls, real_call = [], BatchingSampler.__call__

    def recording(self, model, schedule, labels, seeds, **kwargs):
        calls.append((len(seeds), kwargs.get("check")))
        return real_call(self, model, schedule, labels, seeds, **kwargs)

    monkeypatch.setattr(BatchingSampler, "__call__", recording)
    assert run_evaluation_job(job_id, QUICK, store=store, settings=settings)["status"] == "succeeded"
    assert [n for n, _ in calls] == [4] * 5  # 2 per class, in the worker's batches of 4
    assert all(callable(check) for _, check in calls)


def test_stage_progress_throttles_and_cancels():
    writes, clock, canceled = [], [0.0], [False]
    p = StageProgress(lambda **f: writes.append(f), lambda: canceled[0], interval=1.0, clock=lambda: clock[0])
    p(0.1, "a")
    p(0.2, "b")          # within the interval: not written
    clock[0] = 1.5
    p(0.05, "c")         # progress never goes back
    p(1.0, "done")       # the last call is always written
    assert writes == [{"progress": 0.1, "message": "a"}, {"progress": 0.1, "message": "c"},
                      {"progress": 1.0, "message": "done"}]
    canceled[0] = True
    with pytest.raises(JobCanceled):
        p(0.5, "x")
    # delivered again at 60%: reloading the data does not send the job's progress back to 0
    writes.clear()
    again = StageProgress(lambda **f: writes.append(f), lambda: False, interval=0.0, start=0.6)
    again(0.0, "loading data")
    again(0.7, "training")
    assert writes == [{"progress": 0.6, "message": "loading data"}, {"progress": 0.7, "message": "training"}]


def test_classifiers_and_time_limits_agree_with_the_worker(settings):
    import worker.tasks  # noqa: F401  (registers the tasks)
    from training.classifiers import CLASSIFIERS
    from training.evaluate import BUDGETS

    assert set(get_args(ClassifierName)) == set(CLASSIFIERS)
    assert set(get_args(BudgetName)) == set(BUDGETS)
    task = celery_for(settings).tasks[TASK_EVALUATE]
    assert (task.soft_time_limit, task.time_limit) == (settings.eval_time_limit, settings.eval_hard_time_limit)
    assert settings.effective_visibility_timeout > settings.eval_hard_time_limit
