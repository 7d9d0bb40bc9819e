"""Sampling speed on this CPU (issue 5): images/s of a checkpoint with the service's default sampler,
every variant side by side in one process, against three references:

(a) the report's method: a plain 1000-step DDPM ancestral loop (batch --ddpm-batch, 50 by default; fp32, unguided), written
    here the way the report did it. Its cost per step is constant, so it times --ddpm-probe-steps
    steps and scales to 1000 (marked "extrapolated");
(b) the diffusers library: a UNet2DModel built to our model's shape (same parameter count; random
    weights, only speed matters) run by diffusers' DDPMPipeline with the matching scheduler
    (unconditional, one model call per step) and by a minimal DiffusionPipeline that does
    classifier-free guidance in one batched call, as ours and diffusers' DiTPipeline do (guided);
    at the largest batch, fp32, eager, in both layouts, each against ours with the same settings
    (the same sampler, steps and model calls; the scheduler spaces its steps evenly in time, its
    default, whatever --spacing says: where the steps fall does not change what a step costs);
(c) the machine's limit: FLOPs of one model call (torch.utils.flop_counter) and the peak torch.mm
    throughput at the same thread count, so each row says which fraction of peak it reaches.

Our variants: diffusion.samplers.sample with the service's default sampler (``DEFAULT_SETTINGS``,
``diffusion/spec.py``; --sampler, --steps, --guidance, --guidance-interval and --spacing change it) at
fp32 and bf16 autocast (--precisions; bf16 only where the CPU has bf16 instructions unless asked for: on an
AVX2-only CPU one bf16 forward is 10-50x slower than fp32, and its rows would take hours), NCHW and
channels_last weights,
and torch.compile (fp32 and bf16, in the service's layout), at each of --batch-sizes (one batch per
timed run). A row is the median, min and max images/s over --repeats timed runs after a warm-up run of
--warmup-steps sampler steps on the same batch; for torch.compile that warm-up compiles, and its
time is reported on its own (inductor caches on disk, so a rerun on the same machine compiles faster).
The "default" row is the service's path on this CPU at the largest batch (by default the worker's CPU batch, 50):
eager, in the precision and layout that ``diffusion.precision`` picks here (auto: it times them at
model load, as the worker does). diffusers runs fp32 (its default) and bf16 (its weights cast, the way
diffusers users run bf16), and the summary sets the service's path against both.

At the defaults, on the 2-core development machine, expect about an hour (estimated from the timings
in docs/results.md: one guided 100-image run of DPM-Solver++ 20 steps takes over a minute); --skip-compile
saves about a quarter of it.

    python benchmarks/sampling.py [--checkpoint checkpoints/cifar10] [--threads 2] [--batch-sizes 1,10,50]
                                  [--repeats 3] [--sampler S --steps K --guidance W
                                  --guidance-interval LO,HI --spacing time|logsnr]   (default: DEFAULT_SETTINGS)
                                  [--skip-compile] [--skip-diffusers] [--precisions fp32,bf16]
    python benchmarks/sampling.py --quick    # that it runs: tiny sizes, the numbers mean nothing
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from diffusion.checkpoint import load_for_sampling
from diffusion.precision import CPU_SAMPLING_BATCH, benchmark_precisions, compile_for_sampling
from diffusion.samplers import model_calls, sample
from diffusion.schedules import NoiseSchedule
from diffusion.spec import (DEFAULT_SETTINGS, PRECISIONS, SHIPPED_CHECKPOINT, SPACINGS, SamplerSettings,
                            format_guidance_interval, parse_guidance_interval, requested_precision)
from diffusion.unet import UNET_CONFIGS, UNet, UNetConfig, _groups, count_parameters

LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
QUICK = dict(repeats=1, batch_sizes="2", steps=2, warmup_steps=1, ddpm_probe_steps=1, ddpm_batch=2,
             gemm_sizes="256", gemm_repeats=2)


@dataclass
class Row:
    name: str          # "ours", "ours+compile", "(a) report", "(b) diffusers"
    precision: str     # "fp32" or "bf16" (autocast)
    layout: str        # "NCHW" or "channels_last"
    batch: int         # images per batch = images per timed run
    steps: int
    guidance: str      # "1.5": cond + uncond in one call of 2x the batch; "1.5i": the same, guided only inside the
                       # guidance interval; "1.0": conditional; "uncond": no class input
    calls: int         # model calls per image (a guided step is 2: the image goes through the model twice)
    flops: float       # FLOPs of one model call on one image
    rates: list[float]  # images/s of each timed run
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def flop_rate(self) -> float:
        return self.median * self.calls * self.flops


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_description() -> str:
    model, flags = "unknown CPU", set()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} logical CPUs, {' '.join(simd) or 'no AVX2/AVX-512/AMX'}"


# ------------------------------------------------------------------------------------------ (c) limits

def _fused_cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode has no formula for the fused CPU attention kernel, which both ours and diffusers'
    # attention reach: count it as SDPA's formula does.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(forward: Callable[[], object]) -> int:
    """FLOPs of ``forward()`` as FlopCounterMode counts them: convolutions, matmuls and attention
    (2 per multiply-add); norms, activations and elementwise ops are not counted."""
    fused = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {fused: _fused_cpu_attention_flops} if fused is not None else {}
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        forward()
    return fc.get_total_flops()


def peak_matmul(size: int, dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of torch.mm on two size x size matrices: the median of ``repeats`` after one warm-up."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    return statistics.median(2 * size**3 / timed(lambda: torch.mm(a, b)) for _ in range(repeats))


# ------------------------------------------------------------------------------------------------ ours

def set_layout(model: torch.nn.Module, layout: str) -> None:
    model.to(memory_format=LAYOUTS[layout])  # in place: the parameters are converted


def measure(run: Callable[[int], object], batch: int, steps: int, warmup_steps: int,
            repeats: int) -> tuple[list[float], float]:
    """``run(k)`` samples one batch with k steps: warm up with a short run, then time ``repeats`` full
    ones.  Returns the images/s of each, and the warm-up's seconds."""
    warm = timed(lambda: run(min(warmup_steps, steps)))
    return [batch / timed(lambda: run(steps)) for _ in range(repeats)], warm


