"""One call on a lent GPU: the augmentation experiment at the report's size (optional, first), train a
checkpoint, then time sampling (issue 5's GPU part).

The device machine is lent for minutes, once, and keeps nothing; this script does the whole visit in one
command and writes everything worth keeping under --out (the device tool's $OUT), 7 files at most and the
documented command's log.txt (the tool brings back 8), each written as soon as it exists, so a call stopped at
its time limit still brings back what it did:

    session.json      what ran where (torch, GPU), the training summary, the sampling table
    config.json       the trained EMA checkpoint (``dreamdata sample --checkpoint DIR`` reads the pair)
    model.safetensors   (float16, about 13 MB for the shipped model's size)
    metrics.jsonl     the training log (loss, images/s per --log-every steps) and loss.png, its curve
    samples.png       10 images per class from the trained checkpoint, with the default sampler
    evaluation.tar.gz with --evaluate-per-class: report.json, report.md, the plots and runs/ of the experiment

0. With ``--evaluate-per-class K`` (off by default), first: ``training.evaluate.run_evaluation`` on the
   *shipped* checkpoint (``--evaluate-checkpoint``), the CNN (``--evaluate-classifier``), the whole real
   training set (``--evaluate-real-fraction 1``), K synthetic images per class sampled on the GPU in batches
   of ``--evaluate-batch`` (bf16, as ``auto`` picks on a GPU), 10 epochs, seeds 0, 1, 2: the row that the
   CPU machines cannot afford (50,000 images at 0.4-0.9 s each there).  Its folder is packed into
   ``evaluation.tar.gz`` (the synthetic images stay behind) and its accuracies go into session.json.
1. Training: ``training.train.train`` with ``--config`` (default ``cifar10-gpu``: the shipped model's
   UNet, batch 512, bf16 autocast, channels_last, ``torch.compile``) for ``--train-minutes`` of
   training wall time, compile included (so ``--train-compile auto`` trains eager when it gets fewer
   than ``COMPILE_TRAIN_MIN_MINUTES``: a compile of one to two minutes, estimated, would eat a short run).
2. Sampling: images/s of the default sampler (all of ``DEFAULT_SETTINGS``, ``diffusion/spec.py``: sampler,
   steps, spacing, guidance and its interval; ``--steps`` changes the steps only) on the trained checkpoint at each
   of ``--batch-sizes`` (100, 256: the service's GPU batch, 1000), in bf16 autocast: eager, eager in fp32 (what
   bf16 buys), and ``torch.compile(mode="reduce-overhead")`` (inductor
   kernels replayed as CUDA graphs; each batch shape compiles once, before timing), the median of
   ``--repeats`` timed runs after one warm-up run; plus the seconds a run spends drawing the per-image
   noise on the CPU (``diffusion.samplers`` draws it from one generator per image seed, so an image does
   not depend on its batch), and the report's 1000-step DDPM loop (unguided, bf16, a model call and a
   ``randn_like`` on the device per step) at the largest batch, timed over ``--ddpm-probe-steps`` steps and
   scaled to 1000 (constant cost per step); and the machine's limit: bf16 ``torch.mm`` FLOP/s at
   ``--peak-size`` and the FLOPs of one model call, which give every sampling row its fraction of that peak.

It imports only ``diffusion`` and ``training`` (torch, numpy, Pillow, safetensors, tqdm, matplotlib), which
the device machine's image has; the service's packages (celery, fastapi, redis) are not needed there.

On the device (the data travels in the ignored folder ``.gpu/``: ``mkdir -p .gpu && cp
../shared/data/cifar10-jpeg.tar.gz .gpu/`` once, then ``carry: [".gpu"]``; 20 MB of the 64 MiB a call carries)::

    set -o pipefail; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_session.py --data .gpu/cifar10-jpeg.tar.gz \\
        --out $OUT --train-minutes 2.5 --deadline-s 420 2>&1 | tee $OUT/log.txt        (run's timeout_s: 480)

and with the experiment at the report's size first (its time there is not known: it goes first, and the
training is shortened, or left out for the shipped checkpoint, to fit the deadline)::

    set -o pipefail; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_session.py --data .gpu/cifar10-jpeg.tar.gz \\
        --out $OUT --evaluate-per-class 5000 --train-minutes 2 --deadline-s 500 2>&1 | tee $OUT/log.txt
                                                                                     (run's timeout_s: 560)

(``tee`` into $OUT: a command killed at its limit loses its pipeline's output, but not what is under $OUT.)

Expected cost there, estimated, not measured: about 15 s to decode the data set, the training minutes,
then about a minute of eager sampling and four compiles (two batch sizes, each guided and unguided
shapes) of roughly 30-60 s each, as many as the deadline lets start: 7-8 minutes. A task's 15 minutes of
device time also pay for the machine's start (minutes) and its idle wait, and a second start needs 4 of
them left: a deadline of 420 s (timeout 480 s) is meant to leave a rerun possible if the first call fails
early, not a second full visit.

One visit, so nothing may end it early. ``--deadline-s`` (seconds from the start) fits the stages in: the
experiment stops when only a short training and the sampling would be left, or before a classifier run as
long as its longest so far would eat into that (its finished runs are packed all the same), training gets
what is left after the sampling's reserve, the eager rows, the noise timing and the DDPM probe run before
any compiled variant, and a compiled variant starts only with ``COMPILE_MIN_S`` left, or, after the first,
with what the previous one measured (1.3 times its compiling first run, plus its timed runs scaled to the
batch). The clock starts before torch loads.  A stage that raises is recorded in session.json's ``errors`` and the next one
runs; a compiled training that fails is run again eager.  session.json is replaced whole at each write.

A smoke run on the CPU (what the tests do; seconds)::

    python benchmarks/gpu_session.py --data DATA --out /tmp/gpu --config tiny --train-minutes 0.05 \\
        --batch-sizes 2 --repeats 1 --ddpm-probe-steps 2 --steps 2 --no-compile --peak-size 64
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

STARTED = time.perf_counter()  # the deadline counts from here, before torch and CUDA load

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere, not installed

from diffusion.checkpoint import load_for_sampling  # noqa: E402
from diffusion.precision import default_device  # noqa: E402
from diffusion.samplers import _Noise, model_calls, sample  # noqa: E402
from diffusion.spec import DEFAULT_SETTINGS, SamplerSettings  # noqa: E402
from training.configs import resolve_config  # noqa: E402
from training.evaluate_cli import parse_seeds  # noqa: E402
from training.generate import default_checkpoint  # noqa: E402
from training.plots import image_grid, to_uint8  # noqa: E402
from training.train import TrainingInterrupted, train  # noqa: E402

# Estimates for the deadline (not measured on a GPU): the sample grid, the eager rows, the noise timing
# (bf16 and fp32, at batches 100, 256 and 1000) and the DDPM probe at the default sizes; the set-up of a training run (data decode, model build) beyond
# its --train-minutes; the least time left to start a compiled sampling variant (one compile, 30-60 s, and
# its timed runs); the shortest training worth running (else the shipped checkpoint is timed instead).
SAMPLING_RESERVE_S = 120.0
EVAL_PACK_S = 15.0  # packing the experiment's folder (its runs and report, not the images) into the archive
COMPILE_TRAIN_MIN_MINUTES = 4.0  # --train-compile auto: a compile (1-2 min, counted in the minutes) pays off past this
TRAIN_SETUP_S = 30.0
COMPILE_MIN_S = 120.0
MIN_TRAIN_S = 30.0


class Clock:
    """Seconds left before ``--deadline-s`` (infinite without one)."""

    def __init__(self, deadline_s: float | None, t0: float | None = None):
        self.t0, self.deadline_s = time.perf_counter() if t0 is None else t0, deadline_s

    def left(self) -> float:
        return math.inf if self.deadline_s is None else self.deadline_s - (time.perf_counter() - self.t0)


class OutOfTime(Exception):
    """A stage stopped to leave the later ones their time."""


def batch_sizes(text: str) -> tuple[int, ...]:
    """``--batch-sizes``: comma-separated positive integers (checked at the start, not after the training)."""
    try:
        sizes = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes like 100,1000, got {text!r}") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be at least 1, got {text!r}")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="CIFAR-10 tar.gz (or any data set training.data reads)")
    p.add_argument("--out", required=True, help="where the kept files go (the device tool's $OUT)")
    p.add_argument("--work", default=None, help="training run directory (default: a folder beside --out)")
    p.add_argument("--config", default="cifar10-gpu", help="training config (default cifar10-gpu)")
    p.add_argument("--train-minutes", type=float, default=4.0, help="training wall time, compile included")
    p.add_argument("--batch-size", type=int, default=None, help="override the config's batch")
    p.add_argument("--lr", type=float, default=None, help="override the config's learning rate")
    p.add_argument("--no-compile", action="store_true", help="train and sample without torch.compile")
    p.add_argument("--train-compile", choices=("auto", "on", "off"), default="auto",
                   help=f"torch.compile the training step; auto: when the training gets at least "
                        f"{COMPILE_TRAIN_MIN_MINUTES:g} minutes (its compile time counts in them)")
    p.add_argument("--skip-train", metavar="CHECKPOINT", default=None,
                   help="time sampling of this checkpoint instead of training one")
    p.add_argument("--batch-sizes", type=batch_sizes, default=(100, 256, 1000),
                   help="images per timed sampling run (default 100,256,1000; 256 is the service's GPU batch)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median; default 3)")
    p.add_argument("--steps", type=int, default=DEFAULT_SETTINGS.steps, help="sampler steps (default: the default's)")
    p.add_argument("--ddpm-probe-steps", type=int, default=20, help="timed steps of the 1000-step loop")
    p.add_argument("--peak-size", type=int, default=8192, help="matrix size of the bf16 torch.mm peak (8192)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="finish within this many seconds of the start, shortening or leaving out later stages "
                        "(set it about a minute under the run's timeout_s); default: no deadline")
    e = p.add_argument_group("the augmentation experiment (stage 0, off unless --evaluate-per-class is given)")
    e.add_argument("--evaluate-per-class", type=int, default=0, metavar="K",
                   help="synthetic images per class (the report's size: 5000); 0: no experiment (default)")
    e.add_argument("--evaluate-checkpoint", default=None, help="default: the shipped checkpoint")
    e.add_argument("--evaluate-classifier", default="cnn", choices=("mlp", "cnn"))
    e.add_argument("--evaluate-real-fraction", type=float, default=1.0)
    e.add_argument("--evaluate-epochs", type=int, default=10)
    e.add_argument("--evaluate-seeds", type=parse_seeds, default=(0, 1, 2), help="e.g. 0,1,2 or 0-4")
    e.add_argument("--evaluate-batch", type=int, default=1000, help="images per sampling batch")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": device.type,
           "cpu_threads": torch.get_num_threads(),
           # what an "fp32" row's convolutions and matmuls may run in on a GPU (TF32 where allowed)
           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), multiprocessors=props.multi_processor_count)
    return env


def work_dir(out: Path, suffix: str) -> Path:
    """A working folder beside --out, or a temporary one where that is not writable."""
    path = out.parent / (out.name + suffix)
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:
        return Path(tempfile.mkdtemp(prefix=f"gpu-session{suffix}-"))


def stage(name: str, fn, summary: dict, save):
    """``fn()``; an exception is printed, recorded in ``summary["errors"][name]``, and None returned."""
    try:
        return fn()
    except Exception as e:
        record_error(name, e, summary, save)
        return None


def record_error(name: str, e: Exception, summary: dict, save) -> None:
    """Print the traceback, keep the error in ``summary["errors"][name]`` and write session.json."""
    traceback.print_exc()
    summary.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
    save()
    log(f"{name} failed ({type(e).__name__}: {e}); going on")


def train_checkpoint(args: argparse.Namespace, out: Path, summary: dict, save, minutes: float, clock: Clock) -> Path:
    overrides = {"max_minutes": minutes, "max_steps": 10_000_000}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.lr:
        overrides["lr"] = args.lr
    if args.no_compile or args.train_compile == "off" or (
            args.train_compile == "auto" and minutes < COMPILE_TRAIN_MIN_MINUTES):
        overrides["compile"] = False
    elif args.train_compile == "on":
        overrides["compile"] = True
    cfg = resolve_config(args.config, **overrides)
    work = Path(args.work) if args.work else work_dir(out, "-train")
    log(f"training {args.config} for {minutes:.2f} min: batch {cfg.batch_size}, lr {cfg.lr}, "
        f"bf16 {cfg.bf16}, compile {cfg.compile} -> {work}")
    t0 = time.perf_counter()

    def run(cfg, work: Path, resume: bool) -> tuple[Path, TrainingInterrupted | None]:
        try:
            return train(cfg, args.data, work, resume=resume, progress=False), None
        except TrainingInterrupted as e:  # a signal: it saved its checkpoint; bring that back, then stop too
            return work / "checkpoint", e

    try:
        ckpt_dir, stopped = run(cfg, work, True)
    except Exception as e:
        if not cfg.compile:
            raise
        record_error("training (compiled)", e, summary, save)
        # eager, in a fresh folder (max_minutes counts a resumed run's earlier time too), for what the deadline leaves
        left = min(minutes * 60 - (time.perf_counter() - t0), clock.left() - SAMPLING_RESERVE_S - TRAIN_SETUP_S)
        if left < MIN_TRAIN_S:
            raise
        log(f"compiled training failed; training eager for {left / 60:.2f} min")
        cfg = replace(cfg, compile=False, max_minutes=left / 60)
        work = work_dir(out, "-train-eager")
        shutil.rmtree(work, ignore_errors=True)  # a fresh run: an earlier visit's state would be refused
        ckpt_dir, stopped = run(cfg, work, False)
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = rows[-1] if rows else {}
    steady = [r["images_per_s"] for r in rows[len(rows) // 2:]]  # the second half: compile and warm-up behind
    summary["training"] = {"config": args.config, "batch_size": cfg.batch_size, "lr": cfg.lr, "bf16": cfg.bf16,
                           "compile": cfg.compile, "steps": last.get("step"), "images_seen": last.get("images_seen"),
                           "wall_time_s": last.get("wall_time_s"), "final_loss": last.get("loss"),
                           "images_per_s_median_second_half": statistics.median(steady) if steady else None,
                           "process_seconds": round(time.perf_counter() - t0, 1)}
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(ckpt_dir / name, out / name)
    if (out / "model.safetensors").stat().st_size >= 16 * 2**20:  # the device tool brings back files under 16 MiB
        summary.setdefault("errors", {})["model.safetensors"] = "16 MiB or more: it will not come back from the device"
        log("warning: model.safetensors is 16 MiB or more and will not come back; use checkpoint_dtype float16")
    for name in ("metrics.jsonl", "loss.png"):
        if (work / name).exists():
            shutil.copy2(work / name, out / name)
    if stopped is not None:
        summary["training"]["stopped_by_signal"] = str(stopped)
    save()
    log(f"trained {last.get('step')} steps, {last.get('images_seen')} images, loss {last.get('loss')}")
    if stopped is not None:
        raise stopped
    return ckpt_dir


def _timed_run(model, ckpt, labels: torch.Tensor, settings: SamplerSettings, device: torch.device,
               autocast: bool = True) -> float:
    sync(device)
    t0 = time.perf_counter()
    sample(model, ckpt.schedule, labels, list(range(len(labels))), sampler=settings.sampler, steps=settings.steps,
           guidance=settings.guidance, eta=settings.eta, guidance_interval=settings.guidance_interval,
           spacing=settings.spacing, autocast=autocast)
    sync(device)
    return time.perf_counter() - t0


def _settings(args: argparse.Namespace) -> SamplerSettings:
    """The service's default sampler, all of it (its step spacing too), at ``--steps``."""
    return replace(DEFAULT_SETTINGS, steps=args.steps)


