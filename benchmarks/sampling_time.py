"""Time to sample N images (default 100) with a checkpoint: DDPM 1000 steps (the report's
method) vs DDIM 50 vs DPM-Solver++ 20, each with and without classifier-free guidance.

DDPM's cost per step is constant, so with --ddpm-probe-steps K < 1000 it times the first K of
the 1000 steps and reports the measured time scaled to 1000 (marked "extrapolated"). Every row first
runs two untimed steps of its own sampler and guidance (since 2026-12-02), so first-call costs (kernel
set-up for a new batch shape) are neither timed nor, for DDPM, multiplied by 1000/K.

No row is the service's default sampler (``DEFAULT_SETTINGS``, guided only inside a noise interval;
``benchmarks/sampling.py`` times that): every row is guided at every step
or not at all, with the service's guidance scale (--guidance, default 8), and its steps evenly spaced in time, as
these rows have always been (where the steps fall does not change what a step costs).

    python benchmarks/sampling_time.py [--checkpoint checkpoints/cifar10] [--n 100] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffusion.checkpoint import load_checkpoint
from diffusion.samplers import sample
from diffusion.spec import DEFAULT_SETTINGS
from training.generate import default_checkpoint


class _Stop(Exception):
    pass


def time_sampler(ckpt, n: int, sampler: str, steps: int, guidance: float, bf16: bool, probe: int | None) -> float:
    labels = torch.arange(n) % ckpt.model.config.num_classes
    seeds = list(range(n))

    def stop_after(done: int, total: int) -> None:
        if probe is not None and done >= probe:
            raise _Stop

    t0 = time.perf_counter()
    try:
        sample(ckpt.model, ckpt.schedule, labels, seeds, sampler=sampler, steps=steps, guidance=guidance,
               spacing="time", autocast=bf16, progress=stop_after)  # time-spaced, as always (module docstring)
    except _Stop:
        return (time.perf_counter() - t0) * steps / probe
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs per DPM-Solver++ row (median reported)")
    p.add_argument("--slow-repeats", type=int, default=3, help="runs per DDPM and DDIM row")
    p.add_argument("--skip-ddim-guided", action="store_true", help="leave out DDIM 50 with guidance (the slowest row)")
    p.add_argument("--guidance", type=float, default=DEFAULT_SETTINGS.guidance)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the model calls")
    p.add_argument("--ddpm-probe-steps", type=int, default=50,
                   help="time this many DDPM steps and scale to 1000 (0 = run all 1000)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ckpt = load_checkpoint(a.checkpoint or default_checkpoint())
    ckpt.model.to(memory_format=torch.channels_last)
    print(f"checkpoint {ckpt.path}: {sum(p.numel() for p in ckpt.model.parameters()) / 1e6:.2f}M parameters; "
          f"{a.n} images, batch {a.n}, {a.threads} threads, {'bf16' if a.bf16 else 'fp32'}, "
          f"median of {a.repeats} runs (DPM-Solver++) / {a.slow_repeats} (DDPM, DDIM)")
    print(f"{'sampler':<8} {'steps':>5} {'guidance':>8} {'seconds':>9} {'img/s':>7} {'vs DDPM-1000':>12}  note")
    base = {}
    rows = [(s, k, w) for s, k in (("ddpm", 1000), ("ddim", 50), ("dpmpp", 20)) for w in (1.0, a.guidance)]
    if a.skip_ddim_guided:
        rows.remove(("ddim", 50, a.guidance))
    for sampler, steps, w in rows:
        probe = a.ddpm_probe_steps if sampler == "ddpm" and a.ddpm_probe_steps else None
        repeats = a.repeats if sampler == "dpmpp" else a.slow_repeats
        time_sampler(ckpt, a.n, sampler, steps, w, a.bf16, 2)  # warm-up, not timed: this shape's first-call costs
        runs = [time_sampler(ckpt, a.n, sampler, steps, w, a.bf16, probe) for _ in range(repeats)]
        s = statistics.median(runs)
        base.setdefault(w, s)
        note = (f"extrapolated from {probe} steps; " if probe else "") + f"{repeats} run(s)"
        print(f"{sampler:<8} {steps:>5} {w:>8.1f} {s:>9.2f} {a.n / s:>7.3g} {base[w] / s:>11.1f}x  {note}",
              flush=True)


if __name__ == "__main__":
    main()
