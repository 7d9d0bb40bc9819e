"""Seconds per image of the default sampler against the batch size, the sizes timed in rotated rounds.

The default sampler is the service's, ``DEFAULT_SETTINGS`` (``diffusion/spec.py``); --sampler, --steps,
--guidance, --guidance-interval and --spacing change it.

The worker, ``dreamdata sample``, ``evaluate`` and ``metrics`` sample in batches of
``diffusion.precision.sampling_batch`` images unless told otherwise (50 on a CPU, 256 on a GPU). This
is the measurement behind the CPU's 50: every round times one batch of each size, each round in a
rotated order (a round starting with a different size), so a machine that drifts during the run
drifts for every size alike. The model is loaded as the service loads it (``auto`` precision and
layout). A guided step runs cond and uncond in one call of twice the rows, so a batch of 100 is a
model call of 200 images.

    python benchmarks/sampling_batch.py [--checkpoint checkpoints/cifar10] [--batch-sizes 25,50,100]
                                        [--rounds 3] [--threads 2] [--sampler dpmpp_sde --steps 20 ...
                                        --spacing logsnr]
    python benchmarks/sampling_batch.py --quick    # that it runs: tiny sizes, the numbers mean nothing
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere, not installed

from diffusion.checkpoint import load_for_sampling  # noqa: E402
from diffusion.precision import sampling_batch  # noqa: E402
from diffusion.samplers import model_calls, sample  # noqa: E402
from diffusion.spec import (DEFAULT_SETTINGS, SHIPPED_CHECKPOINT, SPACINGS, SamplerSettings,  # noqa: E402
                            format_guidance_interval, parse_guidance_interval)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT))
    p.add_argument("--batch-sizes", default="25,50,100", help="comma-separated (default 25,50,100)")
    p.add_argument("--rounds", type=int, default=3, help="timed batches of each size (default 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default=None, help="auto, fp32 or bf16 (default: $DREAMDATA_PRECISION or auto)")
    p.add_argument("--sampler", default=DEFAULT_SETTINGS.sampler)
    p.add_argument("--steps", type=int, default=DEFAULT_SETTINGS.steps)
    p.add_argument("--guidance", type=float, default=DEFAULT_SETTINGS.guidance)
    p.add_argument("--guidance-interval", type=parse_guidance_interval, default=DEFAULT_SETTINGS.guidance_interval)
    p.add_argument("--spacing", choices=SPACINGS, default=DEFAULT_SETTINGS.spacing,
                   help="where the steps fall: evenly in the timestep index (time) or in logSNR (logsnr; Lu et al. "
                        f"2022; more steps at low noise); default {DEFAULT_SETTINGS.spacing}")
    p.add_argument("--quick", action="store_true", help="batch sizes 1,2, one round, 2 steps")
    a = p.parse_args(argv)
    if a.quick:
        a.batch_sizes, a.rounds, a.steps = "1,2", 1, 2
    try:
        a.sizes = [int(b) for b in a.batch_sizes.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch-sizes: comma-separated integers, not {a.batch_sizes!r}")
    if not a.sizes or min(a.sizes) < 1 or a.rounds < 1:
        p.error("--batch-sizes must be positive integers and --rounds at least 1")
    return a


def main(argv: list[str] | None = None) -> dict[int, list[float]]:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    ckpt = load_for_sampling(a.checkpoint, a.device, a.precision)
    s = SamplerSettings(a.sampler, a.steps, a.guidance, guidance_interval=a.guidance_interval, spacing=a.spacing)
    s.validate(ckpt.schedule.num_timesteps)
    device = next(ckpt.model.parameters()).device

    def seconds_per_image(batch: int) -> float:
        labels = torch.arange(batch, device=device) % len(ckpt.class_names)
        t0 = time.perf_counter()
        sample(ckpt.model, ckpt.schedule, labels, list(range(batch)), sampler=s.sampler, steps=s.steps,
               guidance=s.guidance, guidance_interval=s.guidance_interval, spacing=s.spacing,
               autocast=ckpt.precision.bf16)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / batch

    print(f"checkpoint {a.checkpoint} (sha256 {ckpt.sha256[:12]}); {s.sampler} {s.steps} steps ({s.spacing}-spaced), "
          f"guidance {s.guidance:g}"
          + (f" in ({format_guidance_interval(s.guidance_interval)}]" if s.guided and s.guidance_interval else "")
          + f", {model_calls(s, ckpt.schedule)} model calls per image; {a.threads} threads; {ckpt.precision.reason}")
    print(f"the default batch here (diffusion.precision.sampling_batch): {sampling_batch(device)}")
    seconds_per_image(min(a.sizes))  # warm-up
    times: dict[int, list[float]] = {b: [] for b in a.sizes}
    for r in range(a.rounds):
        order = a.sizes[r % len(a.sizes):] + a.sizes[:r % len(a.sizes)]
        for b in order:
            times[b].append(seconds_per_image(b))
            print(f"  round {r + 1}: batch {b:>4}  {times[b][-1]:.3f} s/image", file=sys.stderr, flush=True)
    best = min(statistics.median(v) for v in times.values())
    print(f"\n{'batch':>5} {'s/image median':>15} {'min':>7} {'max':>7} {'vs best':>8}  runs (in the order timed)")
    for b, v in times.items():
        m = statistics.median(v)
        print(f"{b:>5} {m:>15.3f} {min(v):>7.3f} {max(v):>7.3f} {m / best:>7.2f}x  "
              + ", ".join(f"{x:.3f}" for x in v))
    return times


if __name__ == "__main__":
    main()
