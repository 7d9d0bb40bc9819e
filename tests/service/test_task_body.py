"""The task body, ``worker.generation.run_generation``, called as a plain function (no broker, no worker)."""
from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures import assert_same_up_to_rounding
from worker.generation import run_generation
from worker.jobs import JobStore, connect, new_job_id, new_record

from .service_testlib import Flaky

REQUEST = {"classes": {"cat": 3, "dog": 2}, "sampler": "dpmpp", "steps": 2, "guidance": 1.5, "seed": 5}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def body_settings(make_settings, tmp_path):
    return make_settings(data_dir=tmp_path, key_prefix=f"body-{uuid.uuid4().hex[:8]}", batch_size=2,
                         progress_interval=0.0)


@pytest.fixture
def store(body_settings) -> JobStore:
    return JobStore(connect(body_settings.redis_url), body_settings.key_prefix)


def after_each_write(store: JobStore, hook) -> None:
    """Make ``store.update`` (a run's progress write) call ``hook(job_id, fields)`` once the write is done: what a
    test does at that moment of the run (record it, cancel, stop the worker, start another delivery)."""
    write = store.update

    def update(job_id, delivery=None, **fields):
        done = write(job_id, delivery, **fields)
        hook(job_id, fields)
        return done

    store.update = update  # type: ignore[method-assign]


def _submit(store, request=REQUEST) -> str:
    job_id = new_job_id()
    store.create(new_record(job_id, request, sum(request["classes"].values()), request["steps"]), max_queued=100)
    return job_id


def test_success_writes_the_sample_layout_and_the_record(store, body_settings):
    job_id = _submit(store)
    result = run_generation(job_id, REQUEST, store=store, settings=body_settings, worker="w1")
    out = body_settings.jobs_dir / job_id
    assert result["status"] == "succeeded" and result["images"] == 5
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images", "images.zip", "manifest.json",
                                                      "result.json"]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:05d}.png" for i in range(5)]
    assert json.loads((out / "result.json").read_text())["checkpoint"]["sha256"] == result["checkpoint"]["sha256"]
    rec = store.get(job_id)
    assert rec["status"] == "succeeded" and rec["worker"] == "w1" and rec["attempts"] == 1
    assert rec["images_done"] == 5 and rec["progress"] == 1.0 and rec["output"]["images"] == 5
    assert rec["started_at"] <= rec["finished_at"]
    # delivered again after success: nothing runs twice
    assert run_generation(job_id, REQUEST, store=store, settings=body_settings)["status"] == "succeeded"
    assert store.get(job_id)["attempts"] == 1


def test_progress_is_written_while_running(store, body_settings):
    seen = []
    after_each_write(store, lambda jid, f: seen.append(f))
    job_id = _submit(store)
    run_generation(job_id, REQUEST, store=store, settings=body_settings)
    assert [f["images_done"] for f in seen if f["step"] == 2 and f["images_done"] > 0][-1] == 5
    fractions = [f["progress"] for f in seen]
    assert fractions == sorted(fractions) and 0 < fractions[0] < 1 and fractions[-1] == 1.0
    assert any(0 < f["step"] < f["steps"] for f in seen)  # the step inside a batch is reported


def test_cancel_flag_stops_between_steps(store, body_settings):
    job_id = _submit(store)
    after_cancel: list[dict] = []

    def hook(jid, f):
        if store.r.exists(store.key(jid) + ":cancel"):
            after_cancel.append(f)
        elif f["images_done"] == 0 and f["step"] == 1:  # step 1 of 2 of the first batch: ask for cancellation
            store.r.set(store.key(jid) + ":cancel", 1)

    after_each_write(store, hook)
    result = run_generation(job_id, REQUEST, store=store, settings=body_settings)
    rec = store.get(job_id)
    assert result["status"] == rec["status"] == "canceled" and rec["finished_at"] is not None
    assert [f for f in after_cancel if "step" in f] == []  # no second step, no batch end: it stopped at once
    assert not (body_settings.jobs_dir / job_id).exists()


