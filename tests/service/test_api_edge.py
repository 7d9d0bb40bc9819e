"""The API at its edge, no worker needed: validation (422 naming the field), 404s, 429, API key,
readiness without a worker or broker, model facts, cancelling a queued job, the OpenAPI docs."""
from __future__ import annotations

import uuid

import pytest

from diffusion.spec import DEFAULT_SETTINGS

from app.routers.health import router as health_router
from worker.jobs import JobStore, connect

from .conftest import client_for


def _locs(r) -> list[list]:
    return [e["loc"] for e in r.json()["detail"]]


@pytest.fixture(scope="module")
def idle_settings(make_settings):
    tag = uuid.uuid4().hex[:8]
    return make_settings(queue=f"idle-{tag}", key_prefix=f"idle-{tag}")


@pytest.fixture(scope="module")
def idle(idle_settings):
    """An API whose queue no worker reads: jobs stay queued."""
    with client_for(idle_settings) as c:
        yield c


@pytest.mark.parametrize("url, loc, words", [
    ("/generate?class=unicorn&n=5", ["query", "class"], ["unicorn", "airplane", "truck"]),
    ("/generate?class=cat&n=0", ["query", "n"], ["1..10000"]),
    ("/generate?class=cat&n=10001", ["query", "n"], ["1..10000"]),
    ("/generate?class=all&n=1001", ["query", "n"], ["10010", "10000"]),
    ("/generate?class=cat&n=5&sampler=euler", ["query", "sampler"], ["ddpm"]),
    ("/generate?class=cat&n=5&sampler=dpmpp&steps=101", ["query", "steps"], ["1..100"]),
    ("/generate?class=cat&n=5&sampler=ddim&steps=0", ["query", "steps"], ["1..1000"]),
    ("/generate?class=cat&n=5&guidance=20.5", ["query", "guidance"], ["0..20"]),
    ("/generate?class=cat&n=5&guidance=-1", ["query", "guidance"], ["0..20"]),
    ("/generate?class=cat&n=5&seed=-1", ["query", "seed"], ["0..2147483647"]),
    ("/generate?class=cat&n=5&seed=2147483648", ["query", "seed"], ["0..2147483647"]),
    ("/generate?n=5", ["query", "class"], ["required"]),
    ("/generate?class=10&n=5", ["query", "class"], ["0-9"]),
    ("/generate?class=%C2%B2&n=5", ["query", "class"], ["airplane", "0-9"]),      # a superscript 2
    ("/generate?class=%D9%A3&n=5", ["query", "class"], ["airplane", "0-9"]),      # an Arabic-Indic 3
    ("/generate?class=cat&n=5&guidance_interval=2.9,0.28", ["query", "guidance_interval"], ["0 <= lo < hi"]),
    ("/generate?class=cat&n=5&guidance_interval=0.28", ["query", "guidance_interval"], ["two noise levels"]),
    ("/generate?class=cat&n=5&guidance_interval=low,high", ["query", "guidance_interval"], ["'lo,hi'", "all"]),
    ("/generate?class=cat&n=5&spacing=even", ["query", "spacing"], ["'time'", "'logsnr'"]),
])
def test_bad_query_is_422_naming_the_field(idle, url, loc, words):
    r = idle.post(url)
    assert r.status_code == 422, r.text
    assert loc in _locs(r), r.json()
    msg = " ".join(e["msg"] for e in r.json()["detail"] if e["loc"] == loc)
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("body, loc, words", [
    ({"classes": {"cat": 5, "unicorn": 5}}, ["body", "classes", "unicorn"],
     ("unknown class 'unicorn'", "airplane", "truck")),
    ({"classes": {"cat": 5, "3": 5}}, ["body", "classes", "3"], ("'cat' is given twice",)),  # the same class twice
    ({"classes": {"cat": 0}}, ["body", "classes", "cat"], ("1..10000",)),
    ({"classes": {"cat": 6000, "dog": 6000}}, ["body", "classes"], ("12000 images in all", "at most 10000")),
    ({"classes": {}}, ["body", "classes"], ("at least 1 item",)),
    ({"classes": {"cat": 5}, "steps": 500, "sampler": "dpmpp"}, ["body", "steps"], ("dpmpp", "1..100")),
    ({"classes": {"cat": 5}, "guidance": 21}, ["body", "guidance"], ("20",)),
    ({"classes": {"cat": 5}, "seed": -3}, ["body", "seed"], ("greater than or equal to 0",)),
    ({"classes": {"cat": 5}, "sampler": "euler"}, ["body", "sampler"], ("'dpmpp_sde'",)),
    ({"classes": {"cat": 5}, "spacing": "karras"}, ["body", "spacing"], ("'time'", "'logsnr'")),
    ({"classes": {"cat": 5}, "colour": "red"}, ["body", "colour"], ("not permitted",)),
    ({"classes": {"cat": 5}, "guidance_interval": [3, 1]}, ["body", "guidance_interval"], ("0 <= lo < hi",)),
    ({"classes": {"cat": 5}, "guidance_interval": "0,inf"}, ["body", "guidance_interval"], ("(finite)", "inf")),
    ({"classes": {"cat": 5}, "guidance_interval": 2}, ["body", "guidance_interval"], ("two numbers", "got 2")),
    ({"classes": {"cat": 5}, "guidance_interval": {"0": 1, "3": 2}}, ["body", "guidance_interval"],
     ("two numbers",)),  # not its keys
    ({"classes": {"cat": True}}, ["body", "classes", "cat"], ("valid integer",)),  # not 1 image
    ({"classes": {"cat": "5"}}, ["body", "classes", "cat"], ("valid integer",)),
    ({"classes": {"cat": 5.5}}, ["body", "classes", "cat"], ("valid integer",)),
    ({"classes": {"cat": 5}, "steps": True}, ["body", "steps"], ("valid integer",)),
    ({"classes": {"cat": 5}, "seed": "7"}, ["body", "seed"], ("valid integer",)),
    ({"classes": {"cat": 5}, "guidance_interval": [True, 2]}, ["body", "guidance_interval"],
     ("must hold two numbers", "True")),  # strict, as above
    ({"classes": {"cat": 5}, "guidance_interval": ["0.5", "3"]}, ["body", "guidance_interval"],
     ("must hold two numbers", "'0.5'")),
])
def test_bad_body_is_422_naming_the_field(idle, body, loc, words):
    r = idle.post("/generate", json=body)
    assert r.status_code == 422, r.text
    assert loc in _locs(r), r.json()
    msg = " ".join(e["msg"] for e in r.json()["detail"] if e["loc"] == loc)
    for w in words:  # and the reason
        assert w in msg, (w, msg)


