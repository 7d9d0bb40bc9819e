"""Small parts of the service: settings, the job store, progress throttling, shared rules."""
from __future__ import annotations

import time
import uuid

import pytest
import redis
from pydantic import ValidationError

from diffusion.spec import resolve_class
from diffusion.spec import DEFAULT_SETTINGS
from worker.jobs import PENDING_TTL, JobStore, QueueFull, connect, is_job_id, new_job_id, new_record
from worker.progress import JobCanceled, ProgressReporter, fraction
from worker.settings import Settings, get_settings

from .service_testlib import CIFAR10_CLASSES, Flaky, unreachable_for


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("DREAMDATA_MAX_N", "50")
    monkeypatch.setenv("DREAMDATA_API_KEY", "zebra-secret")
    get_settings.cache_clear()
    try:
        s = get_settings()
        assert (s.redis_url, s.max_n, s.api_key.get_secret_value()) == ("redis://example:6380/2", 50, "zebra-secret")
        assert get_settings() is s
        assert "zebra-secret" not in repr(s)
    finally:
        get_settings.cache_clear()


def test_the_model_batch_is_the_devices_unless_set(monkeypatch):
    import torch

    monkeypatch.delenv("DREAMDATA_BATCH_SIZE", raising=False)
    assert Settings().batch_size is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Settings().model_batch == 50
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Settings().model_batch == 256
    monkeypatch.setenv("DREAMDATA_BATCH_SIZE", "7")
    assert Settings().model_batch == 7
    with pytest.raises(ValidationError, match="batch_size"):
        Settings(batch_size=0)


def test_visibility_timeout_must_exceed_the_longest_hard_limit():
    s = Settings(job_time_limit=100, eval_time_limit=50, job_kill_grace=10)
    assert s.hard_time_limit == 110 and s.effective_visibility_timeout == 410
    e = Settings(job_time_limit=100, eval_time_limit=1000, job_kill_grace=10)
    assert e.eval_hard_time_limit == 1010 and e.effective_visibility_timeout == 1310
    with pytest.raises(ValidationError, match="visibility_timeout"):
        Settings(job_time_limit=100, eval_time_limit=50, job_kill_grace=10, visibility_timeout=110)
    with pytest.raises(ValidationError, match="visibility_timeout"):
        Settings(job_time_limit=100, eval_time_limit=1000, job_kill_grace=10, visibility_timeout=500)


def test_an_empty_environment_variable_means_unset(monkeypatch):
    """compose's ${X:-} passes X= when X is unset: that is not the current folder, an empty Redis URL or a
    number that fails to parse."""
    for name in ("DREAMDATA_DATA_DIR", "DREAMDATA_CHECKPOINT", "DREAMDATA_BATCH_SIZE", "DREAMDATA_EVAL_DATA",
                 "DREAMDATA_API_KEY", "DREAMDATA_VISIBILITY_TIMEOUT", "DREAMDATA_REDIS_URL"):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:6379/2")
    s = Settings()
    default = Settings.model_fields
    assert s.data_dir == default["data_dir"].default and s.checkpoint == default["checkpoint"].default
    assert (s.batch_size, s.eval_data, s.api_key, s.visibility_timeout) == (None, None, None, None)
    assert s.redis_url == "redis://elsewhere:6379/2"


def test_job_ids_are_strict():
    assert is_job_id(new_job_id())
    for bad in ("", "../etc", "0" * 31, "0" * 33, "G" * 32, "A" * 32, "0" * 32 + "\n"):
        assert not is_job_id(bad)


def test_store_queue_position_cancel_and_limits(settings):
    store = JobStore(connect(settings.redis_url), f"units-{uuid.uuid4().hex[:8]}")
    ids = [new_job_id() for _ in range(3)]
    for i in ids:
        store.create(new_record(i, {"steps": 2}, 1, 2), max_queued=3)
        time.sleep(0.002)
    with pytest.raises(QueueFull):
        store.create(new_record(new_job_id(), {"steps": 2}, 1, 2), max_queued=3)
    assert [store.queue_position(i) for i in ids] == [1, 2, 3]
    assert store.request_cancel(ids[0])["status"] == "canceled"
    assert store.queue_position(ids[0]) is None and store.queue_position(ids[2]) == 2
    assert store.transition(ids[0], ("queued",), {"status": "running"}) is None  # canceled stays canceled
    assert store.transition(ids[1], ("queued",), {"status": "running"})["status"] == "queued"
    assert store.queued_count() == 1
    assert [r["id"] for r in store.recent(10)] == ids[::-1]
    assert [r["id"] for r in store.recent(10, status="running")] == [ids[1]]
    assert store.get(new_job_id()) is None