@pytest.fixture
def stopping():
    """worker.progress.STOPPING, cleared again after the test (it is process-wide)."""
    from worker.progress import STOPPING

    yield STOPPING
    STOPPING.clear()


def test_a_cold_shutdown_puts_the_job_back_in_the_queue_uncounted(store, body_settings, stopping, monkeypatch):
    """The worker stops mid-job (docker stop): the job is queued again at its place, the attempt is not counted
    against max_attempts, its finished batches stay, and the task hands Celery a requeueing Reject."""
    from celery.exceptions import Reject

    import worker.tasks as tasks
    from worker.progress import WorkerStopping

    job_id = _submit(store)
    original = store.update

    def hook(jid, f):
        if f["images_done"] >= 2:  # the first batch is written: the worker begins its cold shutdown
            stopping.set()

    after_each_write(store, hook)
    with pytest.raises(WorkerStopping):
        run_generation(job_id, REQUEST, store=store, settings=body_settings, worker="w1")
    rec = store.get(job_id)
    assert (rec["status"], rec["attempts"], rec["worker"]) == ("queued", 0, None)
    assert store.queue_position(job_id) == 1
    out = body_settings.jobs_dir / job_id
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    assert len(kept) == 2

    stopping.clear()
    store.update = original  # type: ignore[method-assign]
    result = run_generation(job_id, REQUEST, store=store, settings=body_settings, worker="w2")
    assert result["status"] == "succeeded" and result["attempts"] == 1
    assert all((out / "images" / name).stat().st_mtime_ns == t for name, t in kept.items())  # not redone

    # a job canceled as its worker stops is canceled, not queued again
    from worker.progress import JobCanceled, StageProgress

    stopping.set()
    with pytest.raises(JobCanceled):
        StageProgress(lambda **f: None, lambda: True).check()
    stopping.clear()

    monkeypatch.setattr(tasks, "get_settings", lambda: body_settings)
    monkeypatch.setattr("worker.generation.run_generation", lambda *a, **k: (_ for _ in ()).throw(WorkerStopping()))
    with pytest.raises(Reject) as e:
        tasks.generate.run(job_id=job_id, request=REQUEST)
    assert e.value.requeue is True


def test_a_stopped_delivery_leaves_a_newer_delivery_of_its_job_alone(store, body_settings):
    """A threads-pool job that outlived its worker's shutdown finds its message restored and the job started by
    another worker: it must not send that live run back to the queue (nor put a second message there)."""
    from worker.generation import record_requeued, start_job

    job_id = _submit(store)
    first = start_job(store, job_id, body_settings, "A")
    second = start_job(store, job_id, body_settings, "B")  # the restored message, delivered to B
    assert first["delivery"] != second["delivery"]
    assert record_requeued(store, job_id, first["delivery"]) is False
    rec = store.get(job_id)
    assert (rec["status"], rec["worker"], rec["attempts"]) == ("running", "B", 2)
    assert record_requeued(store, job_id, second["delivery"]) is True
    assert (store.get(job_id)["status"], store.get(job_id)["attempts"]) == ("queued", 1)


