"""A threads-pool worker: concurrent jobs share model batches, images stay the same, limits still hold."""
from __future__ import annotations

from tests.fixtures import assert_same_up_to_rounding

from .conftest import client_for
from .service_testlib import poll_job, wait_for, zip_pngs

REQUESTS = [f"/generate?class={c}&n=3&sampler=dpmpp&steps=3&seed={s}"
            for c, s in (("cat", 1), ("dog", 50), ("ship", 7), ("cat", 900))]


def test_concurrent_jobs_share_batches_and_make_the_same_images(make_settings, start_worker, client, worker):
    settings = make_settings(db=5, pool="threads", concurrency=4, batch_size=100, batch_window=0.5)
    with client_for(settings) as threaded:
        w = start_worker(settings)
        urls = [threaded.post(r).headers["location"] for r in REQUESTS]
        jobs = [poll_job(threaded, u, timeout=120) for u in urls]
        assert [j["status"] for j in jobs] == ["succeeded"] * 4, jobs
        wait_for(lambda: "batching" in w.tail(20000), 5, "a merged batch in the worker log")
        # the prefork worker of the other tests (one job at a time, batch 4) makes the same images
        for req, job in zip(REQUESTS[:2], jobs):
            alone = poll_job(client, client.post(req).headers["location"], timeout=120)
            assert alone["status"] == "succeeded", alone
            got = zip_pngs(threaded.get(job["output"]["zip"]).content)
            want = zip_pngs(client.get(alone["output"]["zip"]).content)
            assert sorted(got) == sorted(want)
            for name in want:
                assert_same_up_to_rounding(got[name], want[name], name)


def test_soft_time_limit_holds_in_the_threads_pool(make_settings, start_worker):
    settings = make_settings(db=6, pool="threads", concurrency=2, job_time_limit=2, eval_time_limit=2,
                             job_kill_grace=2, visibility_timeout=5)
    with client_for(settings) as client:
        start_worker(settings)
        url = client.post("/generate?class=cat&n=40&sampler=ddpm&steps=1000").headers["location"]
        job = poll_job(client, url, timeout=60)
        assert job["status"] == "failed" and job["error"] == "time limit of 2 s exceeded", job
        quick = client.post("/generate?class=cat&n=1&steps=1").headers["location"]
        assert poll_job(client, quick, timeout=60)["status"] == "succeeded"
