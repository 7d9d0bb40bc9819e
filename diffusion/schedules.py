"""Named beta schedules and the forward process q(x_t | x_0).

Schedules are computed in float64 and cast on use. Named schedules may be added but a
shipped name never changes meaning (checkpoints refer to them by name).

- ``linear``: Ho et al. 2020, beta_1 = 1e-4 ... beta_T = 0.02, T = 1000 (scaled by 1000/T for other T,
  clipped at 0.999).
- ``cosine``: Nichol & Dhariwal 2021, abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), s = 0.008,
  betas clipped at 0.999.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

ScheduleName = Literal["linear", "cosine"]
SCHEDULES: tuple[str, ...] = ("linear", "cosine")


@dataclass(frozen=True)
class ScheduleConfig:
    name: ScheduleName = "linear"
    timesteps: int = 1000  # T

    def to_dict(self) -> dict:
        return asdict(self)


def make_betas(name: str, timesteps: int) -> torch.Tensor:
    """betas: [T] float64, index t-1 holds beta_t."""
    if not isinstance(timesteps, int) or timesteps < 1:
        raise ValueError(f"a schedule needs at least 1 timestep, got {timesteps!r}")
    if name == "linear":
        # Scaled so T=1000 gives exactly Ho et al.'s 1e-4 .. 0.02 (improved-diffusion convention).  Clipped at
        # 0.999 as cosine is: only T <= 20 reaches it (beta_T = 20/T), where a beta of 1 or more made abar_T
        # zero or negative and the noise levels NaN.
        scale = 1000.0 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64).clamp(max=0.999)
    if name == "cosine":
        s = 0.008
        t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        betas = 1 - abar[1:] / abar[:-1]
        return betas.clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {name!r}; expected one of {', '.join(SCHEDULES)}")


class NoiseSchedule:
    """The schedule arithmetic of a discrete-time DDPM (all tensors float64, [T]).

    Index i = 0..T-1 is the model's timestep input and stands for t = i + 1 in the paper:
    ``alphas_cumprod[i]`` is abar_{i+1}.
    """

    def __init__(self, config: ScheduleConfig):
        self.config = config
        self.num_timesteps = config.timesteps
        self.betas = make_betas(config.name, config.timesteps)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = abar_t / (1 - abar_t), float64."""
        abar = self.alphas_cumprod[t.cpu()]
        return abar / (1 - abar)

    def _alphas_cumprod_on(self, device: torch.device) -> torch.Tensor:
        """``alphas_cumprod`` on ``device``, copied there once (q_sample runs at every training step)."""
        if device not in self._on_device:
            self._on_device[device] = self.alphas_cumprod.to(device)
        return self._on_device[device]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.   x0, noise: [N, C, H, W]; t: [N] long."""
        abar = self._alphas_cumprod_on(x0.device)[t].to(x0.dtype).view(-1, 1, 1, 1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise
