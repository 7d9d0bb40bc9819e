"""kill -9 mid-job: the job is delivered again and completes with the images of an uninterrupted run; and a
threads-pool worker stopped cold puts its running job back at once.

Two deaths: the whole worker (main process and pool child, as when a machine dies; the message
comes back after the visibility timeout, which is why that test's limits are short), and only the
pool child (the worker puts the task back at once: task_reject_on_worker_lost). The tests whose job comes
back at once run with a visibility timeout of ten minutes, so a job that came back only through it would
fail them, and with a time limit per attempt far above what the job takes on a loaded machine.
"""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from diffusion.spec import DEFAULT_SETTINGS, SamplerSettings
from training.generate import generate_to_dir

from worker.jobs import JobStore, connect

from .conftest import client_for
from .service_testlib import TERMINAL, png_pixels, poll_job, wait_for, zip_pngs

N, STEPS, SEED = 160, 10, 1234  # 40 batches of 4, ddpm: seconds even on a fast idle machine, so it is killed mid-run
# (about 7 s an attempt with both cores busy, extrapolated from 16 images): limits per attempt with room to spare
WHOLE_WORKER_LIMITS = dict(job_time_limit=30, visibility_timeout=32)  # the job comes back after 32 s
AT_ONCE_LIMITS = dict(job_time_limit=120, visibility_timeout=600)    # 600 s: longer than any wait below
# no guidance_interval or spacing: the default ones apply, and the reference below samples with them too
QUERY = f"/generate?class=horse&n={N}&sampler=ddpm&steps={STEPS}&guidance=1.5&seed={SEED}"


@pytest.fixture(scope="module")
def reference(settings, tmp_path_factory) -> dict[str, np.ndarray]:
    """The same request, uninterrupted, through the worker's own model loading and generate_to_dir."""
    from worker.generation import model_for

    threads = torch.get_num_threads()
    try:
        ckpt = model_for(settings.checkpoint, settings.torch_threads)
        out = tmp_path_factory.mktemp("reference")
        generate_to_dir(ckpt, [(ckpt.class_names.index("horse"), N)], out, settings=SamplerSettings("ddpm", STEPS, 1.5,
                                                    guidance_interval=DEFAULT_SETTINGS.guidance_interval,
                                                    spacing=DEFAULT_SETTINGS.spacing),
                        base_seed=SEED, batch_size=settings.model_batch)
    finally:
        torch.set_num_threads(threads)
    return {f"images/{i:05d}.png": png_pixels((out / f"images/{i:05d}.png").read_bytes()) for i in range(N)}


def _images_of(settings, job_id: str) -> dict[str, np.ndarray]:
    folder = settings.jobs_dir / job_id
    return {f"images/{i:05d}.png": png_pixels((folder / f"images/{i:05d}.png").read_bytes()) for i in range(N)}


def _mid_run(job: dict) -> bool:
    # at least one batch on disk (so "finished batches are not redone" is tested), not finished
    return job["status"] == "running" and 4 <= job["images_done"] < N


def _wait_mid_run(settings, url: str) -> None:
    """Watch the job record in Redis directly: much cheaper than HTTP polls, so on a loaded
    machine the poller does not sleep through the whole running window."""
    store = JobStore(connect(settings.redis_url), settings.key_prefix)
    job_id = url.rsplit("/", 1)[1]
    job = wait_for(lambda: (lambda j: j if _mid_run(j) or j["status"] in TERMINAL else None)(store.get(job_id)),
                   60, "the job to be mid-run", interval=0.01)
    assert _mid_run(job), f"the job ended before it could be killed mid-run: {job['status']}"


def test_whole_worker_killed_job_completes_on_a_new_worker(make_settings, start_worker, reference):
    settings = make_settings(db=1, **WHOLE_WORKER_LIMITS)  # its own database: no other worker takes or answers it
    with client_for(settings) as client:
        first = start_worker(settings)
        url = client.post(QUERY).headers["location"]
        job_id = url.rsplit("/", 1)[1]
        _wait_mid_run(settings, url)
        first.kill9()
        done_before = client.get(url).json()["images_done"]
        kept = settings.jobs_dir / job_id / "images" / "00000.png"
        kept_mtime = kept.stat().st_mtime_ns
        assert client.get(url).json()["status"] == "running"      # nobody knows yet
        assert client.get("/readyz").status_code == 503           # no worker answers

        second = start_worker(settings)
        assert client.get("/readyz").json()["workers"] == [second.name]
        job = poll_job(client, url, timeout=90)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2 and job["images_done"] == N and done_before < N
        assert kept.stat().st_mtime_ns == kept_mtime              # finished batches were not redone
        images = _images_of(settings, job_id)
        assert images.keys() == reference.keys()
        assert all(np.array_equal(images[k], reference[k]) for k in images)
        z = client.get(job["output"]["zip"])
        assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
        served = zip_pngs(z.content)
        assert served.keys() == reference.keys() and all(np.array_equal(served[k], reference[k]) for k in served)


def test_pool_child_killed_job_is_requeued_at_once(make_settings, start_worker, reference):
    settings = make_settings(db=8, **AT_ONCE_LIMITS)
    with client_for(settings) as client:
        worker = start_worker(settings)
        url = client.post(QUERY).headers["location"]
        _wait_mid_run(settings, url)
        children = worker.pool_children()
        assert len(children) == 1
        os.kill(children[0], signal.SIGKILL)
        # running again within a minute: far inside the visibility timeout, so put back by the worker itself
        wait_for(lambda: client.get(url).json()["attempts"] == 2, 60, "the job's second attempt")
        job = poll_job(client, url, timeout=120)
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        images = _images_of(settings, job["id"])
        assert all(np.array_equal(images[k], reference[k]) for k in reference)
        wait_for(lambda: worker.pool_children(), 30, "a new pool child")


def test_a_threads_worker_stopped_cold_puts_its_job_back_at_once(make_settings, start_worker, reference):
    """`docker stop` on the compose worker (threads pool; SIGTERM remapped to SIGQUIT): the running job goes
    back to the queue within the soft shutdown, not after the visibility timeout (Celery cannot cancel a thread),
    and the next worker finishes it, keeping its batches, without counting the stop as a crash."""
    settings = make_settings(db=7, pool="threads", concurrency=2, **AT_ONCE_LIMITS)
    store = JobStore(connect(settings.redis_url), settings.key_prefix)
    with client_for(settings) as client:
        first = start_worker(settings)
        url = client.post(QUERY).headers["location"]
        job_id = url.rsplit("/", 1)[1]
        _wait_mid_run(settings, url)
        first.proc.send_signal(signal.SIGQUIT)
        first.proc.wait(60)  # Celery's 10 s soft shutdown, then out: no thread left that it cannot kill
        assert "Unrecoverable error" not in first.tail(20000)
        job = store.get(job_id)
        assert (job["status"], job["attempts"]) == ("queued", 0) and 4 <= job["images_done"] < N, job
        assert store.r.llen(settings.queue) == 1  # its message is back in the queue now
        kept = settings.jobs_dir / job_id / "images" / "00000.png"
        kept_mtime = kept.stat().st_mtime_ns

        start_worker(settings)
        job = poll_job(client, url, timeout=90)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        assert kept.stat().st_mtime_ns == kept_mtime  # finished batches were not redone
        images = _images_of(settings, job_id)
        assert all(np.array_equal(images[k], reference[k]) for k in reference)