def test_a_superseded_delivery_neither_ends_the_job_nor_writes_its_progress(store, body_settings):
    """The delivery that outlived its worker's shutdown (above) can also fail, be canceled or finish in its last
    seconds: the job is the newer delivery's, and stays running with that delivery's progress."""
    from worker.generation import end_run, record_canceled, record_failed, start_job

    job_id = _submit(store)
    first = start_job(store, job_id, body_settings, "A")["delivery"]
    second = start_job(store, job_id, body_settings, "B")["delivery"]
    out = body_settings.jobs_dir / job_id
    out.mkdir(parents=True)
    assert record_failed(store, job_id, RuntimeError("teardown"), 60, body_settings, first) is False
    assert record_canceled(store, job_id, out, first)["status"] == "superseded" and out.is_dir()
    assert end_run(store, job_id, first, {"status": "succeeded"}) is False
    assert store.update(job_id, first, progress=0.9) is False
    assert store.update(job_id, second, progress=0.5) is True
    rec = store.get(job_id)
    assert (rec["status"], rec["worker"], rec["progress"]) == ("running", "B", 0.5)
    # the newer delivery ends the job; no progress write, its own included, lands on a finished job
    assert end_run(store, job_id, second, {"status": "succeeded", "progress": 1.0}) is True
    assert store.update(job_id, second, progress=0.6) is False
    assert (store.get(job_id)["status"], store.get(job_id)["progress"]) == ("succeeded", 1.0)


def test_a_start_overtaken_before_it_reads_the_record_does_not_run(store, body_settings):
    """A's start lands, B's start (the restored message) takes the job over, then A reads the record: B's."""
    from worker.generation import start_job

    job_id = _submit(store)
    original_get = store.get

    def get(jid):
        store.get = original_get  # type: ignore[method-assign]
        start_job(store, jid, body_settings, "B")
        return original_get(jid)

    store.get = get  # type: ignore[method-assign]
    assert start_job(store, job_id, body_settings, "A")["status"] == "superseded"
    rec = store.get(job_id)
    assert (rec["status"], rec["worker"], rec["attempts"]) == ("running", "B", 2)


def test_a_refused_status_change_leaves_the_running_jobs_eta_dated_as_it_was(store, body_settings):
    from worker.generation import end_run, start_job

    job_id = _submit(store)
    first = start_job(store, job_id, body_settings, "A")["delivery"]
    start_job(store, job_id, body_settings, "B")
    before = store.get(job_id)["updated_at"]
    assert end_run(store, job_id, first, {"status": "failed"}) is False
    assert store.get(job_id)["updated_at"] == before  # the API counts B's ETA down from it


def test_a_failure_with_the_record_gone_still_fails_the_task(store, body_settings, monkeypatch):
    """No record (a Redis that lost its data): no other delivery to leave the job to, so the error is raised."""
    import worker.generation as generation

    request = dict(REQUEST, classes={"unicorn": 2})
    job_id = _submit(store, request)
    real_end_run = generation.end_run

    def record_lost(st, jid, delivery, fields):
        st.forget(jid)
        return real_end_run(st, jid, delivery, fields)

    monkeypatch.setattr(generation, "end_run", record_lost)
    with pytest.raises(ValueError, match="unicorn"):
        run_generation(job_id, request, store=store, settings=body_settings)


def test_a_run_taken_over_midway_leaves_the_job_to_the_newer_delivery(store, body_settings):
    from worker.generation import start_job

    job_id = _submit(store)
    taken: list[str] = []

    def hook(jid, f):
        if f["images_done"] >= 2 and not taken:  # after the first batch, the restored message starts on B
            taken.append(start_job(store, jid, body_settings, "B")["delivery"])

    after_each_write(store, hook)
    result = run_generation(job_id, REQUEST, store=store, settings=body_settings, worker="A")
    rec = store.get(job_id)
    assert result["status"] == "superseded"
    assert (rec["status"], rec["worker"], rec["delivery"]) == ("running", "B", taken[0])
    assert rec["progress"] < 1.0  # A's later progress writes did not land on B's run


def test_a_redelivered_job_does_not_report_less_progress_than_before(store, body_settings):
    """The crashed attempt had reported part of a batch that the next one samples again."""
    from worker.generation import start_job

    job_id = _submit(store)
    start_job(store, job_id, body_settings, "A")
    store.update(job_id, progress=0.95)  # A's last write, then A died
    seen: list[float] = []
    after_each_write(store, lambda jid, f: seen.append(f["progress"]))
    assert run_generation(job_id, REQUEST, store=store, settings=body_settings, worker="B")["status"] == "succeeded"
    assert seen and min(seen) >= 0.95 and seen[-1] == 1.0


