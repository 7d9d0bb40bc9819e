"""Job records in Redis: one hash per job, written by the API at submit and by the worker as it runs.

    <prefix>:job:<id>          hash; every field holds a JSON value (see ``new_record``)
    <prefix>:job:<id>:cancel   set when a cancel was asked for; the worker checks it between steps
    <prefix>:jobs              sorted set of every job id by submit time (recent jobs)
    <prefix>:queued            sorted set of the ids still queued, by submit time (queue position)

Status moves queued -> running -> succeeded | failed | canceled (running -> running again when a
crashed worker's job is delivered again; running -> queued when its worker stopped it in a cold shutdown
and put it back). Transitions are atomic (a Lua script at submit,
WATCH/MULTI after), so an API cancel and a worker start never both win. A finished job's record
expires after ``DREAMDATA_KEEP_JOBS`` seconds (a week by default), and the worker then deletes its folder.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

import redis

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED = "queued", "running", "succeeded", "failed", "canceled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED)
ACTIVE = (QUEUED, RUNNING)
TERMINAL = (SUCCEEDED, FAILED, CANCELED)
GENERATION, EVALUATION = "generation", "evaluation"  # job types
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
CANCEL_FLAG_TTL = 7 * 24 * 3600

# Seconds a new record lives until the API confirms that its message reached the broker (``JobStore.confirm``;
# a worker's start confirms it too). An API that died in between, or a broker that failed the send and then
# the clean-up, leaves a record that expires instead of a queued job that never runs.
PENDING_TTL = 300

# Queued ids whose record has gone (a submit that never reached the broker, see PENDING_TTL) hold no place in
# the queue: every script that counts or ranks the queue drops them first.  At most max_queued ids to look at.
_PRUNE_QUEUED = """
local function prune_queued(queued, record_prefix)
  for _, id in ipairs(redis.call('ZRANGE', queued, 0, -1)) do
    if redis.call('EXISTS', record_prefix .. id) == 0 then redis.call('ZREM', queued, id) end
  end