class _Broker:
    """A Celery app's ``send_task``: records the messages, or raises ``error``."""

    def __init__(self, error: Exception | None = None):
        self.error, self.sent = error, []

    def send_task(self, name, kwargs, task_id, queue):
        if self.error:
            raise self.error
        self.sent.append(task_id)


def test_a_record_lives_only_once_its_message_is_sent(settings):
    """A new record expires unless its message reached the broker: the API sends, then confirms."""
    from app.submit import submit

    store = JobStore(connect(settings.redis_url), f"units-{uuid.uuid4().hex[:8]}")
    job_id, broker = new_job_id(), _Broker()
    rec = submit(new_record(job_id, {"steps": 2}, 1, 2), "t", store, broker, settings)
    assert rec["status"] == "queued" and broker.sent == [job_id]
    assert store.r.ttl(store.key(job_id)) == -1  # kept until the job finishes

    store.create(new_record(pending := new_job_id(), {"steps": 2}, 1, 2), max_queued=10)  # no message yet
    assert 0 < store.r.ttl(store.key(pending)) <= PENDING_TTL
    store.transition(pending, ("queued",), {"status": "running"})  # a worker's start keeps it too
    assert store.r.ttl(store.key(pending)) == -1
    forever = JobStore(store.r, store.prefix, keep=0)
    forever.create(new_record(done := new_job_id(), {"steps": 2}, 1, 2), max_queued=10)
    forever.transition(done, ("queued",), {"status": "canceled"})  # finished before any confirm, kept for ever
    assert store.r.ttl(store.key(done)) == -1


def _orphan_before_a_job(settings, max_queued: int) -> tuple[JobStore, str, str]:
    """A submit whose message was never sent (unconfirmed), then a confirmed one queued behind it."""
    store = JobStore(connect(settings.redis_url), f"units-{uuid.uuid4().hex[:8]}")
    orphan, queued = new_job_id(), new_job_id()
    store.create(new_record(orphan, {"steps": 2}, 1, 2), max_queued=max_queued)
    time.sleep(0.002)
    store.create(new_record(queued, {"steps": 2}, 1, 2), max_queued=max_queued)
    store.confirm(queued)
    return store, orphan, queued


def test_a_job_whose_message_was_never_sent_holds_no_place_in_the_queue(settings):
    """The API died between storing a record and sending its message: the record expires, and its id stops
    counting toward the queue limit: a full queue takes the next submit."""
    store, orphan, queued = _orphan_before_a_job(settings, max_queued=2)
    store.r.pexpire(store.key(orphan), 1)  # PENDING_TTL passing
    time.sleep(0.01)
    store.create(new_record(late := new_job_id(), {"steps": 2}, 1, 2), max_queued=2)  # not QueueFull
    assert store.get(orphan) is None and store.queue_position(orphan) is None
    assert [store.queue_position(i) for i in (queued, late)] == [1, 2]


def test_an_expired_submit_is_not_counted_while_the_queue_has_room(settings):
    """The same without a full queue or a later submit: positions and the queued count (GET /readyz) skip it."""
    store, orphan, queued = _orphan_before_a_job(settings, max_queued=100)
    assert store.queue_position(queued) == 2 and store.queued_count() == 2
    store.r.pexpire(store.key(orphan), 1)  # PENDING_TTL passing
    time.sleep(0.01)
    assert store.queue_position(queued) == 1 and store.queued_count() == 1
    assert store.queue_position(orphan) is None


def test_a_failed_send_leaves_no_queued_record_even_if_redis_fails_too(settings):
    from fastapi import HTTPException

    from app.submit import submit

    store = JobStore(connect(settings.redis_url), f"units-{uuid.uuid4().hex[:8]}")
    job_id = new_job_id()
    with pytest.raises(HTTPException) as e:
        submit(new_record(job_id, {"steps": 2}, 1, 2), "t", store, _Broker(ConnectionError("refused")), settings)
    assert e.value.status_code == 503 and "could not enqueue" in e.value.detail
    assert store.get(job_id) is None and store.queued_count() == 0  # forgotten

    store.forget = unreachable_for(1, store.forget)  # the broker's Redis is the store's: the clean-up fails too
    with pytest.raises(HTTPException) as e:
        submit(new_record(job_id := new_job_id(), {"steps": 2}, 1, 2), "t", store,
               _Broker(ConnectionError("refused")), settings)
    assert e.value.status_code == 503
    assert 0 < store.r.ttl(store.key(job_id)) <= PENDING_TTL  # it expires by itself