def _batches(args: argparse.Namespace) -> list[int]:
    return list(args.batch_sizes)


def _time_variant(name: str, model, ckpt, batch: int, args, device, summary: dict, save,
                  precision: str = "bf16") -> None:
    settings = _settings(args)
    labels = (torch.arange(batch) % len(ckpt.class_names)).to(device)
    bf16 = precision == "bf16"
    t0 = time.perf_counter()
    warm = _timed_run(model, ckpt, labels, settings, device, bf16)  # compiles each shape on a first call
    times = [_timed_run(model, ckpt, labels, settings, device, bf16) for _ in range(args.repeats)]
    med = statistics.median(times)
    summary.setdefault("sampling", []).append({
        "variant": name, "precision": precision, "batch": batch, "sampler": settings.sampler, "steps": settings.steps,
        "spacing": settings.spacing, "model_calls_per_image": model_calls(settings, ckpt.schedule),
        "images_per_s": round(batch / med, 1),
        "seconds_per_run": round(med, 4), "runs": [round(t, 4) for t in times],
        "first_run_s": round(warm, 2), "setup_s": round(time.perf_counter() - t0, 1)})
    save()
    log(f"{name:24s} batch {batch:5d}: {batch / med:9.1f} images/s (median of {len(times)}; first run {warm:.1f} s)")