def run_ours(model, schedule: NoiseSchedule, batch: int, s: SamplerSettings, bf16: bool, repeats: int,
             warmup_steps: int) -> tuple[list[float], float]:
    """:func:`measure` for our sampler (``model``: a UNet or its torch.compile wrapper).  A guided setting's
    short warm-up may take no guided step (the guidance interval leaves out the noisiest steps), so the model
    also runs once at the guided batch (twice the images) first: no first call of a shape inside a timed run.
    The warm-up seconds returned include that call (for a compiled model, the guided shape's compile)."""
    labels = torch.arange(batch) % model.config.num_classes
    seeds = list(range(batch))
    pre = 0.0
    if s.guided:
        c = model.config

        def guided_call():
            with torch.inference_mode(), (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
                                          else contextlib.nullcontext()):
                model(torch.randn(2 * batch, c.in_channels, c.image_size, c.image_size),
                      torch.full((2 * batch,), 500, dtype=torch.long), torch.arange(2 * batch) % c.num_classes)

        pre = timed(guided_call)
    rates, warm = measure(lambda steps: sample(model, schedule, labels, seeds, sampler=s.sampler, steps=steps,
                                               guidance=s.guidance, guidance_interval=s.guidance_interval,
                                               spacing=s.spacing, autocast=bf16),
                          batch, s.steps, warmup_steps, repeats)
    return rates, pre + warm


# --------------------------------------------------------------------------------- (a) the report's way

def report_ddpm(model: UNet, schedule: NoiseSchedule, labels: torch.Tensor, steps: int) -> torch.Tensor:
    """The report's sampler as it was written: DDPM ancestral sampling over all T steps, one model call
    per step (conditional, unguided), fp32, in a plain loop over t = T-1 .. 0:

        x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z,  sigma_t^2 = beta_t

    Runs only the first ``steps`` of the T steps, so that a probe can be timed and scaled.
    """
    c, n, T = model.config, len(labels), schedule.num_timesteps
    betas, abar = schedule.betas.float(), schedule.alphas_cumprod.float()
    alphas = 1 - betas
    x = torch.randn(n, c.in_channels, c.image_size, c.image_size)
    with torch.no_grad():
        for t in range(T - 1, T - 1 - steps, -1):
            eps = model(x, torch.full((n,), t, dtype=torch.long), labels)
            x = (x - betas[t] / torch.sqrt(1 - abar[t]) * eps) / torch.sqrt(alphas[t])
            if t > 0:
                x = x + torch.sqrt(betas[t]) * torch.randn_like(x)
    return x


