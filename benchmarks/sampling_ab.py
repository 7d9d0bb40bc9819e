"""The service's default sampler against the same sampler guided at every step and against diffusers,
timed interleaved (issue 5).

``benchmarks/sampling.py`` times its rows one after the other, so a machine whose speed drifts during
its ~20 minutes (these shared machines do: the same row ran 10% slower late in a run than early)
favours whichever rows came first. This script times only the three rows that the speed claims rest
on, in rounds, each round running every variant once in a rotated order, and reports each variant's
median over the rounds and each ratio as the median [min, max] of its per-round ratios:

    default     ``DEFAULT_SETTINGS`` as the service samples (with its guidance interval, if any)
    every step  the same sampler, steps, spacing and guidance, guided at every step (what diffusers does)
    diffusers   a same-size diffusers UNet2DModel (random weights) in the same guided loop as
                ``sampling.py``'s (b) rows, with the matching scheduler; its weights cast to the
                service's precision, the way diffusers users run bf16.  Its steps stay evenly spaced in
                time (the scheduler's default): where the steps fall does not change what a step costs
    default, compiled   (with --compile) the default on ``diffusion.precision.compile_for_sampling(model)``, as
                the worker runs it with ``--compile default`` (on a CPU: inductor with freezing); its warm-up
                is a whole run, which compiles both the guided and the unguided batch shape
    DDPM-1000   (with --report-loop) DDPM ancestral at 1000 steps, the report's method: unguided, as the
                report ran it (1,000 model calls per image), and guided as the default is, in its
                interval (1,445 calls on the shipped schedule: the quality reference of docs/results.md
                "Steps evenly spaced in logSNR"); on the compiled model with --compile, so the ratios
                compare like with like.  About 5-12 s per image on a 2-core CPU: use a small --batch
                and few --rounds (``--batch 20 --rounds 3`` is about a quarter of an hour)
    default, unfolded upsampling   (with --unfolded) the default on a copy of the model whose
                ``Upsample`` layers run nearest upsampling then their 3x3 conv, as diffusers does,
                instead of the folded transposed conv (``diffusion.unet.Upsample``)

All in the precision and layout the service picks on this machine (``diffusion.precision``), one batch
of --batch images per timed run, after one short warm-up run each.

    python benchmarks/sampling_ab.py [--checkpoint checkpoints/cifar10] [--threads 2] [--batch 50] [--rounds 5]
        [--unfolded] [--compile] [--report-loop]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from sampling import diffusers_scheduler, diffusers_unet, guided_pipeline, load_diffusers, set_layout  # noqa: E402

from diffusion.checkpoint import load_for_sampling  # noqa: E402
from diffusion.precision import compile_for_sampling  # noqa: E402
from diffusion.samplers import model_calls, sample  # noqa: E402
from diffusion.spec import (DEFAULT_SETTINGS, PRECISIONS, SHIPPED_CHECKPOINT, SamplerSettings,  # noqa: E402
                            format_guidance_interval)
from diffusion.unet import set_upsample_folding  # noqa: E402
from training.plots import to_uint8  # noqa: E402

UNFOLDED = "default, unfolded upsampling"
COMPILED = "default, compiled"
REPORT = "DDPM-1000, unguided"
REPORT_GUIDED = "DDPM-1000, guided as default"
REPORT_STEPS = 1000


def paired_ratios(a: list[float], b: list[float]) -> dict:
    """Median, min and max of a[i] / b[i]: the ratio within each round, where both ran on the machine as it was
    then (a ratio of the two medians would pair one round's rate with another's)."""
    r = [x / y for x, y in zip(a, b)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r), "rounds": r}

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=50, help="images per timed run (default 50)")
    p.add_argument("--rounds", type=int, default=5, help="timed runs per variant, one per round (default 5)")
    p.add_argument("--steps", type=int, default=DEFAULT_SETTINGS.steps, help="sampler steps (default: the default's)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="default: $DREAMDATA_PRECISION or auto, as the service decides")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--unfolded", action="store_true",
                   help="also time the default with plain interpolate-then-conv upsampling (the UNet before the fold)")
    p.add_argument("--compile", action="store_true",
                   help="also time the default on the model compiled as the worker's --compile default compiles it")
    p.add_argument("--report-loop", action="store_true",
                   help="also time DDPM ancestral at 1000 steps (the report's method), unguided and guided as the "
                        "default is; slow: use a small --batch and few --rounds")
    a = p.parse_args(argv)
    if a.batch < 1 or a.rounds < 1 or a.steps < 2:
        p.error("--batch and --rounds must be at least 1, --steps at least 2")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    ckpt = load_for_sampling(a.checkpoint, "cpu", a.precision)
    choice, model, schedule = ckpt.precision, ckpt.model, ckpt.schedule
    d = DEFAULT_SETTINGS
    default = SamplerSettings(d.sampler, a.steps, d.guidance, d.eta, d.guidance_interval, d.spacing)
    every = SamplerSettings(d.sampler, a.steps, d.guidance, d.eta, None, d.spacing)
    labels, seeds = torch.arange(a.batch) % model.config.num_classes, list(range(a.batch))

    def ours(s: SamplerSettings, net: torch.nn.Module = model) -> Callable[[int], object]:
        return lambda steps: sample(net, schedule, labels, seeds, sampler=s.sampler, steps=steps,
                                    guidance=s.guidance, guidance_interval=s.guidance_interval, autocast=choice.bf16,
                                    spacing=s.spacing)

    interval = format_guidance_interval(default.guidance_interval)
    variants: dict[str, tuple[Callable[[int], object], int]] = {
        f"default (interval {interval})": (ours(default), model_calls(default, schedule)),
        "every step": (ours(every), model_calls(every, schedule)),
    }
    if a.unfolded:
        unfolded = set_upsample_folding(copy.deepcopy(model), False)
        variants[UNFOLDED] = (ours(default, unfolded), model_calls(default, schedule))
    compiled = compile_for_sampling(model) if a.compile else None
    if a.compile:
        variants[COMPILED] = (ours(default, compiled), model_calls(default, schedule))
    if a.report_loop:
        def report_loop(guidance: float, interval) -> Callable[[int], object]:
            net = model if compiled is None else compiled
            return lambda steps: sample(net, schedule, labels, seeds, sampler="ddpm",  # warm-up: a few steps
                                        steps=REPORT_STEPS if steps >= a.steps else steps, guidance=guidance,
                                        guidance_interval=interval, autocast=choice.bf16)
        for name, s in ((REPORT, SamplerSettings("ddpm", REPORT_STEPS, 1.0)),
                        (REPORT_GUIDED, SamplerSettings("ddpm", REPORT_STEPS, d.guidance, 0.0, d.guidance_interval))):
            variants[name] = (report_loop(s.guidance, s.guidance_interval), model_calls(s, schedule))
    if not a.skip_diffusers and load_diffusers():
        unet = diffusers_unet(model.config, True).to(torch.bfloat16 if choice.bf16 else torch.float32)
        set_layout(unet, choice.layout)
        pipe = guided_pipeline(unet, diffusers_scheduler(schedule, d.sampler))
        null = unet.config.num_class_embeds - 1
        variants["diffusers"] = (lambda steps: pipe(labels, null, d.guidance, steps,
                                                     generator=torch.Generator().manual_seed(0)),
                                 every.model_calls())
    print(f"{d.sampler}, {a.steps} steps ({d.spacing}-spaced), guidance {d.guidance:g}; "
          f"precision {choice.name} {choice.layout} "
          f"({choice.reason}); batch {a.batch}, threads {a.threads}, {a.rounds} rounds")
    names = list(variants)
    rates: dict[str, list[float]] = {n: [] for n in names}
    images: dict[str, object] = {}  # each variant's last batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' notes on casting and deprecations
        for n in names:
            t0 = time.perf_counter()
            # warm-up; compiling needs a guided and an unguided step (the DDPM rows run on the compiled model then)
            variants[n][0](a.steps if n == COMPILED else 2)
            if n == COMPILED:
                print(f"{n}: warm-up run (compiling) {time.perf_counter() - t0:.1f} s", flush=True)
        for r in range(a.rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # rotated: no variant always runs first
            for n in order:
                t0 = time.perf_counter()
                images[n] = variants[n][0](a.steps)
                rates[n].append(a.batch / (time.perf_counter() - t0))
            print(f"round {r + 1}: " + ", ".join(f"{n} {rates[n][-1]:.3f}" for n in names), flush=True)
    med = {n: statistics.median(v) for n, v in rates.items()}
    print(f"\n{'variant':<30} {'calls/img':>9} {'img/s':>8} {'min':>8} {'max':>8}")
    for n in names:
        print(f"{n:<30} {variants[n][1]:>9} {med[n]:>8.4g} {min(rates[n]):>8.4g} {max(rates[n]):>8.4g}")
    first = names[0]
    pairs = [(first, n) for n in names[1:]] + ([("every step", "diffusers")] if "diffusers" in med else [])
    if COMPILED in med and "diffusers" in med:
        pairs.append((COMPILED, "diffusers"))
    if a.report_loop:  # like with like: the DDPM rows ran on the compiled model where there is one
        ours_ = COMPILED if a.compile else first
        pairs = [p for p in pairs if REPORT not in p and REPORT_GUIDED not in p]
        pairs += [(ours_, REPORT), (ours_, REPORT_GUIDED)]
    ratios = {}
    print("ratios: the median [min, max] of the per-round ratios (each round times both in turn)")
    for a_, b_ in pairs:
        ratios[f"{a_} / {b_}"] = r = paired_ratios(rates[a_], rates[b_])
        print(f"{a_} / {b_}: {r['median']:.2f}x [{r['min']:.2f}, {r['max']:.2f}]")
    result = {"rates": rates, "medians": med, "ratios": ratios, "calls": {n: variants[n][1] for n in names}}
    if a.unfolded:
        result["unfolded_difference"] = diff = image_difference(images[first], images[UNFOLDED])
        print(f"images, folded vs unfolded upsampling (same seeds), in 8-bit levels: {diff['changed']:.1%} of values "
              f"differ, mean |difference| {diff['mean']:.2f}, max {diff['max']:.0f}")
    return result


def image_difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How two batches of images in [-1, 1] differ once written as 8-bit PNGs (as the service writes them)."""
    d = (to_uint8(a).float() - to_uint8(b).float()).abs()
    return {"changed": d.ne(0).float().mean().item(), "mean": d.mean().item(), "max": d.max().item()}


if __name__ == "__main__":
    main()
