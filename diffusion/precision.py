"""Which arithmetic the model calls of sampling use: fp32, or bf16 autocast, and the CPU weight layout.

bf16 autocast is the obvious choice on a GPU.  On a CPU it depends on the chip: on one 2-core Xeon
(AVX512-BF16) the UNet ran 0.7-0.8x as fast in bf16 as in fp32; on a 2-core AMD EPYC (also AVX512-BF16)
2.0x as fast; on a 2-core AMD EPYC with AVX2 only (Zen 3, no bf16 instructions) 0.02-0.10x.  So ``auto``
(the default everywhere) measures: on a CPU it times one forward pass of the model at a small batch in
each precision and layout and keeps the fastest (a layout only with a margin, below), and bf16 only if it
is at least ``BF16_MARGIN`` times as fast as fp32 (a small gain is not worth images that differ from fp32
ones).  On a CPU that torch says has no bf16 instructions (neither AVX512-BF16 nor AMX) it does not time
bf16 at all: there one bf16 probe pass of the default model took 43 s against 0.7-1.3 s in fp32, and
timing it made a worker's start take four minutes.  A variant whose warm-up pass is ``SLOW_FACTOR`` times
slower than the best variant timed so far is not timed again (its warm-up time stands for it).  ``fp32``
and ``bf16`` force the choice; ``DREAMDATA_PRECISION`` sets the default.

The layout changes the images too: the two layouts run different convolution kernels, which round
differently, and the stochastic sampler carries the difference on (bf16, the default sampler, ten images on
the AMX Xeon: 64% of the 8-bit values differ between NCHW and channels_last, by 0.96 levels on average).
Where the two layouts tie, as they do on the AMX Xeon at the probe's batch, timing noise flipped the pick
from one load to the next, and with it the images of a seed.  So ``auto`` keeps the layout that forcing
the same precision uses (``FORCED_CHANNELS_LAST``: what was measured faster on the CPUs it was measured
on) unless the other is at least ``LAYOUT_MARGIN`` times as fast, and then ``auto`` gives the images of
``--precision fp32|bf16`` wherever the layouts are close.

The choice changes the images a seed gives (bf16 rounds the model's output), so it is recorded in
every PNG's metadata and manifest, and synthetic-set caches are keyed by it.  The sampler's own
arithmetic stays fp32 either way (``diffusion.samplers.guided_eps`` casts the model output back).
"""
from __future__ import annotations

import contextlib
import logging
import statistics
import time
from dataclasses import dataclass

import torch

from .spec import requested_precision  # the names without torch live in spec, for the API

log = logging.getLogger(__name__)

BF16_MARGIN = 1.2   # auto picks bf16 on a CPU only if it is at least this much faster than fp32
PROBE_BATCH = 32    # images per timed forward pass
PROBE_REPEATS = 3   # timed passes per variant (median), after one warm-up pass
SLOW_FACTOR = 10.0  # a variant whose warm-up pass is this much slower than the best median so far is not timed further
LAYOUT_MARGIN = 1.1  # auto leaves a precision's forced layout only for one at least this much faster
# The layout forced with each precision (keyed by bf16): fp32 channels_last was measured faster on the Xeon and
# both EPYCs, bf16 NCHW on the EPYC (docs/results.md, "Precision").
FORCED_CHANNELS_LAST = {False: True, True: False}

# Images per sampling batch where a caller does not say: on the 2-core AVX2 EPYC the default sampler took
# 0.97-1.06 s per image at batch 100 against 0.77-0.92 at 25 and 50 (three runs of interleaved rounds,
# benchmarks/sampling_batch.py; guided steps run twice the rows, and batch 100's activations outgrow the
# caches); a GPU wants large batches (the Docker worker's 256).
CPU_SAMPLING_BATCH = 50
GPU_SAMPLING_BATCH = 256


