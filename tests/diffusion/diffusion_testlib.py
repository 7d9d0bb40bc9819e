"""Helpers shared by the diffusion/ tests (a uniquely named module: ``conftest`` cannot be imported
reliably when several test packages each have one)."""
from __future__ import annotations

import math

import torch

from diffusion.schedules import NoiseSchedule
from diffusion.unet import UNet, UNetConfig

# A tiny but complete UNet: two levels, one res block each, attention at 4x4, 3 classes + null.
TINY_UNET = UNetConfig(image_size=8, in_channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(4,), dropout=0.0, num_classes=3)


def make_tiny_unet(seed: int = 0, config: UNetConfig = TINY_UNET) -> UNet:
    torch.manual_seed(seed)
    return UNet(config).eval()


class GaussianMixtureEps:
    """Exact noise predictor for data x0 whose pixels are i.i.d. draws from a 2-D Gaussian mixture.

    Images are [N, 2, H, W]; each pixel's 2-vector (the two channels) is an independent draw from
    sum_k w_k N(mu_k, Sigma_k).  For x_t = a x0 + s eps (a = sqrt(abar_t), s = sqrt(1 - abar_t)) the
    marginal of x_t is sum_k w_k N(a mu_k, a^2 Sigma_k + s^2 I), so the exact predictor is
    eps*(x_t) = -s * grad log p(x_t) = s * sum_k r_k(x_t) C_k^{-1} (x_t - a mu_k), with C_k the
    component covariance and r_k the posterior responsibilities.

    Class conditioning: label k < K selects component k alone (a single Gaussian); any label >= K
    (the null class) gives the whole mixture.  Computed in float64 with explicit 2x2 inverses.
    """

    def __init__(self, schedule: NoiseSchedule, weights, means, covs):
        self.abar = schedule.alphas_cumprod  # float64 [T]
        self.w = torch.as_tensor(weights, dtype=torch.float64)
        self.mu = torch.as_tensor(means, dtype=torch.float64)    # [K, 2]
        self.sig = torch.as_tensor(covs, dtype=torch.float64)    # [K, 2, 2]
        self.K = len(self.w)

    def moments(self, label: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact mean [2] and covariance [2, 2] of one pixel of class ``label`` (None: the mixture)."""
        if label is not None and label < self.K:
            return self.mu[label].clone(), self.sig[label].clone()
        m = (self.w[:, None] * self.mu).sum(0)
        second = sum(self.w[k] * (self.sig[k] + torch.outer(self.mu[k], self.mu[k])) for k in range(self.K))
        return m, second - torch.outer(m, m)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 2 and t.dtype == torch.long and y.dtype == torch.long
        n = x.shape[0]
        abar = self.abar[t.cpu()].view(n, 1, 1)           # [n, 1, 1]
        a, s2 = abar.sqrt(), 1 - abar
        u, v = x.double()[:, 0], x.double()[:, 1]          # [n, H, W] each
        y = y.cpu().view(n, 1, 1)
        logp, eu, ev = [], [], []
        for k in range(self.K):
            c00 = abar * self.sig[k, 0, 0] + s2
            c01 = abar * self.sig[k, 0, 1]
            c11 = abar * self.sig[k, 1, 1] + s2
            det = c00 * c11 - c01 * c01
            du, dv = u - a * self.mu[k, 0], v - a * self.mu[k, 1]
            su, sv = (c11 * du - c01 * dv) / det, (c00 * dv - c01 * du) / det  # C^{-1} d
            lw = torch.log(self.w[k]).expand_as(y).double()
            lw = torch.where((y < self.K) & (y != k), torch.full_like(lw, -math.inf), lw)
            logp.append(lw - 0.5 * (du * su + dv * sv) - 0.5 * torch.log(det))
            eu.append(su)
            ev.append(sv)
        r = torch.softmax(torch.stack(logp), dim=0)        # [K, n, H, W]
        s = s2.sqrt()
        eps = torch.stack([s * (r * torch.stack(eu)).sum(0), s * (r * torch.stack(ev)).sum(0)], dim=1)
        return eps.to(x.dtype)


# Two well separated, correlated components, almost entirely inside [-1, 1] (the samplers clamp their
# output to [-1, 1]; P(|x| >= 1) is about 1e-4 here, which moves the moments by < 1e-4).
MIXTURE = dict(weights=[0.4, 0.6],
               means=[[-0.4, 0.25], [0.3, -0.15]],
               covs=[[[0.03, 0.015], [0.015, 0.04]], [[0.05, -0.02], [-0.02, 0.03]]])
