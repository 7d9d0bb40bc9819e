"""Dynamic batching, end to end: J concurrent small jobs against one big job, on the real service.

For each worker mode (prefork with one job at a time, the old behaviour; threads with J jobs at
once, whose images merge into shared model batches) it starts the bundled Redis, a `dreamdata
worker` and the API, then measures
  1. one job of J x N images (the reference: one batch of J x N if the batch size allows),
  2. J jobs of N images posted at once: seconds until the last one succeeds, and each job's own
     time from POST to "succeeded" (median and max). Clients poll every POLL seconds (the times
     are rounded up to that).

Every job asks for the service's default sampler, ``DEFAULT_SETTINGS`` (``diffusion/spec.py``), each setting
spelled out in the request; --sampler, --steps, --guidance, --guidance-interval and
--spacing change it.

    python benchmarks/dynamic_batching.py [--checkpoint DIR | --tiny] [--jobs 10] [--n 10] [--threads 2]
    python benchmarks/dynamic_batching.py --tiny --steps 5     # a quick check of the script
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from diffusion.precision import default_device
from diffusion.spec import DEFAULT_SETTINGS, SPACINGS, format_guidance_interval, parse_guidance_interval
from service import run_job, running_service, tiny_checkpoint
from training.generate import default_checkpoint

# Clients poll GET /jobs/{id} this often. Faster polling by J clients costs the 2-core machine real CPU
# (10 clients at 20 Hz slowed the worker by a third), which the worker would be measured as losing.
POLL = 0.5
MODES = {"prefork": {"DREAMDATA_POOL": "prefork", "DREAMDATA_CONCURRENCY": 1},
         "threads": {"DREAMDATA_POOL": "threads"}}  # concurrency: --jobs


def concurrent_jobs(base_url: str, params: list[dict]) -> tuple[float, list[float]]:
    """Post every job at once (one connected client thread each); (seconds from the first POST until
    the last job succeeded, each job's seconds from its POST to "succeeded")."""
    spans = [(0.0, 0.0)] * len(params)
    start = threading.Barrier(len(params))

    def one(i: int) -> None:
        with httpx.Client(base_url=base_url, timeout=60) as c:
            c.get("/healthz")  # connect before the clock starts
            start.wait()
            t0 = time.perf_counter()
            run_job(c, params[i], poll=POLL)
            spans[i] = (t0, time.perf_counter())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(params))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return max(e for _, e in spans) - min(s for s, _ in spans), [e - s for s, e in spans]


def sampler_params(a: argparse.Namespace) -> dict:
    """The sampler settings of every job's POST /generate query, each spelled out (none left to the service)."""
    return {"sampler": a.sampler, "steps": a.steps, "guidance": a.guidance,
            "guidance_interval": format_guidance_interval(a.guidance_interval), "spacing": a.spacing}


def measure(mode: str, a, ckpt: Path, tmp: Path) -> list[tuple]:
    env = dict(MODES[mode], DREAMDATA_BATCH_SIZE=a.batch_size, DREAMDATA_MAX_N=max(a.jobs * a.n, 1))
    if mode == "threads":
        env["DREAMDATA_CONCURRENCY"] = a.jobs
    common = sampler_params(a)
    rows = []
    with running_service(tmp, ckpt, threads=a.threads, **env) as (base_url, _):
        with httpx.Client(base_url=base_url, timeout=60) as client:
            run_job(client, dict(common, **{"class": "cat", "n": 1}))  # warm-up
            big = [run_job(client, dict(common, **{"class": "cat", "n": a.jobs * a.n, "seed": r}), poll=POLL)[0]
                   for r in range(a.repeats)]
        rows.append((mode, f"1 job of {a.jobs * a.n} images", statistics.median(big), None, None))
        runs = []
        for r in range(a.repeats):
            params = [dict(common, **{"class": "cat", "n": a.n, "seed": 10_000 * r + 100 * j}) for j in range(a.jobs)]
            runs.append(concurrent_jobs(base_url, params))
        wall, per_job = sorted(runs)[(len(runs) - 1) // 2]  # the median run by wall time (lower middle if even)
        rows.append((mode, f"{a.jobs} concurrent jobs of {a.n} images", wall, statistics.median(per_job),
                     max(per_job)))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    p.add_argument("--tiny", action="store_true", help="a tiny random checkpoint (a quick check of the script)")
    p.add_argument("--jobs", type=int, default=10, help="concurrent jobs (and the threads worker's concurrency)")
    p.add_argument("--n", type=int, default=10, help="images per small job")
    p.add_argument("--sampler", default=DEFAULT_SETTINGS.sampler)
    p.add_argument("--steps", type=int, default=DEFAULT_SETTINGS.steps)
    p.add_argument("--guidance", type=float, default=DEFAULT_SETTINGS.guidance)
    p.add_argument("--guidance-interval", type=parse_guidance_interval, default=DEFAULT_SETTINGS.guidance_interval,
                   metavar="LO,HI|all")
    p.add_argument("--spacing", choices=SPACINGS, default=DEFAULT_SETTINGS.spacing,
                   help="where the steps fall: evenly in the timestep index (time) or in logSNR (logsnr; Lu et al. "
                        f"2022; more steps at low noise); default {DEFAULT_SETTINGS.spacing}")
    p.add_argument("--batch-size", type=int, default=100, help="the worker's batch size (most images merged)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each measurement (median)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in the worker")
    p.add_argument("--modes", default="prefork,threads")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="dreamdata-batching-"))
    try:
        ckpt = tiny_checkpoint(tmp / "ckpt") if a.tiny else Path(a.checkpoint or default_checkpoint())
        rows = []
        for mode in a.modes.split(","):
            rows += measure(mode, a, ckpt, tmp / mode)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ncheckpoint {ckpt}; {a.sampler} {a.steps} steps ({a.spacing}-spaced), guidance {a.guidance} "
          f"(interval {format_guidance_interval(a.guidance_interval)}); worker batch {a.batch_size}; "
          f"{a.threads} torch threads; device {default_device().type}; "
          f"median of {a.repeats}\n")
    width = max(len(r[1]) for r in rows)
    print(f"{'worker':<8} {'work':<{width}} {'all done s':>10} {'per job median s':>16} {'per job max s':>13}")
    for mode, what, wall, med, mx in rows:
        print(f"{mode:<8} {what:<{width}} {wall:>10.2f} {'' if med is None else f'{med:.2f}':>16} "
              f"{'' if mx is None else f'{mx:.2f}':>13}")
    by = {(r[0], r[1].startswith("1 job")): r[2] for r in rows}
    for mode in a.modes.split(","):
        if (mode, True) in by and (mode, False) in by:
            print(f"{mode}: {a.jobs} concurrent jobs took {by[(mode, False)] / by[(mode, True)]:.2f}x "
                  f"the time of one {a.jobs * a.n}-image job")


if __name__ == "__main__":
    main()
