"""Sampler names, step ranges and defaults: plain Python, no torch.

The service validates requests against these at the edge (``app`` never imports torch); the
samplers in :mod:`diffusion.samplers` import them back, so there is one definition.
"""
from __future__ import annotations

import math
import os
import random
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Literal, Sequence, get_args

# ddpm: ancestral (Ho et al.); ddim: DDIM (Song et al.; eta > 0 adds noise); dpmpp: DPM-Solver++(2M),
# deterministic; dpmpp_sde: its stochastic variant, SDE-DPM-Solver++(2M) (Lu et al. 2022).
SamplerName = Literal["ddpm", "ddim", "dpmpp", "dpmpp_sde"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
SAMPLER_LIST = ", ".join(SAMPLERS[:-1]) + " or " + SAMPLERS[-1]  # for help texts: "ddpm, ddim, dpmpp or dpmpp_sde"
# Allowed step counts per sampler (inclusive); the service validates against these.
STEP_RANGES: dict[str, tuple[int, int]] = {"ddpm": (1, 1000), "ddim": (1, 1000), "dpmpp": (1, 100),
                                           "dpmpp_sde": (1, 100)}
GUIDANCE_RANGE: tuple[float, float] = (0.0, 20.0)  # classifier-free guidance scale w
# Guidance interval (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval"): guide only at the
# steps whose noise level sigma_t = sqrt((1 - abar_t) / abar_t) lies in (lo, hi]; elsewhere one conditional
# call. sigma_t is the noise-to-signal ratio of x_t, so an interval names the same noise levels whatever the
# schedule (the shipped linear schedule runs from sigma 157 at t=999 down to 0.01 at t=0).
# None: every step (classic classifier-free guidance).
GuidanceInterval = tuple[float, float]
GUIDANCE_INTERVAL_ALL = "all"  # how a request spells None
# Where the sampler's steps fall (``diffusion.samplers.step_timesteps``): "time", evenly spaced in the timestep
# index (as in DDIM; the only spacing until 2026-12-03, the default until 2026-12-04); "logsnr" (the default),
# evenly spaced in lambda_t = log(alpha_t / sigma_t) = -log(sigma_t), which Lu et al. (2022) recommend for
# DPM-Solver at low resolution: on the shipped linear schedule it moves steps from the noisiest end to low noise
# (docs/results.md "Steps evenly spaced in logSNR").
Spacing = Literal["time", "logsnr"]
SPACINGS: tuple[str, ...] = get_args(Spacing)


def installed_checkpoint() -> Path | None:
    """Where an installed wheel's data files (pyproject.toml's data-files) put the shipped checkpoint, read off the
    distribution's file list: the place depends on how it was installed (a venv's prefix, ``--user``'s base,
    /usr/local under a system pip), so it is not derived from ``sys.prefix``. None when no wheel holds it."""
    from importlib import metadata

    try:
        files = metadata.files("dreamdata") or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.as_posix().endswith("share/dreamdata/checkpoints/cifar10/config.json"):
            return Path(f.locate()).resolve().parent
    return None


def shipped_checkpoint(source: Path = Path(__file__).resolve().parents[1],
                       installed: Callable[[], Path | None] = installed_checkpoint) -> Path:
    """The checkpoint that ships with dreamdata (the default of `dreamdata sample`, the worker and the API):
    ``checkpoints/cifar10`` beside the source in a checkout or an editable install; else the one an installed wheel
    carries (:func:`installed_checkpoint`); the first when neither exists (its absence is then reported)."""
    beside = source / "checkpoints" / "cifar10"
    if (beside / "config.json").is_file():
        return beside
    found = installed()
    return found if found is not None and (found / "config.json").is_file() else beside


SHIPPED_CHECKPOINT = shipped_checkpoint()
MAX_SEED = 2**31 - 1                                 # a base seed is in 0..MAX_SEED


def is_guided(guidance: float) -> bool:
    """Whether guidance weight w makes any step take the second, unconditional, model call (w not 0 or 1)."""
    return guidance not in (0.0, 1.0)


def effective_interval(guidance: float, interval: Sequence[float] | None) -> tuple[float, ...] | None:
    """``interval`` as a tuple, or None at w 0 or 1, which make one model call per step: at w 1 (conditional) an
    interval changes nothing; at w 0 it is dropped too, so that guidance 0 means unconditional at every step
    whatever interval comes with it (a request's default one included), and it is not recorded as if it
    applied. It is still checked: a malformed one is refused either way."""
    if interval is None:
        return None
    interval = tuple(float(v) for v in interval)
    if not is_guided(guidance):
        check_guidance_interval(interval)
        return None
    return interval


@dataclass(frozen=True)
class SamplerSettings:
    sampler: SamplerName = "dpmpp"
    steps: int = 20
    guidance: float = 1.0  # w in eps = eps_u + w (eps_c - eps_u); 1 = conditional only, 0 = unconditional
    eta: float = 0.0       # DDIM only: 0 = deterministic, 1 = DDPM-like noise
    guidance_interval: GuidanceInterval | None = None  # (lo, hi]: guide only where lo < sigma_t <= hi
    spacing: Spacing = "time"  # where the steps fall (SPACINGS above)

    def __post_init__(self):
        # one spelling of each number (guidance 6 and 6.0 are one setting: one cache key, one run key; + 0.0
        # turns -0.0 into 0.0)
        object.__setattr__(self, "guidance", float(self.guidance) + 0.0)
        object.__setattr__(self, "eta", float(self.eta) + 0.0)
        # a JSON list -> a tuple of floats (hashable, one spelling); none when unguided
        object.__setattr__(self, "guidance_interval", effective_interval(self.guidance, self.guidance_interval))

    @property
    def guided(self) -> bool:
        """Whether any step makes the second, unconditional, model call (w not 0 or 1)."""
        return is_guided(self.guidance)

    def guides_at(self, sigma: float) -> bool:
        """Whether the step at noise level ``sigma`` (see GuidanceInterval above) is guided."""
        if not self.guided:
            return False
        return self.guidance_interval is None or self.guidance_interval[0] < sigma <= self.guidance_interval[1]

    def model_calls(self, sigmas: Sequence[float] | None = None) -> int:
        """Model evaluations per image: one per step, two at a guided step, which
        ``diffusion.samplers.guided_eps`` makes as one call of twice the batch.  ``sigmas``: the noise
        levels of the steps (``diffusion.samplers.step_sigmas``); needed only with a guidance interval."""
        if self.guidance_interval is None or not self.guided:
            return self.steps * (2 if self.guided else 1)
        if sigmas is None or len(sigmas) != self.steps:
            raise ValueError(f"model_calls with a guidance interval needs the {self.steps} steps' noise levels")
        return self.steps + sum(self.guides_at(s) for s in sigmas)

    def validate(self, num_timesteps: int = 1000) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {', '.join(SAMPLERS)}")
        lo, hi = STEP_RANGES[self.sampler]
        hi = min(hi, num_timesteps)
        if not lo <= self.steps <= hi:
            raise ValueError(f"steps={self.steps} out of range for {self.sampler}: {lo}..{hi}")
        g_lo, g_hi = GUIDANCE_RANGE
        if not g_lo <= self.guidance <= g_hi:
            raise ValueError(f"guidance={self.guidance} out of range {g_lo:g}..{g_hi:g}")
        check_eta(self.eta, self.sampler)
        if self.guidance_interval is not None:
            check_guidance_interval(self.guidance_interval)
        check_spacing(self.spacing)


def check_spacing(spacing: str) -> None:
    """ValueError unless ``spacing`` is one of ``SPACINGS``."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")


def check_eta(eta: float, sampler: str | None = None) -> None:
    """DDIM's eta must be in 0..1 (0 deterministic, 1 DDPM-like): below 0 it shrinks the noise prediction's
    term without adding noise, above 1 its variance outgrows the step; and with ``sampler`` given, not 0 only
    for ddim (the others ignore it: refused, not a silently equal run).  ValueError otherwise."""
    if not 0 <= eta <= 1:  # NaN too
        raise ValueError(f"eta={eta} out of range 0..1")
    if eta and sampler is not None and sampler != "ddim":
        raise ValueError(f"eta={eta:g} applies to the ddim sampler only, not {sampler}")


def check_guidance_interval(interval: Sequence[float]) -> GuidanceInterval:
    """(lo, hi) with 0 <= lo < hi, both finite -> a tuple of floats; else ValueError saying why."""
    if len(interval) != 2:
        raise ValueError(f"guidance interval needs two noise levels lo,hi; got {len(interval)}")
    lo, hi = (float(v) for v in interval)
    if not (math.isfinite(lo) and math.isfinite(hi)) or not 0 <= lo < hi:
        raise ValueError(f"guidance interval must satisfy 0 <= lo < hi (finite), got ({lo:g}, {hi:g})")
    return lo, hi


def parse_guidance_interval(value: str | Sequence[float] | None) -> GuidanceInterval | None:
    """``"0.28,2.9"`` or ``[0.28, 2.9]`` -> (0.28, 2.9); ``"all"`` or None -> None (every step).
    Raises ValueError saying what is wrong."""
    if value is None or (isinstance(value, str) and value.strip().lower() == GUIDANCE_INTERVAL_ALL):
        return None
    try:
        if not isinstance(value, (str, list, tuple)):  # a dict or set would give its keys
            raise TypeError
        numbers = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int too big for a float
        raise ValueError(f"guidance interval must be two numbers, 'lo,hi' or [lo, hi], or "
                         f"'{GUIDANCE_INTERVAL_ALL}'; got {value!r}") from None
    return check_guidance_interval(numbers)


def format_guidance_interval(interval: GuidanceInterval | None) -> str:
    """The inverse of :func:`parse_guidance_interval`: ``"0.28,2.9"`` or ``"all"``."""
    def num(v: float) -> str:  # short, and exact: parse(format(x)) == x
        return f"{v:g}" if float(f"{v:g}") == v else repr(float(v))
    return GUIDANCE_INTERVAL_ALL if interval is None else f"{num(interval[0])},{num(interval[1])}"


# What ``dreamdata sample`` and the service use when a request leaves a setting out: SDE-DPM-Solver++(2M),
# 20 steps evenly spaced in logSNR, guidance 8 at the 5 steps with 0.28 < sigma_t <= 4 only, 25 model calls per
# image (the default since 2026-12-04; before it, the same sampler with time-spaced steps and guidance 6: 29 calls).
# On 1,000 images it cannot be told from DDPM ancestral at 1000 steps (the report's method, 1,445 calls with this
# guidance interval): FD -3.0% [-12.1%, +6.2%], class fidelity +1.3 points [-1.4, +4.1]; the time-spaced default
# had +22% [+11%, +33%] FD. README "Which sampler", docs/results.md "Steps evenly spaced in logSNR" and
# benchmarks/README.md have the numbers.
DEFAULT_SETTINGS = SamplerSettings(sampler="dpmpp_sde", steps=20, guidance=8.0, guidance_interval=(0.28, 4.0),
                                   spacing="logsnr")


def request_defaults() -> dict:
    """The defaults as a request spells them (GET /models, the API examples)."""
    return {"sampler": DEFAULT_SETTINGS.sampler, "steps": DEFAULT_SETTINGS.steps, "guidance": DEFAULT_SETTINGS.guidance,
            "guidance_interval": format_guidance_interval(DEFAULT_SETTINGS.guidance_interval),
            "spacing": DEFAULT_SETTINGS.spacing}


def resolve_class(spec: str | int, class_names: Sequence[str]) -> int:
    """A class name (any case) or an index 0..K-1 -> index.  Raises ValueError listing the valid ones."""
    s = str(spec).strip()
    lower = [c.lower() for c in class_names]
    if s.lower() in lower:
        return lower.index(s.lower())
    if s.isascii() and s.isdigit() and int(s) < len(class_names):  # not '²' or '٣'
        return int(s)
    raise ValueError(f"unknown class {spec!r}; valid: {', '.join(class_names)} or 0-{len(class_names) - 1}")


def check_seed(name: str, value: int) -> None:
    """ValueError unless ``value`` is a base seed the service takes too (0..MAX_SEED), so that what a CLI made
    can be made again through the API (and torch's generators take it: they refuse 2**64 and alias negatives)."""
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be in 0..{MAX_SEED}, got {value}")


def draw_seed() -> int:
    """A random base seed for a request that gave none (recorded with the results)."""
    return random.SystemRandom().randrange(0, MAX_SEED // 2)


# Precision of the model calls of sampling (diffusion.precision decides "auto"; here without torch)
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
PRECISION_ENV = "DREAMDATA_PRECISION"


def requested_precision(value: str | None = None) -> str:
    """``value``, else ``$DREAMDATA_PRECISION``, else ``auto``; an unknown name is a ValueError."""
    p = (value or os.environ.get(PRECISION_ENV) or "auto").strip().lower()
    if p not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {p!r}")
    return p
