"""Jobs through the real parts: API -> Redis -> a `dreamdata worker` process -> files served back."""
from __future__ import annotations

import json
import subprocess
import sys

from .service_testlib import env_for, png_pixels, poll_job, wait_for, zip_pngs

PAD = 2  # training.plots.image_grid padding


def test_readyz_names_the_worker(client, worker):
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert worker.name in r.json()["workers"]


def test_worker_healthcheck_finds_its_own_worker(worker, settings):
    """docker-compose.yml's worker healthcheck, run as it is there: healthy while this host's worker answers,
    not for another host's (a scaled service's replicas each check their own)."""
    def check(*args, **env):
        return subprocess.run([sys.executable, "-m", "worker.healthcheck", *args], env=dict(env_for(settings), **env),
                              capture_output=True, text=True, timeout=60)

    r = check()
    assert r.returncode == 0 and worker.name in r.stdout, r.stderr
    r = check("--host", "another-host", "--timeout", "1")
    assert r.returncode == 1 and "no worker on another-host" in r.stderr
    r = check(DREAMDATA_REDIS_URL="redis://127.0.0.1:1/0")  # the broker is gone: unhealthy, saying why
    assert r.returncode == 1 and "could not ping the workers" in r.stderr


def test_query_job_end_to_end(client, worker, settings):
    r = client.post("/generate?class=cat&n=12&sampler=dpmpp&steps=2&seed=7")
    assert r.status_code == 202, r.text
    url = r.headers["location"]
    job = poll_job(client, url, timeout=60)
    assert job["status"] == "succeeded", job
    assert (job["images_done"], job["images_total"], job["progress"], job["attempts"]) == (12, 12, 1.0, 1)
    assert job["eta_seconds"] is None  # only while running
    t = job["timings"]
    assert t["started_at"] and t["finished_at"] and t["run_seconds"] >= 0 and t["queued_seconds"] >= 0

    out = job["output"]
    assert out["count"] == 12 and out["grid"] == f"{url}/grid.png"
    grid = client.get(out["grid"])
    assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
    # one row (one class) of 10 images of 32x32 with 2-pixel padding
    assert png_pixels(grid.content).shape == (PAD + 1 * (32 + PAD), PAD + 10 * (32 + PAD), 3)

    z = client.get(out["zip"])
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    images = zip_pngs(z.content)
    assert sorted(images) == [f"images/{i:05d}.png" for i in range(12)]
    assert all(a.shape == (32, 32, 3) for a in images.values())

    manifest = client.get(out["manifest"]).json()
    assert [m["seed"] for m in manifest["images"]] == list(range(7, 19))
    assert {m["class_name"] for m in manifest["images"]} == {"cat"}
    assert manifest["checkpoint"] == {"name": settings.checkpoint.name, "sha256": out["checkpoint_sha256"]}
    assert str(settings.checkpoint.parent) not in client.get(out["manifest"]).text  # no server paths
    assert manifest["precision"] == out["precision"] == "fp32"  # the tests pin DREAMDATA_PRECISION

    one = client.get(out["images"].format(i=11))
    assert one.status_code == 200 and (png_pixels(one.content) == images["images/00011.png"]).all()
    assert client.get(out["images"].format(i=12)).status_code == 404

    result = json.loads((settings.jobs_dir / job["id"] / "result.json").read_text())
    assert result["status"] == "succeeded" and result["images"] == 12 and result["input"]["seed"] == 7


def test_body_job_with_two_classes(client, worker):
    r = client.post("/generate", json={"classes": {"dog": 3, "airplane": 2}, "sampler": "ddim", "steps": 2,
                                       "guidance": 1.0, "seed": 100})
    assert r.status_code == 202, r.text
    job = poll_job(client, r.headers["location"], timeout=60)
    assert job["status"] == "succeeded", job
    grid = png_pixels(client.get(job["output"]["grid"]).content)
    assert grid.shape == (PAD + 2 * (32 + PAD), PAD + 3 * (32 + PAD), 3)  # two rows of up to 3
    manifest = client.get(job["output"]["manifest"]).json()
    assert [m["class_name"] for m in manifest["images"]] == ["dog"] * 3 + ["airplane"] * 2


def test_same_request_same_images(client, worker):
    urls = [client.post("/generate?class=frog&n=3&steps=2&seed=42").headers["location"] for _ in range(2)]
    jobs = [poll_job(client, u, timeout=60) for u in urls]
    a, b = (zip_pngs(client.get(j["output"]["zip"]).content) for j in jobs)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_cancel_running_job(client, worker, settings):
    # 2 batches x 1000 ddpm steps: minutes, unless canceled
    r = client.post("/generate?class=ship&n=8&sampler=ddpm&steps=1000&seed=0")
    url = r.headers["location"]
    running = poll_job(client, url, timeout=60, until=lambda j: j["status"] == "running" and j["step"] > 0)
    assert 0 < running["progress"] < 1
    c = client.post(f"{url}/cancel")
    assert c.status_code == 202 and (c.json()["cancel_requested"] is True or c.json()["status"] == "canceled")  # the worker may be that quick
    job = poll_job(client, url, timeout=30)
    assert job["status"] == "canceled" and job["output"] is None
    assert not (settings.jobs_dir / job["id"]).exists()  # partial output removed
    assert client.get(f"{url}/grid.png").status_code == 404
    # the worker is free again
    after = client.post("/generate?class=cat&n=1&steps=1").headers["location"]
    assert poll_job(client, after, timeout=60)["status"] == "succeeded"


def test_failed_job_reports_the_error(client, worker, settings):
    # The API validated against its checkpoint; a worker whose checkpoint differs fails clearly.
    from worker.jobs import JobStore, connect, new_job_id, new_record
    from worker.celery_app import TASK_GENERATE, celery_for

    store = JobStore(connect(settings.redis_url), settings.key_prefix)
    job_id = new_job_id()
    request = {"classes": {"unicorn": 1}, "sampler": "dpmpp", "steps": 2, "guidance": 1.0, "seed": 0}
    store.create(new_record(job_id, request, 1, 2), max_queued=1000)
    celery_for(settings).send_task(TASK_GENERATE, kwargs={"job_id": job_id, "request": request}, task_id=job_id,
                                   queue=settings.queue)
    job = poll_job(client, f"/jobs/{job_id}", timeout=60)
    assert job["status"] == "failed" and "unicorn" in job["error"]
    wait_for(lambda: client.get("/readyz").status_code == 200, 10, "worker still up")