def test_a_sent_job_whose_confirm_fails_is_still_answered(settings):
    """Redis failed just after the message went: the client still gets its job (the worker's start keeps
    the record)."""
    from app.submit import submit

    store = JobStore(connect(settings.redis_url), f"units-{uuid.uuid4().hex[:8]}")
    store.confirm = unreachable_for(1, store.confirm)
    job_id, broker = new_job_id(), _Broker()
    rec = submit(new_record(job_id, {"steps": 2}, 1, 2), "t", store, broker, settings)
    assert rec["id"] == job_id and rec["status"] == "queued" and broker.sent == [job_id]


def test_progress_of_a_forgotten_job_does_not_bring_its_record_back(settings):
    """The API forgets a job whose message it could not send; if the message got through after all, the
    worker's progress writes must not leave a record without a status (GET /jobs/{id} would be a 500)."""
    store = JobStore(connect(settings.redis_url), f"units-{uuid.uuid4().hex[:8]}")
    job_id = new_job_id()
    store.create(new_record(job_id, {"steps": 2}, 1, 2), max_queued=3)
    assert store.update(job_id, progress=0.5) is True and store.get(job_id)["progress"] == 0.5
    store.forget(job_id)
    assert store.update(job_id, progress=0.75, step=1) is False
    assert store.get(job_id) is None and not store.r.exists(store.key(job_id))
    store.r.hset(store.key(job_id), "progress", "1.0")  # a remnant written before this rule: still no job
    assert store.get(job_id) is None


def test_a_status_change_is_tried_again_while_redis_is_unreachable(settings):
    prefix = f"retry-{uuid.uuid4().hex[:8]}"
    client = connect(settings.redis_url)
    job_id = new_job_id()
    JobStore(client, prefix).create(new_record(job_id, {}, 1, 2), max_queued=10)

    api = JobStore(connect(settings.redis_url), prefix)  # retry_for 0: the API answers 503 at once
    api.r.transaction = unreachable_for(1, api.r.transaction)
    with pytest.raises(redis.exceptions.ConnectionError):
        api.transition(job_id, ("queued",), {"status": "running"})
    assert api.get(job_id)["status"] == "queued"

    worker = JobStore(connect(settings.redis_url), prefix, retry_for=30)
    waits = []
    worker.sleep = waits.append
    worker.r.transaction = unreachable_for(3, worker.r.transaction)
    assert worker.transition(job_id, ("queued",), {"status": "running"})["status"] == "queued"
    assert worker.get(job_id)["status"] == "running" and waits == [0.5, 1.0, 2.0]  # backoff

    for not_transient in (redis.exceptions.AuthenticationError("wrong password"),
                          redis.exceptions.ResponseError("WRONGTYPE")):  # no wait mends these: raised at once
        worker = JobStore(connect(settings.redis_url), prefix, retry_for=30)
        worker.sleep = waits.append

        def broken(*args, error=not_transient, **kwargs):
            raise error
        worker.r.transaction = broken
        with pytest.raises(type(not_transient)):
            worker.transition(job_id, ("running",), {"status": "succeeded"})
    assert waits == [0.5, 1.0, 2.0]
    worker = JobStore(connect(settings.redis_url), prefix, retry_for=30)  # a replica being promoted: waited out
    worker.sleep = waits.append
    transaction = worker.r.transaction
    worker.r.transaction = Flaky(transaction, lambda i: i == 1,
                                 redis.exceptions.ReadOnlyError("You can't write against a read only replica."))
    assert worker.transition(job_id, ("running",), {"status": "running", "note": 1}) is not None
    assert waits == [0.5, 1.0, 2.0, 0.5]
    # a per-call window overrides the store's (JobTask.on_failure: the worker's main process must not stall)
    worker.r.transaction = unreachable_for(100, transaction)
    with pytest.raises(redis.exceptions.ConnectionError):
        worker.transition(job_id, ("running",), {"status": "succeeded"}, retry_for=0)
    assert waits == [0.5, 1.0, 2.0, 0.5]  # no wait at all

    worker = JobStore(connect(settings.redis_url), prefix, retry_for=1.2)  # gives up after its window
    worker.r.transaction = unreachable_for(100, worker.r.transaction)
    now, waits = [0.0], []
    worker.clock = lambda: now[0]
    worker.sleep = lambda s: (waits.append(s), now.__setitem__(0, now[0] + s))
    with pytest.raises(redis.exceptions.ConnectionError):
        worker.transition(job_id, ("running",), {"status": "succeeded"})
    assert waits == [0.5]  # waited 0.5 s once; the next wait (1 s) would pass the window


