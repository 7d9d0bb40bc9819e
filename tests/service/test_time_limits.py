"""Every job runs under a soft and a hard time limit; going over the soft one fails the job clearly."""
from __future__ import annotations

from .conftest import client_for
from .service_testlib import poll_job


def test_job_over_the_soft_limit_fails_and_the_worker_goes_on(make_settings, start_worker):
    settings = make_settings(db=3, job_time_limit=2, eval_time_limit=2, job_kill_grace=2,
                             visibility_timeout=5)
    with client_for(settings) as client:
        start_worker(settings)
        url = client.post("/generate?class=cat&n=40&sampler=ddpm&steps=1000").headers["location"]
        job = poll_job(client, url, timeout=60)
        assert job["status"] == "failed" and job["error"] == "time limit of 2 s exceeded", job
        assert job["timings"]["run_seconds"] >= 1.5  # the limit counts from the task start
        quick = client.post("/generate?class=cat&n=1&steps=1").headers["location"]
        assert poll_job(client, quick, timeout=60)["status"] == "succeeded"
