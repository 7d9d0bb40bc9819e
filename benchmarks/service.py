"""The service on real parts (bundled Redis, a `dreamdata worker` process, the API under uvicorn on
loopback), measured three ways:

1. overhead: end-to-end time of an N-image job (POST to "succeeded" seen by polling) against the
   same work called directly in this process (the sampler alone, and generate_to_dir with files);
2. GET /jobs/{id} latency, median and p99, with C concurrent clients (R requests in all);
3. worker memory: peak RSS of the worker's pool process during an M-image job (one batch in memory).

    python benchmarks/service.py [--checkpoint DIR | --tiny] [--n 100] [--memory-n 10000]
                                 [--clients 50] [--requests 2000] [--threads 2] [--compile default]

Every job, and the same work called directly, uses the service's default sampler, ``DEFAULT_SETTINGS``
(``diffusion/spec.py``), each setting spelled out in the request; --sampler, --steps, --guidance,
--guidance-interval and --spacing change it.

The worker decides its precision as it always does (DREAMDATA_PRECISION, else auto: timed at start);
the direct runs load the model the worker's way (``worker.generation.model_for``: the same precision,
layout and --compile mode), so the overhead rows compare like with like.
    python benchmarks/service.py --tiny --n 100 --memory-n 1000 --requests 500   # a quick check
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

from diffusion.precision import default_device
from diffusion.spec import (DEFAULT_SETTINGS, SPACINGS, SamplerSettings, format_guidance_interval,
                            parse_guidance_interval, requested_precision)
from training.generate import default_checkpoint, generate_to_dir, plan, sampling_autocast
from worker.redis_server import RedisServer, die_with_parent, free_port

TERMINAL = ("succeeded", "failed", "canceled")


def tiny_checkpoint(directory: Path) -> Path:
    from diffusion.checkpoint import save_checkpoint
    from diffusion.schedules import ScheduleConfig
    from diffusion.unet import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0))
    names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    return save_checkpoint(directory, model, ScheduleConfig("linear", 1000), names, {"dataset": "none (benchmark)"})


def rss_kb(pid: int, field: str = "VmHWM") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def pool_child(pid: int) -> int:
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(kids[0]) if kids else pid


def request_params(s: SamplerSettings, n: int, seed: int = 0) -> dict:
    """The POST /generate query of an ``n``-image job of class cat with settings ``s``, each spelled out."""
    return {"class": "cat", "n": n, "sampler": s.sampler, "steps": s.steps, "guidance": s.guidance,
            "guidance_interval": format_guidance_interval(s.guidance_interval), "spacing": s.spacing, "seed": seed}


def run_job(client: httpx.Client, params: dict, poll: float = 0.02) -> tuple[float, dict]:
    t0 = time.perf_counter()
    url = client.post("/generate", params=params).raise_for_status().headers["location"]
    while True:
        job = client.get(url).json()
        if job["status"] in TERMINAL:
            break
        time.sleep(poll)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {url} {job['status']}: {job['error']}")
    return time.perf_counter() - t0, job


_WARMED: set[int] = set()  # the models direct() has warmed up


def direct(ckpt_dir: Path, n: int, s: SamplerSettings, batch: int, out: Path,
           compile_mode: str = "off", threads: int | None = None) -> tuple[float, float, str]:
    """(seconds for the sampler alone, seconds for generate_to_dir with PNGs + zip, how the model was loaded:
    precision and layout) in this process."""
    from diffusion.samplers import sample
    from worker.generation import model_for

    ckpt = model_for(ckpt_dir, threads, compile_mode)  # the worker's own loading: threads, precision, layout
    specs = plan([(3, n)], 0)
    if id(ckpt) not in _WARMED:  # the first round: one batch untimed (compiles, first-call costs), as the worker
        _WARMED.add(id(ckpt))    # warms up at its start; the model is loaded once per process (model_for)
        w = specs[:batch]
        sample(ckpt.model, ckpt.schedule, torch.tensor([x.class_index for x in w]), [x.seed for x in w],
               sampler=s.sampler, steps=s.steps, guidance=s.guidance, guidance_interval=s.guidance_interval,
               spacing=s.spacing, autocast=sampling_autocast(ckpt))
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        b = specs[i:i + batch]
        sample(ckpt.model, ckpt.schedule, torch.tensor([x.class_index for x in b]), [x.seed for x in b],
               sampler=s.sampler, steps=s.steps, guidance=s.guidance, guidance_interval=s.guidance_interval,
               spacing=s.spacing, autocast=sampling_autocast(ckpt))
    t1 = time.perf_counter()
    generate_to_dir(ckpt, [(3, n)], out, settings=s, base_seed=0, batch_size=batch, make_zip=True)
    return t1 - t0, time.perf_counter() - t1, ckpt.precision.reason


def latency(base_url: str, url: str, clients: int, requests: int) -> list[float]:
    times: list[float] = []
    lock = threading.Lock()
    per = max(1, requests // clients)
    start = threading.Barrier(clients)

    def client_loop() -> None:
        mine = []
        with httpx.Client(base_url=base_url, timeout=30) as c:
            c.get(url)  # connect first
            start.wait()
            for _ in range(per):
                t0 = time.perf_counter()
                c.get(url).raise_for_status()
                mine.append(time.perf_counter() - t0)
        with lock:
            times.extend(mine)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    p.add_argument("--tiny", action="store_true", help="use a tiny random checkpoint (a quick check of the script)")
    p.add_argument("--n", type=int, default=100, help="images in the overhead job")
    p.add_argument("--sampler", default=DEFAULT_SETTINGS.sampler)
    p.add_argument("--steps", type=int, default=DEFAULT_SETTINGS.steps)
    p.add_argument("--guidance", type=float, default=DEFAULT_SETTINGS.guidance)
    p.add_argument("--guidance-interval", type=parse_guidance_interval, default=DEFAULT_SETTINGS.guidance_interval,
                   metavar="LO,HI|all")
    p.add_argument("--spacing", choices=SPACINGS, default=DEFAULT_SETTINGS.spacing,
                   help="where the steps fall: evenly in the timestep index (time) or in logSNR (logsnr; Lu et al. "
                        f"2022; more steps at low noise); default {DEFAULT_SETTINGS.spacing}")
    p.add_argument("--compile", default="off", help="the worker's --compile mode (off, default, ...); the direct "
                                                    "runs compile the same way")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--poll", type=float, default=0.02,
                   help="seconds between GET /jobs/{id} while the overhead job runs (default 0.02: the finish is "
                        "seen within 20 ms, but on 2 cores the polling itself takes CPU from the sampler)")
    p.add_argument("--repeats", type=int, default=3, help="overhead runs (median reported)")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--requests", type=int, default=2000, help="GET /jobs/{id} requests in all")
    p.add_argument("--memory-n", type=int, default=10_000, help="images in the memory job (0: skip)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads (here and in the worker)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (jobs, logs)")
    return p.parse_args(argv)


def settings(a: argparse.Namespace) -> SamplerSettings:
    """The sampler settings of the command line (by default ``DEFAULT_SETTINGS``)."""
    return SamplerSettings(a.sampler, a.steps, a.guidance, guidance_interval=a.guidance_interval, spacing=a.spacing)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="dreamdata-bench-"))
    ckpt = tiny_checkpoint(tmp / "ckpt") if a.tiny else Path(a.checkpoint or default_checkpoint())
    s = settings(a)
    with running_service(tmp, ckpt, threads=a.threads, DREAMDATA_BATCH_SIZE=a.batch_size,
                         DREAMDATA_MAX_N=max(a.n, a.memory_n), DREAMDATA_COMPILE=a.compile,
                         DREAMDATA_PRECISION=requested_precision()) as (base_url, worker_pid):
        report(a, s, ckpt, tmp, base_url, worker_pid)
    if a.keep:
        print(f"(work files in {tmp})")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def running_service(tmp: Path, ckpt: Path, threads: int, **env_settings):
    """Bundled Redis, one `dreamdata worker` and the API on a free loopback port, until the block ends.

    ``env_settings``: extra environment (``DREAMDATA_POOL="threads"``, ...). Yields (base URL, worker pid)
    once ``/readyz`` answers 200 (a worker is up).
    """
    port = free_port()
    with RedisServer(tmp / "redis", persist=False) as redis_server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DREAMDATA_")}
        env.update(REDIS_URL=redis_server.url, DREAMDATA_DATA_DIR=str(tmp / "data"), DREAMDATA_CHECKPOINT=str(ckpt),
                   DREAMDATA_TORCH_THREADS=str(threads), **{k: str(v) for k, v in env_settings.items()})
        log = open(tmp / "service.log", "ab")
        cmd = [sys.executable, "-m", "dreamdata_cli"]
        # info: the worker logs how it loaded the model (precision, layout, the auto timings) into service.log
        procs = [subprocess.Popen(cmd + ["worker", "--log-level", "info"], env=env, stdout=log, stderr=log,
                                  start_new_session=True, preexec_fn=die_with_parent),
                 subprocess.Popen(cmd + ["api", "--port", str(port), "--log-level", "warning"], env=env, stdout=log,
                                  stderr=log, start_new_session=True, preexec_fn=die_with_parent)]
        base_url = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=base_url, timeout=30) as client:
                deadline = time.monotonic() + 180
                while True:
                    try:
                        if client.get("/readyz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"service not ready; see {tmp / 'service.log'}")
                    time.sleep(0.2)
            yield base_url, procs[0].pid
        finally:
            procs[0].send_signal(signal.SIGQUIT)
            procs[1].terminate()
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            log.close()


def report(a, s: SamplerSettings, ckpt: Path, tmp: Path, base_url: str, worker_pid: int) -> None:
    params = request_params(s, a.n)
    with httpx.Client(base_url=base_url, timeout=30) as client:
        run_job(client, dict(params, n=1))  # warm-up: the worker's model is loaded and used once
        e2e, in_worker, sampler_only, with_files = [], [], [], []
        job = None
        for r in range(a.repeats):
            seconds, job = run_job(client, params, poll=a.poll)
            e2e.append(seconds)
            in_worker.append(job["timings"]["run_seconds"])  # started to finished, as the worker recorded them
            t_sample, t_files, direct_precision = direct(ckpt, a.n, s, a.batch_size, tmp / f"direct-{r}", a.compile,
                                                         a.threads)
            sampler_only.append(t_sample)
            with_files.append(t_files)
        t_e2e, t_worker, t_sample, t_files = (statistics.median(x) for x in (e2e, in_worker, sampler_only, with_files))
        lat = latency(base_url, job["url"], a.clients, a.requests)
        mem = None
        if a.memory_n:
            child = pool_child(worker_pid)
            try:
                Path(f"/proc/{child}/clear_refs").write_text("5")  # reset the peak, so it is this job's
            except OSError:
                pass
            before = rss_kb(child, "VmRSS")
            mem_seconds, _ = run_job(client, dict(params, n=a.memory_n), poll=0.2)
            mem = (before, rss_kb(child, "VmHWM"), mem_seconds)

    print(f"\ncheckpoint {ckpt}; {s.sampler} {s.steps} steps ({s.spacing}-spaced), guidance {s.guidance} "
          f"(interval {format_guidance_interval(s.guidance_interval)}); batch {a.batch_size}; "
          f"{a.threads} torch threads; device {default_device().type}; compile {a.compile}; "
          f"precision {job['output'].get('precision')}")
    loaded = [line.strip() for line in (tmp / "service.log").read_text(errors="replace").splitlines() if "precision" in line]
    print(f"worker: {loaded[0] if loaded else '(no load line in service.log)'}")
    print(f"direct: {direct_precision}\n")
    rows = [
        ("overhead", f"{a.n}-image job, end to end (median of {a.repeats}, poll {a.poll:g} s)", f"{t_e2e:.3f} s"),
        ("", "  of it running in the worker (timings.run_seconds)", f"{t_worker:.3f} s"),
        ("", "sampler called directly, same batches", f"{t_sample:.3f} s"),
        ("", "generate_to_dir directly (sampler + PNGs + zip)", f"{t_files:.3f} s"),
        ("", "service overhead vs sampler alone", f"{100 * (t_e2e - t_sample) / t_sample:+.1f} %"),
        ("", "service overhead vs generate_to_dir", f"{100 * (t_e2e - t_files) / t_files:+.1f} %"),
        ("latency", f"GET /jobs/{{id}}, {a.clients} clients, {len(lat)} requests: median",
         f"{1000 * statistics.median(lat):.1f} ms"),
        ("", "p99", f"{1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]:.1f} ms"),
    ]
    if mem:
        rows += [("memory", f"worker pool process before the {a.memory_n}-image job (RSS)", f"{mem[0] / 1024:.0f} MiB"),
                 ("", "peak RSS during the job", f"{mem[1] / 1024:.0f} MiB"),
                 ("", "job time", f"{mem[2]:.1f} s")]
    width = max(len(r[1]) for r in rows)
    print(f"{'measure':<9} {'what':<{width}} {'value':>10}")
    for m, what, value in rows:
        print(f"{m:<9} {what:<{width}} {value:>10}")
    # each round on its own: the end-to-end job, then the same work called directly, in that order
    print("\nrounds (s):  end to end   in the worker   sampler directly   generate_to_dir directly")
    for r, row in enumerate(zip(e2e, in_worker, sampler_only, with_files)):
        print(f"  {r + 1:<10}" + "".join(f"{x:>{w}.3f}" for x, w in zip(row, (12, 16, 19, 27))))


if __name__ == "__main__":
    main()