@pytest.mark.parametrize("url, body", [
    ("/generate", {"classes": {"cat": 1}, "guidance_interval": [0, 10 ** 400]}),
    ("/evaluations", {"guidance_interval": [0, 10 ** 400]}),
])
def test_an_integer_too_big_for_a_float_is_422_not_500(idle, url, body):
    # float(10 ** 400) raises OverflowError, not ValueError; it must still be the caller's error
    r = idle.post(url, json=body)
    assert r.status_code == 422, r.text
    assert ["body", "guidance_interval"] in _locs(r), r.json()
    assert any("two numbers" in e["msg"] for e in r.json()["detail"]), r.json()


@pytest.mark.parametrize("method, url, raw, loc", [
    ("post", "/generate?class=cat&n=1&guidance=nan", None, ["query", "guidance"]),
    ("post", "/generate?class=cat&n=1&guidance=inf", None, ["query", "guidance"]),
    ("post", "/generate?class=cat&n=1&guidance=1e400", None, ["query", "guidance"]),
    ("post", "/generate", '{"classes": {"cat": 1}, "guidance": NaN}', ["body", "guidance"]),
    ("post", "/generate", '{"classes": {"cat": 1}, "guidance": -Infinity}', ["body", "guidance"]),
    ("post", "/generate", '{"classes": {"cat": 1}, "guidance_interval": [1e308, 1e309]}', ["body", "guidance_interval"]),
    ("post", "/evaluations", '{"real_fraction": NaN}', ["body", "real_fraction"]),
    ("post", "/evaluations", '{"guidance": Infinity}', ["body", "guidance"]),
])
def test_nan_and_infinity_are_422_not_500(idle, method, url, raw, loc):
    """JSON has no NaN or infinity: the error echoes them as strings rather than failing to encode them."""
    r = idle.request(method, url, content=raw, headers={"Content-Type": "application/json"} if raw else None)
    assert r.status_code == 422, r.text
    assert loc in _locs(r), r.json()
    assert {str(e.get("input")) for e in r.json()["detail"] if e["loc"] == loc} & {
        "nan", "inf", "-inf", "[1e+308, 'inf']"}, r.json()


