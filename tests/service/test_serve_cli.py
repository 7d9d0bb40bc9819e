"""`dreamdata serve` on a bare machine: bundled Redis + worker + API, stopped cleanly by a signal;
and the launchers' refusals (public host without an API key, no checkpoint)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import dreamdata_cli
from worker.redis_server import free_port
from worker.serve import WorkerSupervisor

from .service_testlib import REPO, poll_job, wait_for


def _descendants(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(p) for p in path.read_text().split()] if path.exists() else []
    return kids + [d for k in kids for d in _descendants(k)]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _serve_env() -> dict[str, str]:
    """This environment without the service's settings (serve starts its own Redis), on one CPU thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DREAMDATA_") and k != "REDIS_URL"}
    env.update(DREAMDATA_TORCH_THREADS="1", OMP_NUM_THREADS="1")
    return env


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_runs_all_three_and_stops_them(tmp_path, tiny_checkpoint, sig):
    port = free_port()
    env = _serve_env()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "dreamdata_cli", "serve", "--port", str(port),
                             "--data-dir", str(tmp_path / "data"), "--checkpoint", str(tiny_checkpoint)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            def ready():
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                try:
                    return client.get("/readyz").status_code == 200
                except httpx.TransportError:
                    return False
            wait_for(ready, 90, "dreamdata serve to be ready", interval=0.2)
            r = client.post("/generate", params={"class": "deer", "n": 2, "steps": 2})
            assert r.status_code == 202
            assert poll_job(client, r.headers["location"], timeout=60)["status"] == "succeeded"
        children = _descendants(proc.pid)
        assert len(children) >= 3  # redis-server, worker main process, its pool child
        # the SIGTERM the worker gets if serve is killed (-9) must be a cold shutdown, which puts a running job
        # back, not a warm one that finishes it for nobody
        worker_env = [Path(f"/proc/{p}/environ").read_bytes().split(b"\0") for p in children
                      if b"dreamdata_cli\0worker" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert worker_env and all(b"REMAP_SIGTERM=SIGQUIT" in env for env in worker_env)
        proc.send_signal(sig)
        assert proc.wait(60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        wait_for(lambda: not any(_alive(p) for p in children), 10, "redis and worker to exit")
        assert (tmp_path / "data" / "redis").is_dir()  # Redis kept its data in the data directory
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _descendants(proc.pid):
            os.kill(p, signal.SIGKILL)
        log.close()


def _cli(monkeypatch, *argv: str) -> SystemExit:
    for var in ("DREAMDATA_DATA_DIR", "DREAMDATA_CHECKPOINT", "DREAMDATA_ALLOW_PUBLIC", "DREAMDATA_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as e:
        dreamdata_cli.main(list(argv))
    return e.value


def test_public_host_needs_an_api_key(monkeypatch, tmp_path, tiny_checkpoint, capsys):
    e = _cli(monkeypatch, "api", "--host", "0.0.0.0", "--data-dir", str(tmp_path), "--checkpoint", str(tiny_checkpoint))
    assert e.code == 2 and "DREAMDATA_API_KEY" in capsys.readouterr().err
    e = _cli(monkeypatch, "serve", "--host", "192.0.2.1", "--data-dir", str(tmp_path))
    assert e.code == 2 and "--allow-public" in capsys.readouterr().err


def test_a_port_in_use_is_refused_before_anything_starts(monkeypatch, tmp_path, tiny_checkpoint, capsys):
    import socket

    import worker.serve as serve

    started = []
    monkeypatch.setattr(serve, "RedisServer", lambda *a, **k: started.append("redis"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        e = _cli(monkeypatch, "serve", "--port", str(port), "--data-dir", str(tmp_path),
                 "--checkpoint", str(tiny_checkpoint))
    err = capsys.readouterr().err
    assert e.code == 2 and f"127.0.0.1:{port}" in err and "--port" in err and started == []


def test_missing_checkpoint_is_a_clear_error(monkeypatch, tmp_path, capsys):
    e = _cli(monkeypatch, "worker", "--data-dir", str(tmp_path), "--checkpoint", str(tmp_path / "none"))
    assert e.code == 2 and "no checkpoint at" in capsys.readouterr().err


def test_worker_options_reach_the_settings_through_the_environment(tmp_path, monkeypatch):
    import argparse

    from worker.serve import _apply, add_worker_args
    from worker.settings import get_settings

    for var in ("DREAMDATA_POOL", "DREAMDATA_CONCURRENCY", "DREAMDATA_COMPILE", "DREAMDATA_DATA_DIR"):
        monkeypatch.setenv(var, "")  # recorded, so monkeypatch also undoes what _apply writes
        monkeypatch.delenv(var)
    p = argparse.ArgumentParser()
    add_worker_args(p)
    try:
        s = _apply(p.parse_args(["--pool", "threads", "--concurrency", "4", "--compile", "reduce-overhead",
                                 "--data-dir", str(tmp_path / "d")]))
        assert (s.pool, s.concurrency, s.compile, s.batching) == ("threads", 4, "reduce-overhead", True)
        assert os.environ["DREAMDATA_COMPILE"] == "reduce-overhead"  # what a child worker process inherits
        assert s.data_dir == (tmp_path / "d").resolve() and s.data_dir.is_dir()
        with pytest.raises(SystemExit):
            p.parse_args(["--compile", "fast"])
    finally:
        get_settings.cache_clear()


def _supervise(script: str, min_uptime: float) -> tuple[WorkerSupervisor, threading.Event]:
    stopped = threading.Event()
    return WorkerSupervisor([sys.executable, "-c", script], env=dict(os.environ), on_stop=stopped.set,
                            min_uptime=min_uptime).start(), stopped


def test_a_worker_that_crashes_at_its_start_stops_the_service():
    sup, stopped = _supervise("import sys; sys.exit(3)", min_uptime=60)
    try:
        assert stopped.wait(10)
        assert sup.error.startswith("the worker exited with status 3 within 60 s of its start") and sup.starts == 1
    finally:
        sup.stop()


def test_a_worker_that_crashes_after_running_a_while_is_started_again(tmp_path):
    # each run appends a line and crashes after 0.3 s, past min_uptime: the supervisor starts another
    runs = tmp_path / "runs"
    sup, stopped = _supervise(f"import sys, time; open({str(runs)!r}, 'a').write('x\\n'); time.sleep(0.3); "
                              "sys.exit(1)", min_uptime=0.1)
    try:
        wait_for(lambda: runs.exists() and len(runs.read_text().split()) >= 3, 20,
                 "the worker to be started again twice and run")
    finally:
        sup.stop()
    assert not stopped.is_set() and sup.error is None
    starts = sup.starts
    time.sleep(0.5)
    assert sup.starts == starts  # stopped: not started again
    assert sup.proc.poll() is not None


def test_a_worker_that_was_asked_to_stop_stops_the_service_without_an_error():
    # status 0 is a worker's cold shutdown by a signal that reached it (a service manager signalling every
    # process of the service): not a crash to restart, nor a failure to report
    sup, stopped = _supervise("import time; time.sleep(0.3)", min_uptime=0.1)
    try:
        assert stopped.wait(10)
        assert sup.error is None and sup.starts == 1
    finally:
        sup.stop()


def test_a_worker_that_cannot_be_started_again_stops_the_service(monkeypatch):
    sup, stopped = _supervise("import sys, time; time.sleep(0.3); sys.exit(1)", min_uptime=0.1)
    try:
        def no_fork(*a, **k):
            raise BlockingIOError(11, "Resource temporarily unavailable")
        monkeypatch.setattr(subprocess, "Popen", no_fork)  # from now on: the restart fails
        assert stopped.wait(10)
        assert sup.starts == 1
        assert sup.error.startswith("the worker exited with status 1 and could not be started again:")
    finally:
        monkeypatch.undo()
        sup.stop()


def test_serve_stops_when_its_worker_dies_at_its_start(tmp_path, tiny_checkpoint):
    # a worker that cannot load the model (threads pool: it loads before it takes jobs) must not leave an API
    # that queues jobs for nobody
    ckpt = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    env = _serve_env()
    proc = subprocess.run([sys.executable, "-m", "dreamdata_cli", "serve", "--port", str(free_port()),
                           "--data-dir", str(tmp_path / "data"), "--checkpoint", str(ckpt), "--pool", "threads"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "dreamdata worker: error:" in proc.stderr  # why, from the worker (exit status 2: bad input)
    assert "dreamdata serve: error: the worker exited with status 2 within 60 s of its start" in proc.stderr