def test_a_job_outlives_redis_restarting_while_it_runs(store, body_settings):
    """Progress writes and cancel checks that fail are skipped; the final status change is tried again, so the
    job ends succeeded, not failed (or running for ever)."""
    job_id = _submit(store)
    store.retry_for, store.sleep = 30, lambda s: None
    update = store.update = Flaky(store.update, lambda i: i % 2 == 1)
    cancel = store.cancel_requested = Flaky(store.cancel_requested, lambda i: i % 2 == 0)  # start_job's is read
    # call 1 is the start; the final status change fails twice (calls 2 and 3), then goes through
    transition = store.r.transaction = Flaky(store.r.transaction, lambda i: i in (2, 3))
    result = run_generation(job_id, REQUEST, store=store, settings=body_settings)
    rec = store.get(job_id)
    assert result["status"] == rec["status"] == "succeeded" and rec["images_done"] == 5
    assert transition.calls == 4 and update.calls > 2 and cancel.calls > 2


def test_canceled_while_queued_never_runs(store, body_settings):
    job_id = _submit(store)
    store.request_cancel(job_id)
    assert run_generation(job_id, REQUEST, store=store, settings=body_settings)["status"] == "canceled"
    assert store.get(job_id)["started_at"] is None


def test_failure_is_recorded_and_raised(store, body_settings):
    request = dict(REQUEST, classes={"unicorn": 2})
    job_id = _submit(store, request)
    with pytest.raises(ValueError, match="unicorn"):
        run_generation(job_id, request, store=store, settings=body_settings)
    rec = store.get(job_id)
    assert rec["status"] == "failed" and "unknown class 'unicorn'" in rec["error"]


def test_redelivered_job_resumes_and_gives_up_after_max_attempts(store, body_settings):
    job_id = _submit(store)
    first = run_generation(job_id, REQUEST, store=store, settings=body_settings)
    started = store.get(job_id)["started_at"]
    out = body_settings.jobs_dir / job_id
    before = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    (out / "images" / "00004.png").unlink()       # as if the worker died during the last batch
    store.update(job_id, status="running")
    again = run_generation(job_id, REQUEST, store=store, settings=body_settings)
    assert again["attempts"] == 2 and first["images"] == again["images"]
    assert store.get(job_id)["started_at"] == started  # the first start: queued_seconds is the wait for it
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == before
    store.update(job_id, status="running", attempts=body_settings.max_attempts)
    assert run_generation(job_id, REQUEST, store=store, settings=body_settings)["status"] == "failed"
    assert "gave up" in store.get(job_id)["error"]


def test_a_cancel_asked_for_while_the_worker_was_down_drops_the_crashed_attempts_images(store, body_settings):
    job_id = _submit(store)
    run_generation(job_id, REQUEST, store=store, settings=body_settings)
    out = body_settings.jobs_dir / job_id
    (out / "images" / "00004.png").unlink()       # the worker died during the last batch ...
    store.update(job_id, status="running")
    store.request_cancel(job_id)                   # ... and the user canceled before it came back
    assert store.get(job_id)["status"] == "running"
    assert run_generation(job_id, REQUEST, store=store, settings=body_settings)["status"] == "canceled"
    assert store.get(job_id)["status"] == "canceled" and not out.exists()  # no images of a canceled job
    # a finished job delivered again keeps its files
    done = _submit(store)
    run_generation(done, REQUEST, store=store, settings=body_settings)
    assert run_generation(done, REQUEST, store=store, settings=body_settings)["status"] == "succeeded"
    assert len(list((body_settings.jobs_dir / done / "images").iterdir())) == 5


def test_unknown_job_is_skipped(store, body_settings):
    assert run_generation(new_job_id(), REQUEST, store=store, settings=body_settings)["status"] == "skipped"