def test_a_start_whose_reply_was_lost_is_not_counted_twice(settings):
    """The first try of start_job's transition is applied, then the connection drops before the reply: the retry
    finds the job running under its own delivery mark and changes nothing (attempts stays 1)."""
    from worker.generation import start_job

    store = JobStore(connect(settings.redis_url), f"lost-{uuid.uuid4().hex[:8]}", retry_for=30)
    store.sleep = lambda s: None
    job_id = new_job_id()
    store.create(new_record(job_id, {}, 1, 2), max_queued=10)
    transaction, lost = store.r.transaction, [1]

    def applied_then_lost(*args, **kwargs):
        out = transaction(*args, **kwargs)
        if lost and lost.pop():
            raise redis.exceptions.ConnectionError("Connection reset by peer")
        return out
    store.r.transaction = applied_then_lost
    s = settings.model_copy(update={"max_attempts": 1})
    rec = start_job(store, job_id, s, "w1")
    assert rec["status"] == "running" and rec["attempts"] == 1 and not lost
    store.r.transaction = transaction
    again = start_job(store, job_id, s, "w2")  # a real second delivery is counted, and gives up at max_attempts
    assert again["status"] == "failed" and "gave up after 1 attempts" in again["error"]


def test_only_a_direct_loopback_peer_is_local():
    from starlette.requests import Request

    from app.deps import _local

    def request(client, headers=()):
        return Request({"type": "http", "client": client, "headers": [(k.encode(), v.encode()) for k, v in headers]})

    assert _local(request(("127.0.0.1", 5))) and _local(request(("::1", 5)))
    assert not _local(request(("192.0.2.1", 5)))
    assert not _local(request(None))  # a Unix socket: whoever is behind it (a proxy) is not known to be local
    assert not _local(request(("127.0.0.1", 5), [("x-forwarded-for", "127.0.0.1")]))  # through a proxy
    assert not _local(request(("127.0.0.1", 5), [("forwarded", "for=198.51.100.3")]))


def test_progress_is_throttled_monotonic_and_cancels():
    now = [0.0]
    writes, cancel = [], [False]
    rep = ProgressReporter(lambda **f: writes.append(f), lambda: cancel[0], batch_size=10, interval=0.5,
                           clock=lambda: now[0])
    for step in range(1, 21):           # 20 steps in 1.25 s (exact binary fractions): one write per 0.5 s
        now[0] += 0.0625
        rep(0, 20, step, 20)
    rep(10, 20, 20, 20)                 # batch done, 0.1875 s after the last write: not written
    assert [w["step"] for w in writes] == [1, 9, 17]  # at 0.0625, 0.5625 and 1.0625 s
    rep(20, 20, 20, 20)                 # the last call is always written
    assert writes[-1]["progress"] == 1.0 and writes[-1]["images_done"] == 20
    assert [w["progress"] for w in writes] == sorted(w["progress"] for w in writes)
    cancel[0] = True
    with pytest.raises(JobCanceled):
        rep(10, 20, 1, 20)


def test_progress_estimates_the_time_left_from_this_runs_rate():
    """A job resumed with half its images on disk: the rate counts only what this run made, from its first
    call; the API counts the estimate down from the write."""
    from app.job_view import eta_seconds

    now, writes = [0.0], []
    rep = ProgressReporter(lambda **f: writes.append(f), lambda: False, batch_size=10, interval=0.0,
                           clock=lambda: now[0])
    rep(10, 20, 1, 20)                  # resumed: 10 of 20 images on disk, the first step of the next batch
    assert writes[-1]["eta_seconds"] is None  # nothing measured yet
    now[0] = 5.0
    rep(10, 20, 11, 20)                 # 10 more steps of the batch of 10 in 5 s: 0.525 -> 0.775 at 0.05/s
    assert writes[-1]["progress"] == 0.775 and writes[-1]["eta_seconds"] == 4.5
    now[0] = 10.0
    rep(20, 20, 20, 20)
    assert writes[-1]["eta_seconds"] == 0.0

    rec = {"status": "running", "eta_seconds": 4.5, "updated_at": 100.0}
    assert eta_seconds(rec, now=101.0) == 3.5 and eta_seconds(rec, now=120.0) == 0.0
    assert eta_seconds(rec, now=200.0) is None  # long past its estimate with no new write: unknown
    assert eta_seconds(dict(rec, status="queued"), now=101.0) is None
    assert eta_seconds(dict(rec, eta_seconds=None), now=101.0) is None