# ---------------------------------------------------------------------------------------- (b) diffusers

def diffusers_unet(cfg: UNetConfig, class_conditional: bool):
    """A diffusers UNet2DModel of our UNet's shape: the same widths, residual blocks per level, time
    embedding (4x base width), single-head attention at the same resolutions and in the middle, and
    (if ``class_conditional``) a class embedding with the null class. Random weights."""
    from diffusers import UNet2DModel

    attn = [cfg.image_size // 2**level in cfg.attn_resolutions for level in range(len(cfg.channel_mult))]
    return UNet2DModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=None,  # None: one head as wide as the block, as ours
        norm_num_groups=_groups(cfg.base_channels), dropout=cfg.dropout,
        num_class_embeds=cfg.num_classes + 1 if class_conditional else None,
    ).eval().requires_grad_(False)


def diffusers_scheduler(schedule: NoiseSchedule, sampler: str):
    """The diffusers scheduler that takes the same steps as our ``sampler``
    (as in tests/diffusion/test_reference_diffusers.py)."""
    import diffusers

    common = dict(num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas.numpy(),
                  prediction_type="epsilon")
    if sampler in ("dpmpp", "dpmpp_sde"):
        algorithm = "sde-dpmsolver++" if sampler == "dpmpp_sde" else "dpmsolver++"
        return diffusers.DPMSolverMultistepScheduler(**common, algorithm_type=algorithm, solver_order=2,
                                                     final_sigmas_type="zero", lower_order_final=True)
    if sampler == "ddim":
        return diffusers.DDIMScheduler(**common, set_alpha_to_one=True)
    return diffusers.DDPMScheduler(**common, variance_type="fixed_small")