def test_hard_time_limit_marks_the_record_failed(store, body_settings, monkeypatch):
    # After a hard limit the pool child is gone; the worker's main process calls on_failure.
    from celery.exceptions import TimeLimitExceeded

    import worker.tasks as tasks

    monkeypatch.setattr(tasks, "get_settings", lambda: body_settings)
    job_id = _submit(store)
    store.transition(job_id, ("queued",), {"status": "running"})
    tasks.generate.on_failure(TimeLimitExceeded(16), job_id, (), {"job_id": job_id, "request": REQUEST}, None)
    rec = store.get(job_id)
    assert rec["status"] == "failed"
    assert rec["error"] == f"hard time limit of {body_settings.hard_time_limit} s exceeded"
    tasks.generate.on_failure(ValueError("late"), job_id, (), {"job_id": job_id}, None)
    assert store.get(job_id)["error"].startswith("hard time limit")  # a finished record is not rewritten


def test_celery_calls_on_failure_after_a_hard_time_limit(store, body_settings, monkeypatch):
    # The test above calls on_failure by hand; this one checks that Celery calls it when the pool kills a
    # child at the hard limit (Request.on_timeout in the worker's main process). Celery releases before 5.7
    # only marked the result backend, so the record would stay "running" for ever: pyproject pins >= 5.7.
    from unittest import mock

    from celery.contrib.testing.mocks import TaskMessage
    from celery.worker.request import Request

    import worker.tasks as tasks
    from worker.celery_app import celery_for

    monkeypatch.setattr(tasks, "get_settings", lambda: body_settings)
    job_id = _submit(store)
    store.transition(job_id, ("queued",), {"status": "running"})
    task = celery_for(body_settings).tasks[tasks.TASK_GENERATE]
    message = TaskMessage(task.name, id=job_id, kwargs={"job_id": job_id, "request": REQUEST})
    with mock.patch.object(task.backend, "mark_as_failure"):
        Request(message, app=task.app, task=task).on_timeout(soft=False, timeout=16)
    rec = store.get(job_id)
    assert rec["status"] == "failed"
    assert rec["error"] == f"hard time limit of {body_settings.hard_time_limit} s exceeded"


def test_the_evaluation_task_reports_its_own_hard_limit(store, make_settings, tmp_path, monkeypatch):
    from celery.exceptions import TimeLimitExceeded

    import worker.tasks as tasks

    settings = make_settings(data_dir=tmp_path, key_prefix=store.prefix, eval_time_limit=40, job_time_limit=20,
                             visibility_timeout=100)
    assert settings.eval_hard_time_limit != settings.hard_time_limit
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    job_id = new_job_id()
    store.create(new_record(job_id, {"classifier": "mlp"}, 20, 2, job_type="evaluation"), max_queued=100)
    store.transition(job_id, ("queued",), {"status": "running"})
    tasks.evaluate.on_failure(TimeLimitExceeded(41), job_id, (), {"job_id": job_id, "request": {}}, None)
    rec = store.get(job_id)
    assert rec["status"] == "failed"
    assert rec["error"] == f"hard time limit of {settings.eval_hard_time_limit} s exceeded"


def test_a_corrupt_checkpoint_fails_the_job_with_the_reason(store, body_settings, tiny_checkpoint, tmp_path):
    import shutil

    from diffusion.checkpoint import WEIGHTS_FILE, CheckpointError

    broken = tmp_path / "broken-ckpt"
    shutil.copytree(tiny_checkpoint, broken)
    weights = broken / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    settings = body_settings.model_copy(update={"checkpoint": broken})
    job_id = _submit(store)
    with pytest.raises(CheckpointError):
        run_generation(job_id, REQUEST, store=store, settings=settings)
    rec = store.get(job_id)
    assert rec["status"] == "failed" and rec["error"].startswith("CheckpointError: ") and "unreadable" in rec["error"]
    assert "broken-ckpt" in rec["error"] and str(tmp_path) not in rec["error"]  # its name, not the server's path