def time_sampling(ckpt, args: argparse.Namespace, device: torch.device, summary: dict, save) -> None:
    """Eager rows (bf16 autocast, then fp32: what bf16 buys) and the noise draws at every batch size."""
    steps = _settings(args).steps
    for batch in _batches(args):
        stage(f"sampling eager, batch {batch}",
              lambda: _time_variant("eager", ckpt.model, ckpt, batch, args, device, summary, save), summary, save)
        stage(f"noise draws, batch {batch}", lambda: _time_noise(ckpt, batch, steps, device, summary, save),
              summary, save)
    for batch in _batches(args):
        stage(f"sampling eager fp32, batch {batch}",
              lambda: _time_variant("eager fp32", ckpt.model, ckpt, batch, args, device, summary, save, "fp32"),
              summary, save)


def _time_noise(ckpt, batch: int, steps: int, device: torch.device, summary: dict, save) -> None:
    noise = _Noise(list(range(batch)), (3, ckpt.model.config.image_size, ckpt.model.config.image_size), device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps + 1):  # initial noise plus one draw per step (the SDE sampler's most)
        noise.next()
    sync(device)
    summary.setdefault("noise_seconds_per_run", {})[str(batch)] = round(time.perf_counter() - t0, 4)
    save()


def time_compiled(ckpt, args: argparse.Namespace, device: torch.device, summary: dict, save, clock: Clock) -> None:
    """``torch.compile(mode="reduce-overhead")`` rows, smallest batch first, each only with the time it needs left."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    model = torch.compile(ckpt.model, mode="reduce-overhead", dynamic=False)
    need = COMPILE_MIN_S  # then from the last batch's measured times, scaled to the next batch
    for batch in sorted(_batches(args)):
        if clock.left() < need:
            summary.setdefault("skipped", []).append(f"compile reduce-overhead, batch {batch}: "
                                                     f"{clock.left():.0f} s left before the deadline")
            save()
            log(f"compiled batch {batch} left out: {clock.left():.0f} s to the deadline")
            continue
        stage(f"sampling compiled, batch {batch}",
              lambda: _time_variant("compile reduce-overhead", model, ckpt, batch, args, device, summary, save),
              summary, save)
        row = summary.get("sampling", [])[-1:]
        if row and row[0]["variant"] == "compile reduce-overhead" and row[0]["batch"] == batch:
            next_batches = [b for b in _batches(args) if b > batch]
            scale = min(next_batches) / batch if next_batches else 1.0
            need = max(COMPILE_MIN_S, 1.3 * row[0]["first_run_s"] + args.repeats * row[0]["seconds_per_run"] * scale)


def time_ddpm_loop(ckpt, args: argparse.Namespace, device: torch.device, summary: dict, save) -> None:
    """The report's method: 1000 unguided ancestral steps, each one model call and one ``randn_like`` on the
    device (as the report's loop draws its noise); timed over a few steps, scaled (constant cost per step).
    Our samplers draw per-image noise instead (an image does not depend on its batch): that cost is reported
    beside it, not charged to the report's loop."""
    batch = max(_batches(args))
    labels = (torch.arange(batch) % len(ckpt.class_names)).to(device)
    x = torch.randn(batch, 3, ckpt.model.config.image_size, ckpt.model.config.image_size, device=device)
    t = torch.full((batch,), 999, device=device, dtype=torch.long)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        ckpt.model(x, t, labels)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.ddpm_probe_steps):
            x = x - 0.001 * ckpt.model(x, t, labels).float() + 0.001 * torch.randn_like(x)
        sync(device)
    per_step = (time.perf_counter() - t0) / args.ddpm_probe_steps
    noise_run = summary.get("noise_seconds_per_run", {}).get(str(batch))
    summary["ddpm_1000_steps"] = {"batch": batch, "seconds_per_step": round(per_step, 5),
                                  "images_per_s_extrapolated": round(batch / (per_step * 1000), 2),
                                  "our_noise_seconds_per_step": (round(noise_run / (args.steps + 1), 5)
                                                                 if noise_run is not None else None),
                                  "probe_steps": args.ddpm_probe_steps, "precision": "bf16"}
    save()
    log(f"DDPM 1000 steps, batch {batch}: {batch / (per_step * 1000):.2f} images/s (extrapolated from "
        f"{args.ddpm_probe_steps} steps of a model call and a randn_like)")