def test_progress_of_a_job_delivered_again_does_not_go_back_nor_skew_the_estimate():
    """The last attempt had reported 0.6 (part of the batch that this run samples again from its start)."""
    now, writes = [0.0], []
    rep = ProgressReporter(lambda **f: writes.append(f), lambda: False, batch_size=10, interval=0.0,
                           clock=lambda: now[0], start=0.6)
    rep(10, 20, 1, 20)                  # 0.525 on disk and in this batch: the 0.6 already shown stays
    assert writes[-1]["progress"] == 0.6
    now[0] = 5.0
    rep(10, 20, 11, 20)                 # 0.775: the rate is this run's own (0.05/s), as without ``start``
    assert writes[-1]["progress"] == 0.775 and writes[-1]["eta_seconds"] == 4.5


def test_progress_enforces_the_time_limit():
    # The threads pool has no time limits of its own: the progress callbacks enforce the soft one.
    from celery.exceptions import SoftTimeLimitExceeded

    from worker.progress import StageProgress

    now = [100.0]
    rep = ProgressReporter(lambda **f: None, lambda: False, batch_size=10, time_limit=5, clock=lambda: now[0])
    stage = StageProgress(lambda **f: None, lambda: False, time_limit=5, clock=lambda: now[0])
    now[0] += 4.9
    rep(0, 20, 1, 20)
    stage(0.1, "training")
    now[0] += 0.2
    with pytest.raises(SoftTimeLimitExceeded):
        rep(0, 20, 2, 20)
    with pytest.raises(SoftTimeLimitExceeded):
        stage(0.2, "training")


def test_progress_fraction():
    assert fraction(0, 100, 0, 20, 50) == 0.0
    assert fraction(0, 100, 10, 20, 50) == 0.25       # half of the first batch of 50
    assert fraction(50, 100, 20, 20, 50) == 0.5       # between batches
    assert fraction(90, 100, 10, 20, 50) == 0.95      # the last batch holds 10
    assert fraction(100, 100, 20, 20, 50) == 1.0


def test_class_rule_names_any_case_and_indices():
    # One rule (diffusion.spec.resolve_class) serves the API and `dreamdata sample`.
    assert resolve_class("cat", CIFAR10_CLASSES) == 3
    assert resolve_class("CAT", CIFAR10_CLASSES) == 3
    assert resolve_class(" Dog ", CIFAR10_CLASSES) == 5
    assert resolve_class("0", CIFAR10_CLASSES) == 0
    assert resolve_class("9", CIFAR10_CLASSES) == 9
    for bad in ("10", "-1", "unicorn", "", "3.0"):
        with pytest.raises(ValueError, match="valid: airplane"):
            resolve_class(bad, CIFAR10_CLASSES)


def test_concurrent_readiness_checks_share_one_worker_ping():
    import threading
    import time

    from app.routers.health import _SharedPing

    pings, shared = [], _SharedPing()
    started, release = threading.Event(), threading.Event()
    waiting, wait_for = [], shared._cond.wait_for

    def counted_wait(predicate, timeout=None):  # a caller that joined the ping in flight
        waiting.append(1)
        return wait_for(predicate, timeout)
    shared._cond.wait_for = counted_wait

    def slow_ping():
        pings.append(1)
        started.set()
        assert release.wait(10)
        return [{"celery@b": {"ok": "pong"}}, {"celery@a": {"ok": "pong"}}]

    answers: list = []
    first = threading.Thread(target=lambda: answers.append(shared.workers("redis://x", slow_ping)))
    first.start()
    assert started.wait(10)
    joiners = [threading.Thread(target=lambda: answers.append(shared.workers("redis://x", slow_ping)))
               for _ in range(30)]
    for t in joiners:
        t.start()
    deadline = time.monotonic() + 10
    while len(waiting) < 30 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(waiting) == 30  # all 30 arrived while the first ping ran, and wait for it instead of pinging
    release.set()
    for t in [first, *joiners]:
        t.join(10)
    assert len(pings) == 1 and answers == [["celery@a", "celery@b"]] * 31

    def broken():
        raise ConnectionError("broker gone")
    assert shared.workers("redis://x", broken) == []  # a ping after the shared one pings again
    assert shared.workers("redis://y", lambda: None) == []