def guided_pipeline(unet, scheduler):
    """A minimal diffusers pipeline for a class-conditional UNet2DModel with classifier-free guidance:
    DiTPipeline's loop (conditional and unconditional halves in one batched model call)."""
    from diffusers import DiffusionPipeline
    from diffusers.utils.torch_utils import randn_tensor

    class ClassConditionalPipeline(DiffusionPipeline):
        def __init__(self, unet, scheduler):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)

        @torch.no_grad()
        def __call__(self, class_labels: torch.Tensor, null_class: int, guidance_scale: float,
                     num_inference_steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
            c = self.unet.config
            x = randn_tensor((len(class_labels), c.in_channels, c.sample_size, c.sample_size), generator=generator,
                             dtype=self.unet.dtype)
            y = torch.cat([class_labels, torch.full_like(class_labels, null_class)])
            self.scheduler.set_timesteps(num_inference_steps)
            for t in self.progress_bar(self.scheduler.timesteps):
                eps_c, eps_u = self.unet(torch.cat([x, x]), t, class_labels=y).sample.chunk(2)
                x = self.scheduler.step(eps_u + guidance_scale * (eps_c - eps_u), t, x, generator=generator).prev_sample
            return (x / 2 + 0.5).clamp(0, 1)

    pipe = ClassConditionalPipeline(unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_diffusers(unet, flops: int, schedule: NoiseSchedule, s: SamplerSettings, batch: int, layout: str,
                  a: argparse.Namespace, precision: str = "fp32") -> Row:
    """(b): a class-conditional ``unet`` through the guided pipeline, an unconditional one through
    diffusers' DDPMPipeline; eager, its weights in ``layout``; bf16 the diffusers way: the weights cast to
    bfloat16 (``pipe.to(torch.bfloat16)``), so the noise, the model and the scheduler all run in bf16.
    ``s.spacing`` is not used: the scheduler spaces its steps evenly in time (its default); where the steps
    fall does not change what a step costs."""
    from diffusers import DDPMPipeline

    unet.to(torch.bfloat16 if precision == "bf16" else torch.float32)
    set_layout(unet, layout)
    scheduler = diffusers_scheduler(schedule, s.sampler)
    conditional = unet.config.num_class_embeds is not None
    if conditional:
        pipe = guided_pipeline(unet, scheduler)
        labels, null = torch.arange(batch) % (unet.config.num_class_embeds - 1), unet.config.num_class_embeds - 1

        def run(steps: int):
            return pipe(labels, null, s.guidance, steps, generator=torch.Generator().manual_seed(0))
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)

        def run(steps: int):
            return pipe(batch_size=batch, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                        output_type="pt")
    rates, _ = measure(run, batch, s.steps, a.warmup_steps, a.repeats)
    unet.to(torch.float32)
    return Row("(b) diffusers", precision, layout, batch, s.steps, f"{s.guidance:.1f}" if conditional else "uncond",
               s.model_calls(), flops, rates, f"{type(pipe).__name__} + {type(scheduler).__name__}")


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT))
    p.add_argument("--sampler", default=DEFAULT_SETTINGS.sampler)
    p.add_argument("--steps", type=int, default=DEFAULT_SETTINGS.steps)
    p.add_argument("--guidance", type=float, default=DEFAULT_SETTINGS.guidance)
    p.add_argument("--guidance-interval", type=parse_guidance_interval, default=DEFAULT_SETTINGS.guidance_interval,
                   metavar="LO,HI|all", help="guide only where LO < sigma_t <= HI (default "
                                             f"{format_guidance_interval(DEFAULT_SETTINGS.guidance_interval)})")
    p.add_argument("--spacing", choices=SPACINGS, default=DEFAULT_SETTINGS.spacing,
                   help="where the steps fall: evenly in the timestep index (time) or in logSNR (logsnr; Lu et al. "
                        f"2022; more steps at low noise); default {DEFAULT_SETTINGS.spacing}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-sizes", default=f"1,10,{CPU_SAMPLING_BATCH}",
                   help="comma-separated; one batch per timed run (default: up to the worker's CPU batch)")
    p.add_argument("--n", type=int, default=None, help="cap on images per timed run: larger batch sizes are cut to it")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median, min, max reported)")
    p.add_argument("--warmup-steps", type=int, default=2, help="sampler steps of the warm-up run before each row")
    p.add_argument("--ddpm-batch", type=int, default=CPU_SAMPLING_BATCH, help="batch of (a), the report's DDPM loop")
    p.add_argument("--ddpm-probe-steps", type=int, default=10, help="(a) times this many of its steps, scaled to all")
    p.add_argument("--gemm-sizes", default="2048,4096",
                   help="square torch.mm sizes for the peak; the best median counts")
    p.add_argument("--gemm-repeats", type=int, default=5)
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="what the service would use, which marks the default row (default: $DREAMDATA_PRECISION or "
                        "auto: timed here, as the worker does at start)")
    p.add_argument("--precisions", default=None,
                   help="comma-separated, of fp32,bf16: the precisions of the rows (default: both, or fp32 alone on a "
                        "CPU without bf16 instructions; fp32 and the service's own precision are always measured)")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny settings to check that it runs: " +
                   ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(**QUICK)  # options given explicitly still win
    return p.parse_args(argv)


