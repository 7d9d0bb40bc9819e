"""Reverse-process samplers with one contract.

Every sampler takes ``(model, schedule, labels, seeds, steps, guidance)`` and returns images
``[N, C, H, W]`` float32 in [-1, 1] (clamped). ``model(x, t, y) -> eps`` is any callable that
predicts the noise (a :class:`~diffusion.unet.UNet`, or a closed-form predictor in tests).

Noise comes from one ``torch.Generator`` per image seed, consumed in the same order whatever
the batch: an image depends only on (model, class, seed, sampler, steps, guidance, guidance interval,
spacing), never on the other images it was sampled with. Samplers hold no state between calls.

Timestep index i in [0, T) stands for the paper's t = i + 1 (see ``schedules.NoiseSchedule``).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Sequence

import torch

from .schedules import NoiseSchedule
from .spec import (SAMPLERS, SPACINGS, STEP_RANGES, GuidanceInterval, SamplerName, SamplerSettings,  # noqa: F401
                   Spacing, check_spacing)  # (re-exported)

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ProgressFn = Callable[[int, int], None]  # (steps done, total steps); may raise to cancel


def timesteps_for(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` timestep indices, evenly spaced from T-1 down to 0 (both included)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    return [round(num_timesteps - 1 - i * (num_timesteps - 1) / (steps - 1)) for i in range(steps)]


def logsnr_timesteps(schedule: NoiseSchedule, steps: int) -> list[int]:
    """``steps`` timestep indices from T-1 down to 0, each the nearest to an even grid in lambda_t =
    log(alpha_t / sigma_t) between its values at T-1 and 0, made strictly decreasing (at low noise lambda
    changes fast per index, and neighbours can round to one index; the last index stays 0)."""
    T = schedule.num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    if steps == 1:
        return [T - 1]
    abar = schedule.alphas_cumprod.double()
    lam = 0.5 * torch.log(abar / (1 - abar))
    grid = torch.linspace(float(lam[T - 1]), float(lam[0]), steps, dtype=torch.float64)
    out: list[int] = []
    for i, v in enumerate(grid):
        t = int(torch.argmin((lam - v).abs()))
        if out:
            t = min(t, out[-1] - 1)
        out.append(max(t, steps - 1 - i))  # room for the steps still to come
    return out


def step_timesteps(schedule: NoiseSchedule, steps: int, spacing: Spacing = "time") -> list[int]:
    """The timestep index of each of the ``steps`` sampler steps, noisiest first: evenly spaced in the index
    (``time``, :func:`timesteps_for`) or in logSNR (``logsnr``, :func:`logsnr_timesteps`)."""
    check_spacing(spacing)
    if spacing == "logsnr":
        return logsnr_timesteps(schedule, steps)
    return timesteps_for(schedule.num_timesteps, steps)


def sigma_at(schedule: NoiseSchedule, t: int) -> float:
    """Noise level of index t: sigma_t = sqrt((1 - abar_t) / abar_t) (what a guidance interval bounds)."""
    abar = float(schedule.alphas_cumprod[t])
    return math.sqrt((1 - abar) / abar)


def step_sigmas(schedule: NoiseSchedule, steps: int, spacing: Spacing = "time") -> list[float]:
    """The noise level of each of the ``steps`` sampler steps, first (noisiest) to last."""
    return [sigma_at(schedule, t) for t in step_timesteps(schedule, steps, spacing)]


def model_calls(settings: SamplerSettings, schedule: NoiseSchedule) -> int:
    """Model evaluations per image of ``settings`` on ``schedule`` (see ``SamplerSettings.model_calls``)."""
    return settings.model_calls(step_sigmas(schedule, settings.steps, settings.spacing))


class _Noise:
    """Per-image generators: ``next()`` draws one standard normal tensor per image."""

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...], device: torch.device):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape, self.device = shape, device

    def next(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.gens]).to(self.device)


def guided_eps(model: ModelFn, x: torch.Tensor, t: int, labels: torch.Tensor, guidance: float,
               null_class: int | None, autocast: bool = False) -> torch.Tensor:
    """Classifier-free guidance, one batched model call: eps_u + w (eps_c - eps_u).  Returns float32."""
    n = x.shape[0]
    ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        if guidance == 1.0 or null_class is None:
            return model(x, torch.full((n,), t, device=x.device, dtype=torch.long), labels).float()
        if guidance == 0.0:
            null = torch.full_like(labels, null_class)
            return model(x, torch.full((n,), t, device=x.device, dtype=torch.long), null).float()
        tt = torch.full((2 * n,), t, device=x.device, dtype=torch.long)
        yy = torch.cat([labels, torch.full_like(labels, null_class)])
        eps_c, eps_u = model(torch.cat([x, x]), tt, yy).float().chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def sample(model: ModelFn, schedule: NoiseSchedule, labels: torch.Tensor, seeds: Sequence[int], *,
           sampler: SamplerName = "dpmpp",
           steps: int = 20,
           guidance: float = 1.0,
           eta: float = 0.0,
           guidance_interval: GuidanceInterval | None = None,  # guide only where lo < sigma_t <= hi; None: always
           spacing: Spacing = "time",       # where the steps fall: evenly in time or in logSNR (step_timesteps)
           image_shape: tuple[int, int, int] | None = None,  # (C, H, W); default from model.config
           null_class: int | None = None,  # default: model.null_class
           autocast: bool = False,          # bf16 autocast for the model calls
           clip_x0: bool = True,            # clamp the x0 prediction to [-1, 1] at each step
           progress: ProgressFn | None = None,
           check: Callable[[], None] | None = None,  # called after every step; may raise to stop (a canceled job)
           ) -> torch.Tensor:
    """Run the reverse process for ``len(labels)`` images.  Returns [N, C, H, W] float32 in [-1, 1].

    ``check`` is the worker's batching sampler's argument (``worker.batching``) too, so a caller may hand it to
    either."""
    if len(labels) != len(seeds):
        raise ValueError(f"{len(labels)} labels but {len(seeds)} seeds")
    if check is not None:
        report = progress

        def progress(done: int, total: int) -> None:
            check()
            if report is not None:
                report(done, total)
    settings = SamplerSettings(sampler, steps, guidance, eta, guidance_interval, spacing)
    settings.validate(schedule.num_timesteps)
    cfg = getattr(model, "config", None)
    if image_shape is None:
        image_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if null_class is None:
        null_class = getattr(model, "null_class", None)
    if guidance != 1.0 and null_class is None:  # w = 0 is the unconditional model alone
        raise ValueError(f"guidance {guidance} needs the unconditional class: the model has no null_class; "
                         "pass null_class= or use guidance 1")
    try:
        device = next(model.parameters()).device  # type: ignore[attr-defined]
    except (AttributeError, StopIteration):
        device = labels.device
    labels = labels.to(device)
    noise = _Noise(seeds, image_shape, device)
    step_fn = {"ddpm": _ddpm, "ddim": _ddim, "dpmpp": _dpmpp_2m,
               "dpmpp_sde": functools.partial(_dpmpp_2m, sde=True)}[sampler]

    def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        # outside the guidance interval: the conditional prediction alone (w = 1), one call
        w = guidance if not settings.guided or settings.guides_at(sigma_at(schedule, t)) else 1.0
        return guided_eps(model, x, t, labels, w, null_class, autocast)

    with torch.inference_mode():
        x = noise.next()  # x_T
        ts = step_timesteps(schedule, steps, spacing)
        x = step_fn(eps_fn, schedule, x, ts, noise, eta=eta, clip_x0=clip_x0, progress=progress)
    return x.clamp(-1, 1)


def _abar(schedule: NoiseSchedule, t: int) -> float:
    """abar for index t; index -1 means 'no noise' (abar = 1)."""
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def _x0(x: torch.Tensor, eps: torch.Tensor, abar: float, clip: bool) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    return x0.clamp(-1, 1) if clip else x0


def _report(progress: ProgressFn | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def _ddpm(eps_fn, schedule, x, ts, noise, *, eta, clip_x0, progress):
    """Ancestral sampling (Ho et al. eq. 11) on the respaced chain ts:

    x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) * eps) / sqrt(alpha_t) + sigma_t z,
    with beta_t = 1 - abar_t / abar_prev (respaced), sigma_t^2 = beta_t (1 - abar_prev) / (1 - abar_t).
    Written through x_0 so that the x_0 prediction can be clipped; identical when clip_x0=False.
    """
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        abar, abar_prev = _abar(schedule, t), _abar(schedule, t_prev)
        beta = 1 - abar / abar_prev
        eps = eps_fn(x, t)
        x0 = _x0(x, eps, abar, clip_x0)
        # posterior mean  mu = c0 x_0 + ct x_t   (Ho et al. eq. 7)
        c0 = math.sqrt(abar_prev) * beta / (1 - abar)
        ct = math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)
        mean = c0 * x0 + ct * x
        var = beta * (1 - abar_prev) / (1 - abar)
        z = noise.next()
        x = mean + math.sqrt(var) * z if t_prev >= 0 else mean
        _report(progress, i + 1, len(ts))
    return x


def _ddim(eps_fn, schedule, x, ts, noise, *, eta, clip_x0, progress):
    """DDIM (Song et al. eq. 12): x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z."""
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        abar, abar_prev = _abar(schedule, t), _abar(schedule, t_prev)
        eps = eps_fn(x, t)
        x0 = _x0(x, eps, abar, clip_x0)
        if clip_x0:  # keep eps consistent with the clipped x0
            eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
        if eta > 0:
            z = noise.next()
            if t_prev >= 0:
                x = x + sigma * z
        _report(progress, i + 1, len(ts))
    return x


def _dpmpp_2m(eps_fn, schedule, x, ts, noise, *, eta, clip_x0, progress, sde: bool = False):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction, with a first-order final step to sigma=0.

    alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t), h = lambda_next - lambda_t
    x_next = (sigma_next / sigma_t) x - alpha_next (e^{-h} - 1) D,
    D = x0_t (first order) or (1 + 1/(2r)) x0_t - 1/(2r) x0_prev, r = h_prev / h (second order).
    The first step, the step into index 0 and the final step to sigma=0 are first order.

    ``sde=True``: SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 5; diffusers' "sde-dpmsolver++", midpoint),
    the same D, with fresh noise z at every step but the last:
    x_next = (sigma_next / sigma_t) e^{-h} x - alpha_next (e^{-2h} - 1) D + sigma_next sqrt(1 - e^{-2h}) z.
    The noise corrects part of the model's error at every step, as ancestral sampling does.
    """
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts):
        abar = _abar(schedule, t)
        alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
        eps = eps_fn(x, t)
        x0 = _x0(x, eps, abar, clip_x0)
        if i + 1 == len(ts):
            x = x0  # sigma_next = 0: the solution is the data prediction
        else:
            abar_n = _abar(schedule, ts[i + 1])
            alpha_n, sigma_n = math.sqrt(abar_n), math.sqrt(1 - abar_n)
            h = math.log(alpha_n / sigma_n) - math.log(alpha / sigma)
            if x0_prev is None or i + 2 == len(ts):
                # First order for the first step and for the step into t=0: the second-order
                # extrapolation over that last, very large jump in lambda over-disperses
                # (diffusers' lower_order_final does the same below 15 steps).
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            if sde:
                z = noise.next()
                x = ((sigma_n / sigma) * math.exp(-h) * x - alpha_n * math.expm1(-2 * h) * d
                     + sigma_n * math.sqrt(-math.expm1(-2 * h)) * z)
            else:
                x = (sigma_n / sigma) * x - alpha_n * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        _report(progress, i + 1, len(ts))
    return x
