"""Training throughput (images/s) of a named config on this machine: fp32 vs bf16 autocast,
channels_last on/off.  Median over --repeats runs of --steps timed steps (after --warmup).

    python benchmarks/training_throughput.py --config cifar10-cpu --threads 2 [--precisions fp32,bf16]

The bf16 rows are left out by default on a CPU without bf16 instructions (training.train trains in fp32
there): on a 2-core AVX2 EPYC bf16 trained at 0.5-0.7 images/s against 7.9-10.2 in fp32.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffusion.precision import benchmark_precisions
from diffusion.schedules import NoiseSchedule
from diffusion.unet import UNet, count_parameters
from training.configs import resolve_config
from training.train import diffusion_loss


def run_once(cfg, bf16: bool, channels_last: bool, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = UNet(cfg.unet)
    x = torch.randn(cfg.batch_size, 3, cfg.unet.image_size, cfg.unet.image_size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cfg.unet.num_classes, (cfg.batch_size,))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    schedule = NoiseSchedule(cfg.schedule)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        loss = diffusion_loss(model, schedule, x, y, cfg.p_uncond, cfg.unet.num_classes, autocast=bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cifar10-cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--precisions", default=None,
                   help="comma-separated, of fp32,bf16 (default: both, or fp32 alone on a CPU without bf16 instructions)")
    a = p.parse_args(argv)
    try:
        precisions, left_out = benchmark_precisions(a.precisions)
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(a.threads)
    cfg = resolve_config(a.config, batch_size=a.batch_size)
    print(f"config {a.config}: {count_parameters(UNet(cfg.unet)) / 1e6:.2f}M parameters, batch {cfg.batch_size}, "
          f"{a.threads} threads, torch {torch.__version__}, {a.repeats} runs x {a.steps} steps")
    print(f"{'precision':<10} {'layout':<14} {'median img/s':>12} {'min':>8} {'max':>8}")
    for bf16 in [p == "bf16" for p in ("fp32", "bf16") if p in precisions]:
        for cl in (False, True):
            runs = [run_once(cfg, bf16, cl, a.steps, a.warmup) for _ in range(a.repeats)]
            print(f"{'bf16' if bf16 else 'fp32':<10} {'channels_last' if cl else 'NCHW':<14} "
                  f"{statistics.median(runs):>12.1f} {min(runs):>8.1f} {max(runs):>8.1f}", flush=True)
    if left_out:
        print(left_out)


if __name__ == "__main__":
    main()