def time_peak(ckpt, args: argparse.Namespace, device: torch.device, summary: dict, save) -> None:
    """The machine's limit: bf16 ``torch.mm`` FLOP/s at --peak-size (median of 5 after a warm-up, synchronised),
    and the FLOPs of one model call on one image (``benchmarks/sampling.py``'s count), so each sampling row gets
    its fraction of that peak."""
    n = args.peak_size
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    torch.mm(a, b)
    sync(device)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - t0)
    del a, b
    size = ckpt.model.config.image_size
    x = torch.randn(1, 3, size, size, device=device)
    t, y = torch.full((1,), 500, device=device, dtype=torch.long), torch.zeros(1, device=device, dtype=torch.long)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        flops = _sampling_script().count_flops(lambda: ckpt.model(x, t, y))
    summary["peak"] = {"bf16_matmul_flops_per_s": round(2 * n ** 3 / statistics.median(times)), "matmul_size": n,
                       "model_flops_per_call_per_image": flops}
    save()
    log(f"peak bf16 torch.mm {n}x{n}: {2 * n ** 3 / statistics.median(times) / 1e12:.1f} TFLOP/s; "
        f"{flops / 1e9:.3f} GFLOP per model call per image")


def _sampling_script():
    """benchmarks/sampling.py as a module (benchmarks/ is not a package), for its FLOP count."""
    import importlib.util

    if "benchmarks_sampling" not in sys.modules:
        spec = importlib.util.spec_from_file_location("benchmarks_sampling", Path(__file__).with_name("sampling.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["benchmarks_sampling"]


def add_fraction_of_peak(summary: dict) -> None:
    """images/s x model calls per image x FLOPs per call, over the peak: on every bf16 sampling row (with a peak;
    the fp32 rows have no fp32 peak to hold them against)."""
    peak = summary.get("peak") or {}
    if not peak.get("bf16_matmul_flops_per_s"):
        return
    for r in summary.get("sampling", []):
        if r.get("precision", "bf16") != "bf16":
            continue
        achieved = r["images_per_s"] * r["model_calls_per_image"] * peak["model_flops_per_call_per_image"]
        r["fraction_of_peak"] = round(achieved / peak["bf16_matmul_flops_per_s"], 4)


def evaluate_at_size(args: argparse.Namespace, out: Path, device: torch.device, summary: dict, save,
                     clock: Clock) -> None:
    """Stage 0: the three-arm experiment on the shipped checkpoint, its folder packed into evaluation.tar.gz.

    It stops (OutOfTime, from its progress callback) when only a short training and the sampling would fit
    before the deadline; the runs it finished are in the archive all the same, and the same command on a
    later visit, or ``dreamdata evaluate`` with the archive's runs/ in its --out, goes on from them."""
    from training.evaluate import EvaluationSettings, run_evaluation

    work = work_dir(out, "-evaluation")
    settings = EvaluationSettings(
        data=args.data, checkpoint=args.evaluate_checkpoint, classifier=args.evaluate_classifier,
        synthetic_per_class=args.evaluate_per_class, real_fraction=args.evaluate_real_fraction,
        epochs=args.evaluate_epochs, seeds=args.evaluate_seeds,
        sample_batch_size=args.evaluate_batch, device=device.type)
    log(f"evaluation: {settings.classifier}, k {settings.synthetic_per_class} per class, f {settings.real_fraction}, "
        f"{settings.epochs} epochs, seeds {list(settings.seeds)} -> {work / 'report'}")
    # seconds left when it must give way: a short training, its set-up, the sampling, and packing the archive
    stop_at = MIN_TRAIN_S + TRAIN_SETUP_S + SAMPLING_RESERVE_S + EVAL_PACK_S
    last, started, longest = [""], [time.perf_counter()], [0.0]  # longest: the longest classifier run so far

    def progress(fraction: float, message: str) -> None:
        # Stops while sampling or as a stage or classifier run begins, never inside a run (a run that trained to
        # its end is saved, and comes back) and never at the end ("done", after the report is written). A
        # classifier run starts only if one as long as the longest so far would still leave stop_at.
        new = message != last[0]
        if new:
            now = time.perf_counter()
            if last[0].startswith("training"):
                longest[0] = max(longest[0], now - started[0])
            last[0], started[0] = message, now
        need = stop_at + (longest[0] if message.startswith("training") else 0.0)
        if fraction < 1 and (new or message.startswith("sampling")) and clock.left() < need:
            raise OutOfTime(f"stopped at {fraction:.0%} ({message}): {clock.left():.0f} s left before the deadline")

    t0 = time.perf_counter()
    summary["evaluation"] = {"settings": settings.to_dict()}
    try:
        report = run_evaluation(settings, work / "report", progress=progress, show_bars=False)
    except OutOfTime as e:
        summary["evaluation"].update(stopped=str(e), seconds=round(time.perf_counter() - t0, 1))
        log(f"evaluation {e}")
        report = None
    finally:  # whatever it finished comes back, also after an error
        if (work / "report").exists():
            with tarfile.open(out / "evaluation.tar.gz", "w:gz") as tar:
                tar.add(work / "report", arcname="evaluation")
    if report is None:
        save()
        return
    seconds = round(time.perf_counter() - t0, 1)
    arms = report["arms"]
    summary["evaluation"].update({
        "seconds": seconds,
        "accuracy": {arm: {"mean": a["accuracy_mean"], "std": a["accuracy_std"], "runs": a["accuracies"]}
                     for arm, a in arms.items()},
        "delta": report["delta"]})
    save()
    log(f"evaluation done in {seconds} s: " + ", ".join(f"{arm} {a['accuracy_mean']:.2f}" for arm, a in arms.items())
        + f"; delta {report['delta']}")


def sample_grid(ckpt, out: Path, device: torch.device, steps: int) -> None:
    k = len(ckpt.class_names)
    labels = torch.arange(k, device=device).repeat_interleave(10)
    s = DEFAULT_SETTINGS
    x = sample(ckpt.model, ckpt.schedule, labels, list(range(len(labels))), sampler=s.sampler, steps=steps,
               guidance=s.guidance, guidance_interval=s.guidance_interval, spacing=s.spacing, autocast=True)
    image_grid(to_uint8(x.cpu()), nrow=10).save(out / "samples.png")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    clock = Clock(args.deadline_s, STARTED if __name__ == "__main__" else None)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = default_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes throughout
    summary: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "environment": environment(device),
                     "deadline_s": args.deadline_s}

    def save() -> None:  # replaced whole: a kill mid-write leaves the previous session.json
        tmp = out / ".session.json.tmp"  # exists for the moment of a write only (it would be a 9th file)
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, out / "session.json")

    save()
    log(f"on {summary['environment'].get('gpu', device.type)}, torch {torch.__version__}")
    if args.evaluate_per_class > 0:
        stage("evaluation", lambda: evaluate_at_size(args, out, device, summary, save, clock), summary, save)

    ckpt_dir = Path(args.skip_train) if args.skip_train else None
    if ckpt_dir is None:
        minutes = args.train_minutes
        fits = (clock.left() - SAMPLING_RESERVE_S - TRAIN_SETUP_S) / 60
        if fits < minutes:  # shortened to fit the deadline; too short to be worth it, left out
            minutes = fits if fits * 60 >= MIN_TRAIN_S else 0.0
        if minutes > 0:
            ckpt_dir = stage("training", lambda: train_checkpoint(args, out, summary, save, minutes, clock), summary,
                             save)
        else:
            summary["training"] = {"skipped": f"{clock.left():.0f} s left before the deadline"}
            log("training left out: too little time before the deadline")
    if ckpt_dir is None:  # no training, or it failed: time the sampling of the shipped model instead
        ckpt_dir = Path(args.evaluate_checkpoint) if args.evaluate_checkpoint else default_checkpoint()
        log(f"timing the sampling of {ckpt_dir}")
    ckpt = stage("loading the checkpoint", lambda: load_for_sampling(ckpt_dir, device=device, precision="bf16"),
                 summary, save)
    if ckpt is not None:
        summary["checkpoint"] = {"dir": str(ckpt_dir), "sha256": ckpt.sha256}
        save()
        stage("samples.png", lambda: sample_grid(ckpt, out, device, args.steps), summary, save)
        if (out / "samples.png").exists():
            log("samples.png written")
        time_sampling(ckpt, args, device, summary, save)
        stage("DDPM probe", lambda: time_ddpm_loop(ckpt, args, device, summary, save), summary, save)
        stage("peak and FLOPs", lambda: time_peak(ckpt, args, device, summary, save), summary, save)
        if not args.no_compile:
            time_compiled(ckpt, args, device, summary, save, clock)
    add_fraction_of_peak(summary)
    summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    summary["seconds"] = round(time.perf_counter() - clock.t0, 1)
    save()
    print(f"\n{'variant':24s} {'prec':>5s} {'batch':>6s} {'images/s':>10s} {'s/run':>8s} {'first run s':>12s} "
          f"{'of peak':>8s}")
    for r in summary.get("sampling", []):
        frac = f"{r['fraction_of_peak']:.1%}" if "fraction_of_peak" in r else "-"
        print(f"{r['variant']:24s} {r['precision']:>5s} {r['batch']:6d} {r['images_per_s']:10.1f} {r['seconds_per_run']:8.3f} "
              f"{r['first_run_s']:12.1f} {frac:>8s}")
    print(json.dumps({k: summary[k] for k in ("training", "ddpm_1000_steps", "peak", "noise_seconds_per_run",
                                              "errors", "skipped") if k in summary}, indent=1))
    return summary


if __name__ == "__main__":
    main()