end
"""

# KEYS: record, recent, queued.  ARGV: max_queued, submit time, id, pending ttl, record key prefix,
# field, value, field, value ...
_CREATE = _PRUNE_QUEUED + """
prune_queued(KEYS[3], ARGV[5])
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
return 1
"""

# KEYS: queued.  ARGV: record key prefix[, id].  Returns {queued jobs, the id's 0-based rank or nil}.
_QUEUED = _PRUNE_QUEUED + """
prune_queued(KEYS[1], ARGV[1])
local rank = false
if ARGV[2] then rank = redis.call('ZRANK', KEYS[1], ARGV[2]) end
return {redis.call('ZCARD', KEYS[1]), rank}
"""

# KEYS: record.  ARGV: field, value, ...  Only an existing record: a job forgotten at submit (its message
# reached the broker after all) must not come back as a record without a status.
# ARGV[1]: '' (any existing record) or a delivery id as JSON (only while that delivery runs the job)
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' and (redis.call('HGET', KEYS[1], 'status') ~= '"running"'
                      or redis.call('HGET', KEYS[1], 'delivery') ~= ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""


class QueueFull(Exception):
    """As many jobs are queued as the service allows."""


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(value: str) -> bool:
    """uuid4 hex, exactly: the only ids that reach Redis keys or file paths."""
    return bool(JOB_ID.fullmatch(value))


def new_record(job_id: str, request: dict, images_total: int, steps: int, job_type: str = GENERATION) -> dict:
    """The record of a job just submitted (status queued)."""
    return {"id": job_id, "type": job_type, "status": QUEUED, "request": request,
            "images_total": images_total, "images_done": 0, "step": 0, "steps": steps, "progress": 0.0,
            "created_at": time.time(), "started_at": None, "finished_at": None, "updated_at": time.time(),
            "attempts": 0, "worker": None, "output": None, "error": None}


def connect(url: str) -> redis.Redis:
    """A Redis client with short timeouts, so a dead broker gives an error, not a hang."""
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=30)


# What a job's status change waits out: Redis unreachable, or a replica being promoted (read-only). Not a
# wrong password (redis-py's AuthenticationError is a ConnectionError): no wait mends that.
TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ReadOnlyError)


def transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT) and not isinstance(exc, redis.exceptions.AuthenticationError)


class JobStore:
    """Job records in Redis.  ``keep``: seconds a finished job's record stays (0: for ever); its files go with it
    (``prune_job_dirs``), and the list of recent jobs forgets expired ids submitted more than twice that ago.
    ``retry_for``: seconds a status change (``transition``) is tried again while Redis is unreachable (the
    worker's: a job that finished during a Redis restart must not stay running; the API's answer 503 at once)."""

    def __init__(self, client: redis.Redis, prefix: str = "dreamdata", keep: int = 0, retry_for: float = 0.0):
        self.r, self.prefix, self.keep, self.retry_for = client, prefix, keep, retry_for
        self.sleep, self.clock = time.sleep, time.monotonic  # replaceable in tests
        self._create = client.register_script(_CREATE)
        self._update = client.register_script(_UPDATE)
        self._queued = client.register_script(_QUEUED)

    def key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    @property
    def recent_key(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def queued_key(self) -> str:
        return f"{self.prefix}:queued"

    # -- API side --------------------------------------------------------------------------------
    def create(self, record: dict, max_queued: int) -> None:
        """Store a new queued record; raises QueueFull when ``max_queued`` jobs are already queued.

        The record expires after ``PENDING_TTL`` seconds unless :meth:`confirm` (or the job's start) keeps it:
        send the job's message in between."""
        args = [max_queued, record["created_at"], record["id"], PENDING_TTL, self.key("")] + _flatten(record)
        if not self._create(keys=[self.key(record["id"]), self.recent_key, self.queued_key], args=args):
            raise QueueFull(f"{max_queued} jobs are queued already; try again later")
        if self.keep:
            try:  # housekeeping: the job is stored, so a failure here must not stop its message
                self._forget_expired(record["created_at"] - 2 * self.keep)
            except redis.exceptions.RedisError:
                log.exception("could not trim the list of recent jobs")

    def confirm(self, job_id: str, retry_for: float = 5.0) -> None:
        """The job's message is with the broker: its record stays (until the job finishes and ``keep`` runs out).

        Only a record that is still queued: one canceled (or started) meanwhile already has its lifetime. Tried
        again for ``retry_for`` seconds while Redis is unreachable (the message is sent: the record should stay)."""
        self.transition(job_id, (QUEUED,), {}, retry_for=retry_for)

    def _forget_expired(self, before: float, batch: int = 100) -> None:
        """Drop from the recent list the ids submitted before ``before`` whose record has expired (an old id of
        a job still running, or finished less than ``keep`` ago, stays)."""
        old = self.r.zrangebyscore(self.recent_key, "-inf", f"({before}", start=0, num=batch)
        if not old:
            return
        pipe = self.r.pipeline(transaction=False)
        for job_id in old:
            pipe.exists(self.key(job_id.decode()))
        gone = [job_id for job_id, exists in zip(old, pipe.execute()) if not exists]
        if gone:
            self.r.zrem(self.recent_key, *gone)

    def get(self, job_id: str) -> dict | None:
        """The record, or None for an unknown job (or a remnant without a status, which no job has)."""
        raw = self.r.hgetall(self.key(job_id))
        record = {k.decode(): json.loads(v) for k, v in raw.items()}
        return record if "status" in record else None

    def recent(self, limit: int = 20, status: str | None = None) -> list[dict]:
        """Newest first; with ``status``, only jobs in that status (scans at most 1000 recent ids)."""
        ids = [i.decode() for i in self.r.zrevrange(self.recent_key, 0, (limit if status is None else 1000) - 1)]
        out = []
        for job_id in ids:
            rec = self.get(job_id)
            if rec is not None and (status is None or rec["status"] == status):
                out.append(rec)
                if len(out) == limit:
                    break
        return out

    def queue_position(self, job_id: str) -> int | None:
        """1 = next to start; None when the job is not queued."""
        _, rank = self._queued(keys=[self.queued_key], args=[self.key(""), job_id])
        return None if rank is None else rank + 1

    def queued_count(self) -> int:
        """Jobs waiting to start (not counting submits whose record expired before their message was sent)."""
        count, _ = self._queued(keys=[self.queued_key], args=[self.key("")])
        return count

    def request_cancel(self, job_id: str) -> dict | None:
        """Flag the job for cancellation; a queued job is canceled at once.  Returns the record."""
        self.r.set(self.key(job_id) + ":cancel", 1, ex=CANCEL_FLAG_TTL)
        now = time.time()
        self.transition(job_id, (QUEUED,), {"status": CANCELED, "finished_at": now, "error": None})
        return self.get(job_id)

    def forget(self, job_id: str) -> None:
        """Remove a record whose job never reached the broker."""
        self.r.delete(self.key(job_id))
        self.r.zrem(self.recent_key, job_id)
        self.r.zrem(self.queued_key, job_id)

    # -- worker side -----------------------------------------------------------------------------
    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.exists(self.key(job_id) + ":cancel"))

    def update(self, job_id: str, delivery: str | None = None, **fields: Any) -> bool:
        """Set some fields (progress, output ...) of an existing record; False (and nothing written) if there is
        none, or, given ``delivery``, unless the job is running as that delivery (a progress write must not land
        on a finished job, nor come from a run that another delivery has taken over)."""
        guard = "" if delivery is None else json.dumps(delivery)
        return bool(self._update(keys=[self.key(job_id)],
                                 args=[guard] + _flatten(dict(fields, updated_at=time.time()))))

    def transition(self, job_id: str, allowed: Iterable[str], fields: dict,
                   retry_for: float | None = None) -> dict | None:
        """Atomically apply ``fields`` if the status is in ``allowed``; returns the old record, else None.

        ``fields`` may be a function of the old record (called inside the transaction). While Redis is
        unreachable (or read-only, mid-failover) it is tried again, with backoff, until ``retry_for`` seconds
        (default: the store's) have passed, then the error is raised; a try under way may run past that by its
        socket timeout. A try whose reply was lost may have been applied; the next one then finds the new
        status, and applies again only if that is in ``allowed`` too (a function of the old record can tell
        its own earlier write from it, as ``worker.generation.start_job`` does).
        """
        key, allowed = self.key(job_id), tuple(allowed)
        result: list[dict | None] = [None]

        def apply(pipe: redis.client.Pipeline) -> None:
            result[0] = None
            raw = pipe.hgetall(key)
            old = {k.decode(): json.loads(v) for k, v in raw.items()}
            if not old or old.get("status") not in allowed:
                pipe.multi()
                return
            new = fields(old) if callable(fields) else fields
            pipe.multi()
            if new:  # nothing to change (a refused end_run, a confirm) leaves updated_at, which dates the ETA
                pipe.hset(key, mapping=dict(_pairs(dict(new, updated_at=time.time()))))
            status = new.get("status", old["status"])
            if status != QUEUED:
                pipe.zrem(self.queued_key, job_id)
            elif old["status"] != QUEUED:  # back in the queue (its worker stopped it): at the end, as its message
                pipe.zadd(self.queued_key, {job_id: time.time()})
            if self.keep and status in TERMINAL:
                pipe.expire(key, self.keep)
            else:  # a queued record confirmed (create's PENDING_TTL), a started one, or one kept for ever
                pipe.persist(key)
            result[0] = old

        deadline, delay = self.clock() + (self.retry_for if retry_for is None else retry_for), 0.5
        while True:
            try:
                self.r.transaction(apply, key)
                return result[0]
            except TRANSIENT as e:
                if not transient(e) or self.clock() + delay > deadline:
                    raise
                log.warning("job %s: Redis unreachable (%s); trying the status change again in %.1f s",
                            job_id, type(e).__name__, delay)
                self.sleep(delay)
                delay = min(2 * delay, 5.0)