def test_a_finished_job_expires_after_keep_and_old_ids_leave_the_recent_list(settings):
    store = JobStore(connect(settings.redis_url), f"units-{uuid.uuid4().hex[:8]}", keep=100)
    done, running = new_job_id(), new_job_id()
    for i in (done, running):
        store.create(new_record(i, {"steps": 2}, 1, 2), max_queued=10)
        store.confirm(i)
    assert store.r.ttl(store.key(done)) == -1  # queued, its message sent: kept
    store.transition(done, ("queued",), {"status": "running"})
    store.transition(running, ("queued",), {"status": "running"})
    assert store.r.ttl(store.key(done)) == -1  # running: kept, however long it runs
    store.transition(done, ("running",), {"status": "succeeded"})
    assert 0 < store.r.ttl(store.key(done)) <= 100 and store.r.ttl(store.key(running)) == -1
    canceled = new_job_id()
    store.create(new_record(canceled, {"steps": 2}, 1, 2), max_queued=10)
    store.request_cancel(canceled)
    assert 0 < store.r.ttl(store.key(canceled)) <= 100
    # ids submitted more than twice `keep` before a new job leave the list of recent jobs once their record is gone
    old, old_running = (dict(new_record(new_job_id(), {"steps": 2}, 1, 2), created_at=time.time() - 201)
                        for _ in range(2))
    for rec in (old, old_running):
        store.create(rec, max_queued=10)
    store.transition(old_running["id"], ("queued",), {"status": "running"})  # a long job: still listed
    store.transition(old["id"], ("queued",), {"status": "failed"})
    store.r.delete(store.key(old["id"]))  # as if it had expired
    store.create(new_record(new_job_id(), {"steps": 2}, 1, 2), max_queued=10)
    assert store.r.zscore(store.recent_key, old["id"]) is None
    assert store.r.zscore(store.recent_key, old_running["id"]) is not None
    assert store.r.zscore(store.recent_key, done) is not None
    forever = JobStore(store.r, store.prefix)  # keep=0: nothing expires
    kept = new_job_id()
    forever.create(new_record(kept, {"steps": 2}, 1, 2), max_queued=10)
    forever.request_cancel(kept)
    assert forever.r.ttl(forever.key(kept)) == -1


def test_the_worker_deletes_only_folders_of_expired_jobs(settings, tmp_path, monkeypatch):
    import os

    import worker.tasks as tasks
    from worker.jobs import prune_job_dirs

    store = JobStore(connect(settings.redis_url), f"units-{uuid.uuid4().hex[:8]}", keep=100)
    jobs = tmp_path / "jobs"
    live_old, gone_old, gone_new = new_job_id(), new_job_id(), new_job_id()
    store.create(new_record(live_old, {"steps": 2}, 1, 2), max_queued=10)
    for i in (live_old, gone_old, gone_new):
        (jobs / i / "images").mkdir(parents=True)
        (jobs / i / "images" / "00000.png").write_bytes(b"png")
    (jobs / "not-a-job").mkdir()
    old = time.time() - 1000
    for i in (live_old, gone_old):
        os.utime(jobs / i, (old, old))
    os.utime(jobs / "not-a-job", (old, old))
    assert prune_job_dirs(jobs, JobStore(store.r, store.prefix)) == []  # keep=0: nothing is deleted
    assert prune_job_dirs(jobs, store) == [gone_old]
    assert sorted(p.name for p in jobs.iterdir()) == sorted([live_old, gone_new, "not-a-job"])

    # the worker's hook: at most once an hour per process, and never an error out of it
    s = settings.model_copy(update={"data_dir": tmp_path, "key_prefix": store.prefix, "keep_jobs": 100})
    monkeypatch.setattr(tasks, "_pruned_at", [float("-inf")])
    os.utime(jobs / gone_new, (old, old))
    assert tasks.prune_expired(s) == [gone_new]
    (jobs / gone_old).mkdir()
    os.utime(jobs / gone_old, (old, old))
    assert tasks.prune_expired(s) == [] and (jobs / gone_old).exists()  # within the hour: not again
    monkeypatch.setattr(tasks, "_pruned_at", [float("-inf")])
    monkeypatch.setattr(tasks, "prune_job_dirs", lambda *a: 1 / 0)
    assert tasks.prune_expired(s) == []