def test_spacing_reaches_the_sampler_and_the_records(store, body_settings):
    """A logsnr request samples what diffusion.samplers.sample gives with that spacing, and its manifest and PNGs
    say so; one without the key (queued before the setting existed) is spaced in time and says nothing."""
    from diffusion.checkpoint import load_for_sampling
    from diffusion.samplers import sample
    from training.generate import to_uint8

    base = dict(REQUEST, classes={"cat": 2}, sampler="dpmpp", steps=5, guidance=1.0)
    images = {}
    for name, request in (("logsnr", dict(base, spacing="logsnr")), ("old", base)):
        job_id = _submit(store, request)
        assert run_generation(job_id, request, store=store, settings=body_settings)["status"] == "succeeded"
        out = body_settings.jobs_dir / job_id
        manifest = json.loads((out / "manifest.json").read_text())
        assert {e.get("spacing") for e in manifest["images"]} == {"logsnr" if name == "logsnr" else None}
        files = sorted((out / "images").iterdir())
        with Image.open(files[0]) as im:
            assert im.text.get("spacing") == ("logsnr" if name == "logsnr" else None)
        images[name] = [torch.from_numpy(np.array(Image.open(p))) for p in files]
    ckpt = load_for_sampling(body_settings.checkpoint, "cpu", "fp32")
    cat = ckpt.class_names.index("cat")
    x = sample(ckpt.model, ckpt.schedule, torch.tensor([cat, cat]), [5, 6], sampler="dpmpp", steps=5, spacing="logsnr")
    assert_same_up_to_rounding(torch.stack(images["logsnr"]), to_uint8(x).permute(0, 2, 3, 1), "logsnr")
    assert not all(torch.equal(a, b) for a, b in zip(images["logsnr"], images["old"]))


def test_guidance_interval_reaches_the_sampler_and_the_records(store, body_settings):
    """An interval request samples what diffusion.samplers.sample gives with that interval, and the manifest
    says so; a request queued before intervals existed (no key) is guided at every step."""
    from diffusion.checkpoint import load_for_sampling
    from diffusion.samplers import sample
    from training.generate import to_uint8

    steps = 6
    base = dict(REQUEST, classes={"cat": 2}, sampler="dpmpp_sde", steps=steps, guidance=3.0)
    narrow = dict(base, guidance_interval=[0.28, 2.9])
    images = {}
    for name, request in (("narrow", narrow), ("old", base)):
        job_id = _submit(store, request)
        assert run_generation(job_id, request, store=store, settings=body_settings)["status"] == "succeeded"
        out = body_settings.jobs_dir / job_id
        manifest = json.loads((out / "manifest.json").read_text())
        expected = "0.28,2.9" if name == "narrow" else "all"
        assert {e["guidance_interval"] for e in manifest["images"]} == {expected}
        assert manifest["settings"]["guidance_interval"] == request.get("guidance_interval")
        images[name] = [torch.from_numpy(np.array(Image.open(p))) for p in sorted((out / "images").iterdir())]
    ckpt = load_for_sampling(body_settings.checkpoint, "cpu", "fp32")
    cat = ckpt.class_names.index("cat")
    for name, interval in (("narrow", (0.28, 2.9)), ("old", None)):
        x = sample(ckpt.model, ckpt.schedule, torch.tensor([cat, cat]), [5, 6], sampler="dpmpp_sde", steps=steps,
                   guidance=3.0, guidance_interval=interval)
        want = to_uint8(x).permute(0, 2, 3, 1)
        got = torch.stack(images[name])
        assert_same_up_to_rounding(got, want, name)  # the same images, to the rounding
    assert not all(torch.equal(a, b) for a, b in zip(images["narrow"], images["old"]))
