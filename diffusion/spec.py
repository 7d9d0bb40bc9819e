"""Sampler names, step ranges and defaults: plain Python, no torch.

The service validates requests against these at the edge (``app`` never imports torch); the
samplers in :mod:`diffusion.samplers` import them back, so there is one definition.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from dataclasses import dataclass
from typing import Literal, Sequence, get_args

# ddpm: ancestral (Ho et al.); ddim: DDIM (Song et al.; eta > 0 adds noise); dpmpp: DPM-Solver++(2M),
# deterministic; dpmpp_sde: its stochastic variant, SDE-DPM-Solver++(2M) (Lu et al. 2022).
SamplerName = Literal["ddpm", "ddim", "dpmpp", "dpmpp_sde"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
SAMPLER_LIST = ", ".join(SAMPLERS[:-1]) + " or " + SAMPLERS[-1]  # for help texts: "ddpm, ddim, dpmpp or dpmpp_sde"
# Allowed step counts per sampler (inclusive); the service validates against these.
STEP_RANGES: dict[str, tuple[int, int]] = {"ddpm": (1, 1000), "ddim": (1, 1000), "dpmpp": (1, 100),
                                           "dpmpp_sde": (1, 100)}
GUIDANCE_RANGE: tuple[float, float] = (0.0, 20.0)  # classifier-free guidance scale w
# The checkpoint that ships in the repo (the default of `dreamdata sample`, the worker and the API).
SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "cifar10"
MAX_SEED = 2**31 - 1                                 # a base seed is in 0..MAX_SEED


@dataclass(frozen=True)
class SamplerSettings:
    sampler: SamplerName = "dpmpp"
    steps: int = 20
    guidance: float = 1.0  # w in eps = eps_u + w (eps_c - eps_u); 1 = conditional only, 0 = unconditional
    eta: float = 0.0       # DDIM only: 0 = deterministic, 1 = DDPM-like noise

    @property
    def model_calls(self) -> int:
        """Model evaluations per image: one per step, two with guidance (w not 0 or 1), which
        ``diffusion.samplers.guided_eps`` makes as one call of twice the batch."""
        return self.steps * (1 if self.guidance in (0.0, 1.0) else 2)

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


# What ``dreamdata sample`` and the service use when a request leaves a setting out.
DEFAULT_SETTINGS = SamplerSettings(sampler="dpmpp_sde", steps=20, guidance=4.0)


def request_defaults() -> dict:
    """The defaults as a request spells them (GET /models, the API examples)."""
    return {"sampler": DEFAULT_SETTINGS.sampler, "steps": DEFAULT_SETTINGS.steps, "guidance": DEFAULT_SETTINGS.guidance}


def resolve_class(spec: str | int, class_names: Sequence[str]) -> int:
    """A class name (any case) or an index 0..K-1 -> index.  Raises ValueError listing the valid ones."""
    s = str(spec).strip()
    lower = [c.lower() for c in class_names]
    if s.lower() in lower:
        return lower.index(s.lower())
    if s.isdigit() and int(s) < len(class_names):
        return int(s)
    raise ValueError(f"unknown class {spec!r}; valid: {', '.join(class_names)} or 0-{len(class_names) - 1}")


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