def _pairs(fields: dict) -> Iterable[tuple[str, str]]:
    return ((k, json.dumps(v)) for k, v in fields.items())


def _flatten(record: dict) -> list[str]:
    return [x for pair in _pairs(record) for x in pair]


def prune_job_dirs(jobs_dir: Path, store: JobStore, now: float | None = None) -> list[str]:
    """Delete the ``jobs/<id>/`` folders whose record has expired (``JobStore.keep``) and that nothing has written
    to for as long; returns their ids.  A folder whose record exists is kept, whatever its age."""
    if not store.keep or not jobs_dir.is_dir():
        return []
    now = time.time() if now is None else now
    removed = []
    for folder in jobs_dir.iterdir():
        if not (folder.is_dir() and is_job_id(folder.name)):
            continue
        try:
            if now - folder.stat().st_mtime < store.keep or store.r.exists(store.key(folder.name)):
                continue
        except FileNotFoundError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder.name)
    return removed


def prune_cache(cache_dir: Path, unused_for: float, now: float | None = None) -> list[str]:
    """Delete the cached data sets (``data-*.pt``, and the temporary files of writes that never finished) and
    synthetic image sets (``synthetic/<set>/``) under ``cache_dir`` that no job has used for ``unused_for``
    seconds; returns their names.

    Last use is the modification time, which ``training.data.load_dataset`` and
    ``training.synthetic_cache.synthetic_images`` renew on every use (and sampling into a set renews as each
    batch lands). An entry is renamed before it is deleted, so a job that starts using it at that moment
    writes a fresh one rather than into a half-deleted folder. An entry that cannot be deleted is logged and
    skipped."""
    if not unused_for or not cache_dir.is_dir():
        return []
    now = time.time() if now is None else now
    synthetic = cache_dir / "synthetic"
    sets = [p for p in synthetic.iterdir() if p.is_dir() and not p.name.startswith(".")] if synthetic.is_dir() else []
    entries = [*cache_dir.glob("data-*.pt"), *cache_dir.glob("data-*.tmp"), *sets]
    for left in [*cache_dir.glob(".deleting-*"), *synthetic.glob(".deleting-*")]:  # a worker killed mid-delete
        _delete(left)
    removed = []
    for entry in entries:
        try:
            if now - entry.stat().st_mtime < unused_for:
                continue
            doomed = entry.with_name(f".deleting-{uuid.uuid4().hex[:8]}-{entry.name}")
            entry.rename(doomed)
        except FileNotFoundError:  # another worker pruned it first
            continue
        except OSError as e:
            log.warning("could not delete cache entry %s: %s", entry.name, e)
            continue
        _delete(doomed)
        removed.append(entry.name)
    return removed


def _delete(path: Path) -> None:
    try:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not delete %s: %s", path, e)