def default_device() -> torch.device:
    """Where the service, the CLIs' ``--device auto`` and the benchmarks run the model: the first CUDA GPU
    when torch sees one, else the CPU (one rule, so a worker and a CLI never disagree)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sampling_batch(device: torch.device | str) -> int:
    """The default images per sampling batch on ``device``."""
    return GPU_SAMPLING_BATCH if torch.device(device).type == "cuda" else CPU_SAMPLING_BATCH


@dataclass(frozen=True)
class PrecisionChoice:
    bf16: bool                   # bf16 autocast around the model calls
    channels_last: bool          # weights (and so activations) in channels_last (CPU)
    reason: str                  # one line for logs and reports
    timings: dict | None = None  # auto on a CPU: seconds per probe forward of each variant, by variant name

    @property
    def name(self) -> str:
        return _name(self.bf16)

    @property
    def layout(self) -> str:
        return _layout(self.channels_last)


def _name(bf16: bool) -> str:
    return "bf16" if bf16 else "fp32"


def _layout(channels_last: bool) -> str:
    return "channels_last" if channels_last else "NCHW"


def cpu_has_bf16() -> bool | None:
    """Whether torch sees bf16 instructions on this CPU (AVX512-BF16 or AMX); None when it cannot tell."""
    checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [c for c in checks if callable(c)]
    if not checks:
        return None
    try:
        return any(bool(c()) for c in checks)
    except Exception:  # a private torch API: any failure means "cannot tell", and auto times bf16
        return None


def benchmark_precisions(arg: str | None) -> tuple[list[str], str | None]:
    """The precisions a benchmark times, in the order fp32, bf16: those of ``arg`` (comma-separated), or by
    default both, but fp32 alone on a CPU without bf16 instructions (there each bf16 row would take ten to
    fifty times as long).  Also the line to print when bf16 is left out (else None).  A bad ``arg`` is a
    ValueError."""
    if arg is None:
        chosen = ["fp32", "bf16"] if cpu_has_bf16() is not False else ["fp32"]
    else:
        chosen = [p.strip() for p in arg.split(",") if p.strip()]
        if not chosen or set(chosen) - {"fp32", "bf16"}:
            raise ValueError(f"--precisions: a comma-separated list of fp32 and bf16, not {arg!r}")
    chosen = [p for p in ("fp32", "bf16") if p in chosen]
    if "bf16" in chosen:
        return chosen, None
    return chosen, "bf16 rows left out: " + ("this CPU has no bf16 instructions (--precisions fp32,bf16 times them "
                                             "anyway)" if arg is None else f"--precisions {arg}")


def gpu_has_bf16(device: torch.device | str) -> bool:
    """Whether a CUDA GPU computes bf16 natively (compute capability 8.0 or newer: Ampere, Hopper, ...).  Older
    ones (V100, T4) emulate it, slower than fp32, though ``torch.cuda.is_bf16_supported()`` says yes."""
    return torch.cuda.get_device_capability(torch.device(device))[0] >= 8


def _time_forward(model: torch.nn.Module, bf16: bool, channels_last: bool, device: torch.device,
                  give_up_after: float = float("inf")) -> float:
    """Median seconds of ``PROBE_REPEATS`` forward passes after a warm-up one; the warm-up's seconds alone
    when it took longer than ``give_up_after`` (a variant far slower than another is not worth timing)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    cfg = model.config
    x = torch.randn(PROBE_BATCH, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    x = x.contiguous(memory_format=fmt)
    t = torch.randint(0, 1000, (PROBE_BATCH,), device=device)
    y = torch.randint(0, max(1, cfg.num_classes), (PROBE_BATCH,), device=device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times = []
    with torch.inference_mode(), ctx:
        t0 = time.perf_counter()
        model(x, t, y)
        warm_up = time.perf_counter() - t0
        if warm_up > give_up_after:
            return warm_up
        for _ in range(PROBE_REPEATS):
            t0 = time.perf_counter()
            model(x, t, y)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


_AUTO_CACHE: dict[tuple, PrecisionChoice] = {}


def choose_precision(model: torch.nn.Module, precision: str | None = None) -> PrecisionChoice:
    """Decide (and apply: the weight layout) the precision of ``model``'s sampling calls.

    ``precision``: auto, fp32 or bf16 (None: ``$DREAMDATA_PRECISION`` or auto).  On a CPU the weights
    end in the layout chosen; ``auto`` on a CPU times the four variants, or the two fp32 ones where the
    CPU has no bf16 instructions (8.7 s for the default model on 2 AVX512-BF16 EPYC cores, load included;
    the result is cached per architecture and thread count for the process).
    """
    p = requested_precision(precision)
    device = next(model.parameters()).device
    if device.type != "cpu":
        bf16 = p == "bf16" or (p == "auto" and (device.type != "cuda" or gpu_has_bf16(device)))
        why = p if bf16 or p == "fp32" else "auto: this GPU has no native bf16"
        return PrecisionChoice(bf16, False, f"{'bf16 autocast' if bf16 else 'fp32'} on {device.type} ({why})")
    if p != "auto":
        choice = PrecisionChoice(p == "bf16", FORCED_CHANNELS_LAST[p == "bf16"], f"{p} (requested)")
    else:
        key = (repr(model.config), torch.get_num_threads())
        if key not in _AUTO_CACHE:
            _AUTO_CACHE[key] = _measure_auto(model, device)
        choice = _AUTO_CACHE[key]
    model.to(memory_format=torch.channels_last if choice.channels_last else torch.contiguous_format)
    return choice


def _measure_auto(model: torch.nn.Module, device: torch.device) -> PrecisionChoice:
    """Time the variants; the faster precision, bf16 only with the margin and only on a CPU with bf16
    instructions (or one torch cannot tell about); in it the forced layout unless the other has the layout
    margin."""
    time_bf16 = cpu_has_bf16() is not False
    seconds: dict[tuple[bool, bool], float] = {}
    for b in (False, True) if time_bf16 else (False,):
        for cl in (False, True):
            best = min(seconds.values(), default=float("inf"))
            seconds[(b, cl)] = _time_forward(model, b, cl, device, give_up_after=SLOW_FACTOR * best)
    fp32 = min(t for (b, _), t in seconds.items() if not b)  # each precision at its faster layout
    if time_bf16:
        bf16 = min(t for (b, _), t in seconds.items() if b)
        use_bf16 = bf16 * BF16_MARGIN <= fp32
        why = (f"bf16 {fp32 / bf16:.2f}x the speed of fp32 in a timed batch-{PROBE_BATCH} forward; "
               f"bf16 needs {BF16_MARGIN}x")
    else:
        use_bf16 = False
        why = (f"no bf16 instructions (torch sees {torch.backends.cpu.get_cpu_capability()}), bf16 not timed; "
               f"layouts timed in a batch-{PROBE_BATCH} forward")
    forced = FORCED_CHANNELS_LAST[use_bf16]
    other = seconds[(use_bf16, not forced)]
    channels_last = (not forced) if other * LAYOUT_MARGIN <= seconds[(use_bf16, forced)] else forced
    reason = f"auto: {_name(use_bf16)} {_layout(channels_last)} on this CPU ({why})"
    timings = {f"{_name(b)} {_layout(cl)}": round(t, 4) for (b, cl), t in seconds.items()}
    log.info("precision %s; timings %s", reason, timings)
    return PrecisionChoice(use_bf16, channels_last, reason, timings)


def compile_for_sampling(model: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """``torch.compile(model, mode=mode, dynamic=False)`` for sampling; on a CPU with inductor's freezing on.

    Freezing folds the weights into the compiled graph as constants and prepacks the convolution weights
    for oneDNN once (fusing each convolution with its activation), instead of at every call. On the 2-core
    AVX2 EPYC in fp32 the compiled default sampler ran 1.09x as fast as eager with it, each in a process of
    its own (three rounds, 0.98-1.14x; ``benchmarks/compile_ab.py``; 1.16x in one shared process,
    ``benchmarks/sampling_ab.py --compile``), where a compile without it had run 0.94x eager (one run of
    ``benchmarks/sampling.py``). Dynamo reads the setting when it traces, on the model's first
    call of each shape, so it cannot be a per-model option: it is set process-wide, for every later compile
    in this process. It changes only graphs run without autograd (the samplers run under
    ``torch.inference_mode``; training compiles with gradients on and is unaffected), and a frozen model does
    not see later changes to its weights: call this in processes that compile only for sampling (the
    worker, the evaluate CLI, the benchmarks). Compilation is lazy: each new input shape compiles on its first
    call."""
    if next(model.parameters()).device.type == "cpu":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    return torch.compile(model, mode=mode, dynamic=False)