def test_the_worker_prunes_after_every_job_and_as_a_pool_process_starts(settings, tmp_path, monkeypatch):
    """The two places README names: after a job (whatever its end) and in a new pool process (worker_process_init)."""
    import os
    from types import SimpleNamespace

    import worker.tasks as tasks

    s = settings.model_copy(update={"data_dir": tmp_path, "key_prefix": f"units-{uuid.uuid4().hex[:8]}",
                                    "keep_jobs": 100})
    monkeypatch.setattr(tasks, "get_settings", lambda: s)
    task = SimpleNamespace(request=SimpleNamespace(hostname="w@test"))
    old = time.time() - 1000

    def expired_folder():  # a job whose record is gone, its folder older than keep_jobs
        folder = s.jobs_dir / new_job_id()
        folder.mkdir(parents=True)
        os.utime(folder, (old, old))
        monkeypatch.setattr(tasks, "_pruned_at", [float("-inf")])
        return folder

    def failing(job_id, request, **kw):
        raise RuntimeError("a job that failed")

    for body, raises in ((lambda job_id, request, **kw: {"id": job_id}, False), (failing, True)):
        folder = expired_folder()
        if raises:
            with pytest.raises(RuntimeError, match="a job that failed"):
                tasks._run_job(task, body, "some-job", {})
        else:
            assert tasks._run_job(task, body, "some-job", {}) == {"id": "some-job"}
        assert not folder.exists()
    folder = expired_folder()
    tasks._warm_up()
    assert not folder.exists()


def test_cache_entries_unused_for_long_are_deleted_and_nothing_else(settings, tmp_path, monkeypatch):
    import os

    import worker.tasks as tasks
    from worker.jobs import prune_cache

    cache = tmp_path / "cache"
    (cache / "synthetic" / "old-set" / "images" / "0").mkdir(parents=True)
    (cache / "synthetic" / "old-set" / "images" / "0" / "000000.png").write_bytes(b"png")
    (cache / "synthetic" / "new-set").mkdir()
    (cache / "synthetic" / ".deleting-1234abcd-gone-set" / "images").mkdir(parents=True)  # a delete cut short
    for name in ("data-old.pt", "data-new.pt", "data-old.123.tmp", "other-old.pt"):
        (cache / name).write_bytes(b"tensor")
    old = time.time() - 1000
    for p in ("synthetic/old-set", "data-old.pt", "data-old.123.tmp", "other-old.pt"):
        os.utime(cache / p, (old, old))
    assert prune_cache(cache, 0) == []  # 0: kept for ever
    assert prune_cache(cache, 2000) == []
    assert sorted(prune_cache(cache, 100)) == ["data-old.123.tmp", "data-old.pt", "old-set"]
    assert sorted(p.name for p in cache.iterdir()) == ["data-new.pt", "other-old.pt", "synthetic"]
    assert [p.name for p in (cache / "synthetic").iterdir()] == ["new-set"]
    assert prune_cache(tmp_path / "none", 100) == []

    # the worker's hourly hook prunes with DREAMDATA_KEEP_CACHE, but never sooner than an evaluation may still run
    s = settings.model_copy(update={"data_dir": tmp_path, "keep_jobs": 0, "keep_cache": 100, "eval_time_limit": 3600,
                                    "job_kill_grace": 30})
    (cache / "synthetic" / "old-set").mkdir()
    os.utime(cache / "synthetic" / "old-set", (old, old))
    monkeypatch.setattr(tasks, "_pruned_at", [float("-inf")])
    tasks.prune_expired(s)
    assert (cache / "synthetic" / "old-set").exists()  # 1000 s < the evaluation hard limit
    s = s.model_copy(update={"eval_time_limit": 60, "job_kill_grace": 30})
    monkeypatch.setattr(tasks, "_pruned_at", [float("-inf")])
    tasks.prune_expired(s)
    assert not (cache / "synthetic" / "old-set").exists()


def test_the_redis_password_never_reaches_the_log():
    from worker.serve import redact

    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact("rediss://user:p%40ss@host:6380/1") == "rediss://user:***@host:6380/1"