@pytest.mark.parametrize("query, body, expected", [
    ("", None, list(DEFAULT_SETTINGS.guidance_interval) if DEFAULT_SETTINGS.guidance_interval else None),
    ("&guidance_interval=0.5,3", None, [0.5, 3.0]),
    ("&guidance_interval=all", None, None),
    (None, {"classes": {"cat": 2}, "guidance_interval": [0.5, 3]}, [0.5, 3.0]),
    (None, {"classes": {"cat": 2}, "guidance_interval": "1,2"}, [1.0, 2.0]),
    (None, {"classes": {"cat": 2}, "guidance_interval": "all"}, None),
    (None, {"classes": {"cat": 2}, "guidance_interval": None}, None),
    # unguided (w 1 or 0): no step is guided, so no interval is recorded as if it applied
    ("&guidance=1", None, None),
    ("&guidance=0&guidance_interval=0.5,3", None, None),
    (None, {"classes": {"cat": 2}, "guidance": 1, "guidance_interval": [0.5, 3]}, None),
])
def test_guidance_interval_is_resolved_into_the_job_input(idle, query, body, expected):
    r = idle.post(f"/generate?class=cat&n=2{query}") if body is None else idle.post("/generate", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["input"]["guidance_interval"] == expected
    assert idle.get(r.json()["url"]).json()["input"]["guidance_interval"] == expected


@pytest.mark.parametrize("query, body, expected", [
    ("", None, "logsnr"), ("&spacing=logsnr", None, "logsnr"), ("&spacing=time", None, "time"),
    (None, {"classes": {"cat": 2}}, "logsnr"), (None, {"classes": {"cat": 2}, "spacing": "time"}, "time"),
])
def test_spacing_is_resolved_into_the_job_input(idle, query, body, expected):
    r = idle.post(f"/generate?class=cat&n=2{query}") if body is None else idle.post("/generate", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["input"]["spacing"] == expected
    assert idle.get(r.json()["url"]).json()["input"]["spacing"] == expected


@pytest.mark.parametrize("url, loc, words", [
    ("/generate?class=cat&n=5&stpes=3", ["query", "stpes"], ["unknown", "steps"]),       # a typo: not the default
    ("/generate?class=cat&n=5&n=10000", ["query", "n"], ["more than once"]),
    ("/generate?class=cat&class=dog&n=5", ["query", "class"], ["more than once"]),
    ("/evaluations?sampler=ddim", ["query", "sampler"], ["no query parameters", "JSON body"]),
])
def test_unknown_or_repeated_query_parameters_are_422(idle, url, loc, words):
    r = idle.post(url, json={} if url.startswith("/evaluations") else None)
    assert r.status_code == 422, r.text
    err = next(e for e in r.json()["detail"] if e["loc"] == loc)
    assert all(w in err["msg"] for w in words), err


@pytest.mark.parametrize("url, loc", [("/jobs?stauts=failed", ["query", "stauts"]),
                                       ("/jobs?status=failed&status=running", ["query", "status"])])
def test_the_job_list_refuses_unknown_or_repeated_query_parameters(idle, url, loc):
    """A typo would list every job as if it were the filtered list; a repeated filter, one of the two."""
    r = idle.get(url)
    assert r.status_code == 422, r.text
    assert loc in _locs(r)


@pytest.mark.parametrize("content_type", ["application/octet-stream", "text/plain", None])
def test_a_body_of_bytes_that_are_not_text_is_422_not_500(idle, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    for url in ("/generate", "/evaluations"):
        r = idle.post(url, content=b"\xff\xfe\x00garbage", headers=headers)
        assert r.status_code == 422, (url, r.text)


def test_an_image_index_too_long_for_int_is_404_not_500(idle):
    job = idle.post("/generate?class=cat&n=2").json()
    for index in ("9" * 5000, "1" * 10):  # int() refuses over 4,300 digits; no job holds 10-digit indices
        assert idle.get(f"{job['url']}/images/{index}.png").status_code == 404


def test_query_and_body_together_is_422(idle):
    r = idle.post("/generate?class=cat&n=3", json={"classes": {"dog": 3}})
    assert r.status_code == 422
    assert ["query", "class"] in _locs(r) and ["query", "n"] in _locs(r)


def test_submit_records_a_queued_job_with_resolved_input(idle):
    r = idle.post("/generate?class=CAT&n=7&sampler=ddim&steps=3&guidance=2")
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/jobs/{job['id']}" == job["url"]
    assert job["status"] == "queued" and job["type"] == "generation"
    assert job["input"]["classes"] == {"cat": 7}
    assert job["input"]["seed_drawn"] is True and 0 <= job["input"]["seed"] < 2**31
    assert (job["images_total"], job["steps"], job["progress"]) == (7, 3, 0.0)
    assert job["output"] is None and job["timings"]["started_at"] is None
    again = idle.get(job["url"]).json()
    assert again["input"] == job["input"] and again["queue_position"] == job["queue_position"] >= 1

    by_index = idle.post("/generate", json={"classes": {"3": 2, "Dog": 1}, "seed": 11}).json()
    assert by_index["input"]["classes"] == {"cat": 2, "dog": 1}
    assert by_index["input"]["seed"] == 11 and by_index["input"]["seed_drawn"] is False
    assert by_index["queue_position"] == again["queue_position"] + 1
    everything = idle.post("/generate?class=all&n=1").json()
    assert list(everything["input"]["classes"]) == ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                    "frog", "horse", "ship", "truck"]


def test_cancel_queued_job_at_once_and_finished_job_is_409(idle):
    a = idle.post("/generate?class=cat&n=1").json()
    b = idle.post("/generate?class=dog&n=1").json()
    r = idle.post(f"/jobs/{a['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert r.json()["queue_position"] is None and r.json()["timings"]["finished_at"] is not None
    assert idle.get(b["url"]).json()["queue_position"] == b["queue_position"] - 1  # moved up
    assert idle.post(f"/jobs/{a['id']}/cancel").status_code == 409
    listed = idle.get("/jobs?limit=50&status=canceled").json()["jobs"]
    assert a["id"] in [j["id"] for j in listed] and all(j["status"] == "canceled" for j in listed)


@pytest.mark.parametrize("now, code", [(None, 404), ("succeeded", 409), ("failed", 409)])
def test_a_cancel_that_finds_the_job_gone_or_finished_meanwhile_is_404_or_409(idle_settings, now, code):
    """The record read before the cancel may have expired (an unconfirmed submit) or finished by the time the
    cancel is applied: a 404 or a 409 as for a job found so, not a 500 or a 202 "cancel requested"."""
    from app.deps import get_store

    store = JobStore(connect(idle_settings.redis_url), idle_settings.key_prefix)
    original = store.request_cancel

    def request_cancel(job_id):
        record = original(job_id)
        if now is None:
            store.forget(job_id)
            return store.get(job_id)
        return dict(record, status=now)

    store.request_cancel = request_cancel  # type: ignore[method-assign]
    with client_for(idle_settings) as c:
        c.app.dependency_overrides[get_store] = lambda: store
        job = c.post("/generate?class=cat&n=1").json()
        _set_status(idle_settings, job["id"], "running")
        r = c.post(f"/jobs/{job['id']}/cancel")
    assert r.status_code == code, r.text


def test_a_job_sent_while_redis_fails_is_answered_with_its_id(idle_settings):
    """Redis fails just after the message was sent: the record cannot be confirmed, nor its queue position read.
    The client must still get its 202 and job id (a 503 would make it submit the same job again)."""
    from app.deps import get_store

    from .service_testlib import unreachable_for

    store = JobStore(connect(idle_settings.redis_url), idle_settings.key_prefix)
    store.confirm = unreachable_for(1, store.confirm)  # type: ignore[method-assign]
    store.queue_position = unreachable_for(1, store.queue_position)  # type: ignore[method-assign]
    with client_for(idle_settings) as c:
        c.app.dependency_overrides[get_store] = lambda: store
        r = c.post("/generate?class=cat&n=1")
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == job["url"] and job["status"] == "queued" and job["queue_position"] is None
        assert c.get(job["url"]).json()["queue_position"] >= 1  # Redis back: the job is there, in the queue


def test_recent_jobs_newest_first_with_limit(idle):
    ids = [idle.post("/generate?class=bird&n=1").json()["id"] for _ in range(3)]
    jobs = idle.get("/jobs?limit=2").json()["jobs"]
    assert [j["id"] for j in jobs] == ids[:0:-1]
    assert idle.get("/jobs?limit=0").status_code == 422
    assert idle.get("/jobs?limit=101").status_code == 422


@pytest.mark.parametrize("path", [
    "/jobs/0123456789abcdef0123456789abcdef",            # well formed, unknown
    "/jobs/0123456789abcdef0123456789abcdef/grid.png",
    "/jobs/not-a-job",
    "/jobs/..%2F..%2F..%2Fetc%2Fpasswd",
    "/jobs/..%2F..%2Fetc/grid.png",
    "/jobs/%2e%2e/images.zip",
    "/jobs/0123456789ABCDEF0123456789ABCDEF",            # upper case is not a job id
])
def test_unknown_and_traversal_ids_are_404(idle, path):
    assert idle.get(path).status_code == 404
    assert idle.post(path.split("/grid")[0].split("/images")[0] + "/cancel").status_code == 404


def test_files_of_an_unfinished_job_are_404(idle):
    job = idle.post("/generate?class=cat&n=2").json()
    for f in ("grid.png", "images.zip", "manifest.json", "images/0.png", "images/2.png", "images/-1.png",
              "images/x.png", "images/..%2F..%2Fresult.json"):
        assert idle.get(f"{job['url']}/{f}").status_code == 404, f


def _set_status(settings, job_id: str, status: str, **fields) -> None:
    """Move a job along as a worker would (no worker reads the idle queue)."""
    store = JobStore(connect(settings.redis_url), settings.key_prefix)
    assert store.transition(job_id, ("queued", "running", "succeeded"), dict(fields, status=status)) is not None


def test_final_files_only_once_the_job_succeeded(idle, idle_settings):
    """A redelivered job's folder may hold the zip, grid and manifest of an earlier attempt: while it runs they
    are 404 (its images are served as soon as they are written); and a generation job has no report."""
    job = idle.post("/generate?class=cat&n=2").json()
    folder = idle_settings.jobs_dir / job["id"]
    (folder / "images").mkdir(parents=True)
    for name in ("grid.png", "images.zip", "manifest.json", "images/00000.png", "report.json"):
        (folder / name).write_bytes(b"any bytes: only where they are served from matters here")
    _set_status(idle_settings, job["id"], "running")
    assert idle.get(f"{job['url']}/images/0.png").status_code == 200
    for f in ("grid.png", "images.zip", "manifest.json"):
        r = idle.get(f"{job['url']}/{f}")
        assert r.status_code == 404 and "job running" in r.json()["detail"], f
    _set_status(idle_settings, job["id"], "succeeded", output={"images": 2})
    for f in ("grid.png", "images.zip", "manifest.json", "images/0.png"):
        assert idle.get(f"{job['url']}/{f}").status_code == 200, f
    r = idle.get(f"{job['url']}/report.json")
    assert r.status_code == 404 and "not an evaluation" in r.json()["detail"]


def test_a_link_out_of_the_job_folder_is_not_followed(idle, idle_settings, tmp_path):
    job = idle.post("/generate?class=cat&n=2").json()
    folder = idle_settings.jobs_dir / job["id"]
    (folder / "images").mkdir(parents=True)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the web")
    other = idle.post("/generate?class=dog&n=1").json()  # another job's file is outside this folder too
    (idle_settings.jobs_dir / other["id"]).mkdir(parents=True)
    (idle_settings.jobs_dir / other["id"] / "grid.png").write_bytes(b"the other job's grid")
    (folder / "grid.png").symlink_to(secret)
    (folder / "images.zip").symlink_to(idle_settings.jobs_dir / other["id"] / "grid.png")
    (folder / "images" / "00000.png").symlink_to(secret)
    (folder / "images" / "00001.png").write_bytes(b"a real image")
    _set_status(idle_settings, job["id"], "succeeded", output={"images": 2})
    for f in ("grid.png", "images.zip", "images/0.png"):
        r = idle.get(f"{job['url']}/{f}")
        assert r.status_code == 404 and b"not for the web" not in r.content, f
    assert idle.get(f"{job['url']}/images/1.png").content == b"a real image"


def test_a_job_folder_that_is_a_link_is_not_served(idle, idle_settings, tmp_path):
    """``jobs/<id>`` itself a link (to another job's folder, or anywhere): nothing in it is served."""
    other = idle.post("/generate?class=dog&n=2").json()
    idle_settings.jobs_dir.mkdir(parents=True, exist_ok=True)
    for target in (tmp_path / "elsewhere", idle_settings.jobs_dir / other["id"]):
        job = idle.post("/generate?class=cat&n=2").json()
        (target / "images").mkdir(parents=True, exist_ok=True)
        (target / "grid.png").write_bytes(b"not this job's grid")
        (target / "images" / "00000.png").write_bytes(b"not this job's image")
        (idle_settings.jobs_dir / job["id"]).symlink_to(target, target_is_directory=True)
        _set_status(idle_settings, job["id"], "succeeded", output={"images": 2})
        for f in ("grid.png", "images/0.png"):
            r = idle.get(f"{job['url']}/{f}")
            assert r.status_code == 404 and b"not this job's" not in r.content, (target, f)


def test_an_evaluation_whose_files_are_gone_still_answers(idle, idle_settings):
    """A succeeded record can outlive its folder (deleted by hand, another data dir): the job still answers,
    without a report, and its files are 404."""
    job = idle.post("/evaluations", json={"classifier": "mlp", "synthetic_per_class": 2, "epochs": 1,
                                          "seeds": [0]}).json()
    output = {"plots": ["accuracy"], "accuracy_mean": {"real": 0.5, "real+synthetic": 0.5, "synthetic": 0.2},
              "delta_mean": 0.0, "seconds": 1.0}  # what the worker records
    _set_status(idle_settings, job["id"], "succeeded", output=output)
    r = idle.get(f"/evaluations/{job['id']}")
    assert r.status_code == 200 and r.json()["status"] == "succeeded" and r.json()["report"] is None
    for f in ("report.json", "report.md", "plots/accuracy.png"):
        assert idle.get(f"/jobs/{job['id']}/{f}").status_code == 404, f


def test_full_queue_is_429(make_settings):
    tag = uuid.uuid4().hex[:8]
    with client_for(make_settings(queue=f"full-{tag}", key_prefix=f"full-{tag}", max_queued=2)) as c:
        assert [c.post("/generate?class=cat&n=1").status_code for _ in range(2)] == [202, 202]
        r = c.post("/generate?class=cat&n=1")
        assert r.status_code == 429 and "Retry-After" in r.headers
        assert len(c.get("/jobs").json()["jobs"]) == 2  # the refused job left no record


def test_api_key_when_configured(make_settings):
    tag = uuid.uuid4().hex[:8]
    with client_for(make_settings(queue=f"key-{tag}", key_prefix=f"key-{tag}", api_key="s3cret")) as c:
        assert c.get("/classes").status_code == 401
        assert c.get("/classes", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get("/classes", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.post("/generate?class=cat&n=1").status_code == 401
        assert c.get("/healthz").status_code == 200  # probes stay open
        spec = c.get("/openapi.json")  # the API's description stays open, as README says ...
        assert spec.status_code == 200 and c.get("/docs").status_code == 200
        health = {r.path for r in health_router.routes}
        params = {"job_id": uuid.uuid4().hex, "i": "0", "name": "accuracy"}
        for path, methods in spec.json()["paths"].items():  # ... and every route but the probes needs the key
            for method in methods:
                code = c.request(method, path.format(**params)).status_code
                assert (code != 401) if path in health else code == 401, (method, path, code)


def test_without_a_key_only_loopback_clients_are_served(make_settings):
    """However the API was started (uvicorn --host 0.0.0.0 skips the CLI's check), a service without a key
    answers remote clients 403 on every guarded route, unless allow_public says something else guards it."""
    from app.deps import NO_KEY_REMOTE

    tag = uuid.uuid4().hex[:8]
    open_settings = make_settings(queue=f"lo-{tag}", key_prefix=f"lo-{tag}")
    for host in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        with client_for(open_settings, host=host) as c:
            assert c.get("/classes").status_code == 200, host
    for host in ("203.0.113.7", "10.0.0.2", "::ffff:192.0.2.1", "2001:db8::1", "testclient"):
        with client_for(open_settings, host=host) as c:
            r = c.post("/generate?class=cat&n=1")
            assert r.status_code == 403 and r.json()["detail"] == NO_KEY_REMOTE, (host, r.text)
            assert c.get("/classes").status_code == 403 and c.get("/jobs").status_code == 403
            assert c.get("/healthz").status_code == 200 and c.get("/openapi.json").status_code == 200
    with client_for(open_settings) as c:
        assert c.get("/jobs").json()["jobs"] == []  # nothing was queued by the refused requests
        for header in ("Forwarded", "X-Forwarded-For", "X-Real-IP", "Via"):  # a proxy on this machine
            r = c.get("/classes", headers={header: "for=203.0.113.7" if header == "Forwarded" else "203.0.113.7"})
            assert r.status_code == 403, header
    with client_for(make_settings(queue=f"lo-{tag}", key_prefix=f"lo-{tag}", allow_public=True),
                    host="203.0.113.7") as c:
        assert c.get("/classes").status_code == 200
    with client_for(make_settings(queue=f"lo-{tag}", key_prefix=f"lo-{tag}", api_key="s3cret"),
                    host="203.0.113.7") as c:  # with a key, the key decides, wherever the client is
        assert c.get("/classes").status_code == 401
        assert c.get("/classes", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_a_huge_body_is_refused_before_it_is_read_or_the_key_checked(make_settings):
    from app.main import MAX_BODY_BYTES

    tag = uuid.uuid4().hex[:8]
    with client_for(make_settings(queue=f"body-{tag}", key_prefix=f"body-{tag}", api_key="s3cret")) as c:
        big = b'{"classes": {"cat": 1}, "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'
        for headers in ({}, {"X-API-Key": "s3cret"}):
            r = c.post("/generate", content=big, headers=dict(headers, **{"Content-Type": "application/json"}))
            assert r.status_code == 413, r.text
            chunked = c.post("/evaluations", content=iter([big[:1000], big[1000:]]),  # no Content-Length
                             headers=dict(headers, **{"Content-Type": "application/json"}))
            assert chunked.status_code == 413, chunked.text
        ok = c.post("/generate", json={"classes": {"cat": 1}}, headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 202, ok.text
        assert c.post("/generate", json={"classes": {"cat": 1}}).status_code == 401


def test_classes_and_models_come_from_the_checkpoint(idle, tiny_checkpoint):
    classes = idle.get("/classes").json()["classes"]
    assert classes[3] == {"index": 3, "name": "cat"} and len(classes) == 10
    model = idle.get("/models").json()["models"][0]
    assert model["name"] == tiny_checkpoint.name and len(model["sha256"]) == 64
    assert model["unet"]["base_channels"] == 8 and model["schedule"]["timesteps"] == 1000
    assert model["provenance"]["steps"] == 0
    assert model["samplers"]["dpmpp"] == {"min_steps": 1, "max_steps": 100}


def test_models_name_the_training_data_without_its_path():
    """A checkpoint records where it was trained from; the API shows the file name, not that machine's folders."""
    from app.routers.models import public_provenance

    assert public_provenance({"dataset": "/home/me/data/cifar10-jpeg.tar.gz", "steps": 4}) == {
        "dataset": "cifar10-jpeg.tar.gz", "steps": 4}
    assert public_provenance({"steps": 4}) == {"steps": 4}


def test_a_key_is_stripped_and_must_be_printable_ascii(make_settings):
    """A secrets file's trailing newline would never match (HTTP strips it from the header); a non-ASCII key does
    not reach the API as it was sent."""
    from pydantic import ValidationError

    tag = uuid.uuid4().hex[:8]
    with client_for(make_settings(queue=f"key-{tag}", key_prefix=f"key-{tag}", api_key="s3cret\n")) as c:
        assert c.get("/classes", headers={"X-API-Key": "s3cret"}).status_code == 200
    with pytest.raises(ValidationError, match="printable ASCII"):
        make_settings(api_key="clé")


def test_guarded_routes_document_401_and_403(idle):
    spec = idle.get("/openapi.json").json()
    for method, op in spec["paths"]["/jobs/{job_id}"].items():
        assert {"401", "403"} <= set(op["responses"]), method
    assert "413" in spec["paths"]["/generate"]["post"]["responses"]
    assert "401" not in spec["paths"]["/healthz"]["get"]["responses"]


def test_the_image_cap_is_the_setting_not_a_constant(idle_settings):
    """DREAMDATA_MAX_N: a service capped at 30 images a job refuses 31, in one class or across classes."""
    with client_for(idle_settings.model_copy(update={"max_n": 30})) as c:
        r = c.post("/generate?class=cat&n=31")
        assert r.status_code == 422 and "1..30" in r.text, r.text
        r = c.post("/generate?class=all&n=4")
        assert r.status_code == 422 and "40 images in all; at most 30 per job" in r.text, r.text
        r = c.post("/generate", json={"classes": {"cat": 20, "dog": 11}})
        assert r.status_code == 422 and "31 images in all; at most 30 per job" in r.text, r.text
        assert c.post("/generate?class=cat&n=30").status_code == 202


def test_missing_checkpoint_is_503(make_settings, tmp_path):
    with client_for(make_settings(checkpoint=tmp_path / "nothing")) as c:
        r = c.get("/classes")
        assert r.status_code == 503 and "nothing" in r.json()["detail"]
        assert str(tmp_path) not in r.text  # the checkpoint's name, not its path on the server
        assert c.post("/generate?class=cat&n=1").status_code == 503


def test_readyz_503_without_worker_or_broker(make_settings):
    with client_for(make_settings(db=15)) as c:  # no test starts a worker on database 15 (keep it so)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["broker"] == "ok" and r.json()["workers"] == []
        assert c.get("/healthz").json() == {"status": "ok"}
    with client_for(make_settings(redis_url="redis://127.0.0.1:1/0")) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["broker"].startswith("unreachable")
        assert c.get("/jobs").status_code == 503


def test_openapi_documents_every_route_with_examples(idle):
    spec = idle.get("/openapi.json").json()
    assert idle.get("/docs").status_code == 200
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            assert op.get("summary") and op.get("description"), (method, path)
    gen = spec["paths"]["/generate"]["post"]
    assert gen["requestBody"]["content"]["application/json"]["examples"]
    assert all(p.get("examples") for p in gen["parameters"])
    assert spec["components"]["schemas"]["GenerationJob"]["examples"]
    assert spec["components"]["schemas"]["EvaluationJob"]["examples"]
    evaluation = spec["paths"]["/evaluations"]["post"]
    assert evaluation["requestBody"]["content"]["application/json"]["examples"]
    # the guidance interval is documented as what a client sends: 'lo,hi', 'all', [lo, hi] or null
    for body in ("GenerateBody", "EvaluationBody"):
        interval = spec["components"]["schemas"][body]["properties"]["guidance_interval"]
        assert sorted(t["type"] for t in interval["anyOf"]) == ["array", "null", "string"], interval
        assert interval["description"].startswith("guide only the steps")
    example = gen["requestBody"]["content"]["application/json"]["examples"]
    sent = next(iter(example.values()))["value"] if isinstance(example, dict) else example[0]
    assert isinstance(sent["guidance_interval"], str)
    assert idle.post("/generate", json=sent).status_code == 202  # the documented example is accepted
    plot = spec["paths"]["/jobs/{job_id}/plots/{name}.png"]["get"]
    assert all(p.get("examples") or p["schema"].get("examples") for p in plot["parameters"])