def load_diffusers() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> list[Row]:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    ckpt = load_for_sampling(a.checkpoint, "cpu", a.precision)  # the service's choice of precision and layout
    service = ckpt.precision
    try:
        precisions, left_out = benchmark_precisions(a.precisions)
    except ValueError as e:
        raise SystemExit(str(e))
    # fp32 is every comparison's reference, and the service's own precision makes the default row
    precisions = [p for p in ("fp32", "bf16") if p in precisions or p in ("fp32", service.name)]
    service_layout = service.layout
    model, schedule, cfg = ckpt.model, ckpt.schedule, ckpt.model.config
    s = SamplerSettings(a.sampler, a.steps, a.guidance, guidance_interval=a.guidance_interval, spacing=a.spacing)
    s.validate(schedule.num_timesteps)
    guided = s.guided
    unguided_s = SamplerSettings(s.sampler, s.steps, 1.0, spacing=s.spacing) if guided else s  # one call per step
    # guided at every step, as diffusers' pipelines guide: the like-with-like row for (b)
    every_step = SamplerSettings(s.sampler, s.steps, s.guidance, spacing=s.spacing)
    interval = guided and s.guidance_interval is not None

    def glabel(settings: SamplerSettings) -> str:
        return f"{settings.guidance:.1f}" + ("i" if settings.guided and settings.guidance_interval else "")
    cap = a.n or sys.maxsize
    batches = sorted({min(int(b), cap) for b in a.batch_sizes.split(",")})
    big = batches[-1]
    T = schedule.num_timesteps
    t_start = time.perf_counter()

    def progress(what: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {what}", file=sys.stderr, flush=True)

    # ---- header: environment, models, FLOPs (c), peak (c)
    n_params = count_parameters(model)
    cfg_name = next((k for k, v in UNET_CONFIGS.items() if v == cfg), "custom")
    x1 = torch.randn(1, cfg.in_channels, cfg.image_size, cfg.image_size)  # one image, for the FLOP counts
    t1, y1 = torch.tensor([T // 2]), torch.tensor([0])
    flops = count_flops(lambda: model(x1, t1, y1))
    print(f"torch {torch.__version__}, threads {a.threads}; CPU: {cpu_description()}; "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"checkpoint {ckpt.path} (sha256 {ckpt.sha256[:12]}, {ckpt.provenance.get('steps', '?')} training steps): "
          f"UNet {cfg_name} (base {cfg.base_channels}, mult {cfg.channel_mult}, {cfg.num_res_blocks} res blocks, "
          f"attention at {cfg.attn_resolutions}), {n_params:,} parameters, {flops / 1e9:.3f} GFLOP per image per call")
    theirs: dict[str, tuple[torch.nn.Module, int]] = {}  # "uncond"/"guided": (UNet2DModel, FLOPs per call)
    if not a.skip_diffusers and load_diffusers():
        import diffusers

        for key, conditional in [("uncond", False)] + ([("guided", True)] if guided else []):
            unet = diffusers_unet(cfg, conditional)
            n = count_parameters(unet)
            f = count_flops(lambda: unet(x1, t1, class_labels=y1 if conditional else None))
            theirs[key] = unet, f
            kind = "class-conditional" if conditional else "unconditional"
            print(f"diffusers {diffusers.__version__} UNet2DModel, {kind} (random weights): {n:,} parameters "
                  f"({n / n_params - 1:+.2%} vs ours), {f / 1e9:.3f} GFLOP per image per call")
    elif not a.skip_diffusers:
        print("diffusers is not installed (pip install -e '.[test]'): the (b) rows are left out")
    print(f"the service's precision here ({requested_precision(a.precision)}): {service.reason}")
    if "bf16" not in precisions:
        print(left_out)
    print(f"sampler {s.sampler}, {s.steps} steps ({s.spacing}-spaced), guidance {s.guidance:g}"
          + (f" in the noise interval ({format_guidance_interval(s.guidance_interval)}] (guidance column "
             f"'{glabel(s)}')" if interval else "")
          + f": {model_calls(s, schedule)} model calls per image"
          + (" (cond + uncond in one call of twice the batch at a guided step)" if guided else "")
          + (f"; guided at every step: {every_step.model_calls()}" if interval else ""))
    print("FLOPs: FlopCounterMode on one forward of one image (conv, matmul, attention; not norms or activations)")
    progress("peak matmul")
    peak = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name not in precisions:
            continue
        per_size = {n: peak_matmul(n, dtype, a.gemm_repeats) for n in map(int, a.gemm_sizes.split(","))}
        peak[name] = max(per_size.values())
        print(f"peak {name} torch.mm (threads {a.threads}, median of {a.gemm_repeats}): "
              + ", ".join(f"{n}x{n} {r / 1e9:.1f}" for n, r in per_size.items()) + " GFLOP/s")
    print(f"each row: images/s, median [min, max] of {a.repeats} timed run(s) of one batch after a "
          f"{a.warmup_steps}-step warm-up (compiled rows: a whole run; guided rows also one model call at the guided "
          f"batch); GFLOP/s = images/s x calls/img x FLOPs per call; "
          f"'of peak': against torch.mm of the same precision")
    print()
    print(f"{'row':<14} {'prec':<5} {'layout':<13} {'batch':>5} {'steps':>5} {'guid':>6} {'calls/img':>9} "
          f"{'img/s':>8} {'min':>8} {'max':>8} {'GFLOP/s':>8} {'of peak':>7}  note")
    rows: list[Row] = []

    def emit(row: Row) -> Row:
        rows.append(row)
        print(f"{row.name:<14} {row.precision:<5} {row.layout:<13} {row.batch:>5} {row.steps:>5} {row.guidance:>6} "
              f"{row.calls:>9} {row.median:>8.3f} {min(row.rates):>8.3f} {max(row.rates):>8.3f} "
              f"{row.flop_rate / 1e9:>8.1f} {row.flop_rate / peak[row.precision]:>7.1%}  {row.note}", flush=True)
        return row

    def ours(m, precision: str, layout: str, batch: int, settings: SamplerSettings, note: str = "",
             compiled: bool = False) -> Row:
        name = "ours+compile" if compiled else "ours"
        progress(f"{name} {precision} {layout} batch {batch}, guidance {settings.guidance:g}")
        # A compiled model warms up with a whole run: a short one may never take a guided step (two steps are
        # at noise levels outside the guidance interval), and the guided shape (twice the batch) would then
        # compile inside the first timed run.
        warmup = settings.steps if compiled else a.warmup_steps
        rates, warm = run_ours(m, schedule, batch, settings, precision == "bf16", a.repeats, warmup)
        if compiled:  # the warm-up's time less what a run takes once compiled
            note = f"compile {warm - batch / statistics.median(rates):.1f} s (first run)"
        return emit(Row(name, precision, layout, batch, settings.steps, glabel(settings),
                        model_calls(settings, schedule), flops, rates, note))

    # ---- 1. ours, eager: every precision, layout and batch size
    for precision in precisions:
        for layout in LAYOUTS:
            set_layout(model, layout)
            for b in batches:
                is_default = (precision, layout, b) == (service.name, service_layout, big)
                ours(model, precision, layout, b, s, "default (the service's path on this CPU)" if is_default else "")
    default = next(r for r in rows if r.note.startswith("default"))

    # ---- 1b. ours, torch.compile, in the service's layout; one compilation per batch size
    if not a.skip_compile:
        set_layout(model, service_layout)
        for precision in precisions:
            for b in batches:
                torch._dynamo.reset()
                try:
                    ours(compile_for_sampling(model), precision, service_layout, b, s, compiled=True)
                except Exception as e:  # no C++ compiler, an unsupported op: say so and go on
                    print(f"{'ours+compile':<14} {precision:<5} {service_layout:<13} {b:>5}  failed: "
                          f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}", flush=True)
        torch._dynamo.reset()

    # ---- 2. (a) the report's method: batch 100, 1000 steps, fp32, NCHW, unguided
    set_layout(model, "NCHW")
    nb, probe = min(a.ddpm_batch, cap), min(a.ddpm_probe_steps, T)
    labels = torch.arange(nb) % cfg.num_classes
    progress(f"(a) report: DDPM loop, batch {nb}, {probe} of {T} steps")
    report_ddpm(model, schedule, labels, 1)  # warm-up
    secs = [timed(lambda: report_ddpm(model, schedule, labels, probe)) * T / probe for _ in range(a.repeats)]
    report = emit(Row("(a) report", "fp32", "NCHW", nb, T, "1.0", T, flops, [nb / x for x in secs],
                      "plain DDPM loop" + (f"; extrapolated from {probe} of {T} steps" if probe < T else "")))

    # ---- ours unguided (one model call per step), like with like for (a) and (b); and guided at every step
    if guided:
        for precision in precisions:
            for layout in LAYOUTS:
                set_layout(model, layout)
                ours(model, precision, layout, big, unguided_s, "unguided, for (a) and (b)")
                if interval:
                    ours(model, precision, layout, big, every_step, "guided at every step, for (b)")

    # ---- 3. (b) diffusers: same sampler, steps and batch; eager, fp32 and bf16, in both layouts (its steps evenly
    # spaced in time, the scheduler's default, whatever s.spacing: where the steps fall does not change their cost)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' deprecation notes, numpy 2's __array__ copy warning
        for key, (unet, f) in theirs.items():
            for precision in precisions:
                for layout in LAYOUTS:
                    progress(f"(b) diffusers, {key}, {precision}, {layout}, batch {big}")
                    emit(run_diffusers(unet, f, schedule, every_step if key == "guided" else unguided_s, big,
                                       layout, a, precision))

    # ---- summary
    def find(name: str, layout: str, guidance: str, precision: str = "fp32") -> Row:
        return next(r for r in rows if (r.name, r.precision, r.layout, r.batch, r.guidance)
                    == (name, precision, layout, big, guidance))

    def fastest(name: str, guidance: str) -> Row:
        return max((r for r in rows if r.name == name and r.batch == big and r.guidance == guidance),
                   key=lambda r: r.median)

    g, g1, ge = glabel(s), glabel(unguided_s), glabel(every_step)  # ge: guided at every step, as diffusers
    print()
    if theirs:
        print(f"ours / diffusers, batch {big}, {s.sampler} {s.steps} steps (ours {s.spacing}-spaced, diffusers' "
              f"time-spaced), fp32, eager, threads {a.threads}, same model size, same model calls (goal: >= 1.5x):")
        for layout in LAYOUTS:
            ours_u, their_u = find("ours", layout, g1), find("(b) diffusers", layout, "uncond")
            print(f"  {layout + ',':<14} unguided, 1 call per step "
                  f"(ours w={unguided_s.guidance:g}, diffusers unconditional): "
                  f"{ours_u.median:.3f} / {their_u.median:.3f} = {ours_u.median / their_u.median:.2f}x")
            if guided:
                ours_g, their_g = find("ours", layout, ge), find("(b) diffusers", layout, ge)
                print(f"  {layout + ',':<14} guided w={s.guidance:g} at every step, cond + uncond in one call of "
                      f"batch {2 * big}: {ours_g.median:.3f} / {their_g.median:.3f} = "
                      f"{ours_g.median / their_g.median:.2f}x")
        print(f"the service's path (eager, {service.name} {service_layout}"
              + (f", guided only in ({format_guidance_interval(s.guidance_interval)}]: {model_calls(s, schedule)} "
                 f"calls per image against diffusers' {every_step.model_calls()}" if interval else "")
              + f") against diffusers, batch {big}, same steps:")
        for gg, key in ([(g, ge)] if guided else []) + [(g1, "uncond")]:
            mine, fp32, best_t = (find("ours", service_layout, gg, service.name),
                                  find("(b) diffusers", service_layout, key), fastest("(b) diffusers", key))
            print(f"  guidance {gg}: vs diffusers fp32 (its default) in the same layout {mine.median:.3f} / "
                  f"{fp32.median:.3f} = {mine.median / fp32.median:.2f}x; vs diffusers' fastest row "
                  f"({best_t.precision} {best_t.layout}) {mine.median / best_t.median:.2f}x")
    unguided = find("ours", service_layout, g1, service.name)
    print(f"speed-up vs (a), the report's method (DDPM {T} steps, batch {nb}, unguided; goal: 50x):")
    print(f"  default row (ours {service.name} {service_layout} eager, batch {big}, {s.sampler} {s.steps} steps "
          f"({s.spacing}-spaced), guidance {s.guidance:g}): {default.median / report.median:.1f}x")
    if guided:
        print(f"  the same unguided (guidance 1): {unguided.median / report.median:.1f}x")
    best = max((r for r in rows if r.name.startswith("ours") and r.guidance == g), key=lambda r: r.median)
    print(f"  fastest row of ours at guidance {s.guidance:g} ({best.name} {best.precision} {best.layout}, "
          f"batch {best.batch}): {best.median / report.median:.1f}x")
    return rows


if __name__ == "__main__":
    main()
