"""Helpers for the service tests: a tiny checkpoint and data set, worker processes, polling with deadlines.

Plain functions (no pytest), used by ``conftest.py`` and the tests.
"""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from worker.redis_server import die_with_parent
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[2]
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TERMINAL = ("succeeded", "failed", "canceled")


def make_tiny_checkpoint(directory: Path) -> Path:
    """A randomly initialised UNet of width 8 (T = 1000): fast enough to sample in tests."""
    import torch

    from diffusion.checkpoint import save_checkpoint
    from diffusion.schedules import ScheduleConfig
    from diffusion.unet import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0))
    return save_checkpoint(directory, model, ScheduleConfig("linear", 1000), CIFAR10_CLASSES,
                           {"dataset": "none (random weights, tests)", "steps": 0})


def make_eval_data(root: Path, train_per_class: int = 6, test_per_class: int = 3) -> Path:
    """An ImageFolder ``<root>/{train,test}/<class>/NNNN.png`` of the 10 CIFAR-10 classes, solid colours."""
    from tests.fixtures import make_images, write_image_folder

    write_image_folder(root / "train", make_images(CIFAR10_CLASSES, train_per_class), ext=".png")
    write_image_folder(root / "test", make_images(CIFAR10_CLASSES, test_per_class, offset=train_per_class), ext=".png")
    return root


def env_for(settings: Settings) -> dict[str, str]:
    """The environment under which a worker process reads exactly ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DREAMDATA_") and k != "REDIS_URL"}
    for name, value in settings.model_dump().items():
        if value is not None:
            value = value.get_secret_value() if hasattr(value, "get_secret_value") else value
            env[f"DREAMDATA_{name.upper()}"] = str(value)
    env["OMP_NUM_THREADS"] = "1"
    return env


class WorkerProcess:
    """``dreamdata worker`` in its own process group (main process + one pool child)."""

    def __init__(self, settings: Settings, log_path: Path):
        self.settings = settings
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "dreamdata_cli", "worker", "--log-level", "info"],
                                     env=env_for(settings), cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=die_with_parent)
        self.name = f"dreamdata-{self.proc.pid}@{socket.gethostname()}"

    def wait_ready(self, celery, timeout: float = 90.0) -> "WorkerProcess":
        """Until this worker answers a ping (its pool child may still be loading the model)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}; log: {self.tail()}")
            replies = celery.control.ping(destination=[self.name], timeout=0.5) or []
            if any(self.name in r for r in replies):
                return self
        raise TimeoutError(f"worker {self.name} did not answer within {timeout} s; log: {self.tail()}")

    def pool_children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def kill9(self) -> None:
        """SIGKILL the whole worker (main process and pool child), as when its machine dies."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # cold shutdown: do not wait for a running job
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        self.kill9()
        self.log.close()

    def tail(self, n: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")


def wait_for(fn: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Call ``fn`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def poll_job(client, url: str, timeout: float = 60.0, until: Callable[[dict], bool] | None = None) -> dict:
    """GET the job until ``until(job)`` (default: a terminal status), with a deadline."""
    until = until or (lambda j: j["status"] in TERMINAL)

    def check():
        r = client.get(url)
        assert r.status_code == 200, r.text
        return r.json() if until(r.json()) else None

    return wait_for(check, timeout, f"job {url}")


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def zip_pngs(data: bytes) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {n: png_pixels(z.read(n)) for n in z.namelist() if n.startswith("images/")}


class Flaky:
    """``fn``, except that call number i (from 1) raises ``error`` when ``fails(i)``: Redis going away mid-job.
    ``calls`` counts every call."""

    def __init__(self, fn: Callable, fails: Callable[[int], bool], error: Exception | None = None):
        import redis

        self.fn, self.fails, self.calls = fn, fails, 0
        self.error = error or redis.exceptions.ConnectionError("Connection refused")

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fails(self.calls):
            raise self.error
        return self.fn(*args, **kwargs)


def unreachable_for(calls: int, fn: Callable) -> Flaky:
    """``fn``, except that its first ``calls`` calls raise as if Redis were restarting."""
    return Flaky(fn, lambda i: i <= calls)
