"""Samplers against data whose exact noise predictor is known in closed form.

Data: every pixel's 2-vector (the two channels) is an independent draw from a two-component 2-D
Gaussian mixture (``diffusion_testlib.MIXTURE``: weights .4/.6, means (-.4, .25) and (.3, -.15),
correlated covariances; overall mean (.02, .01), variances .160 and .072, covariance -.073).  The model
is the exact eps predictor of that distribution (``GaussianMixtureEps``), so a correct sampler must
reproduce the data's mean and covariance up to Monte Carlo error plus its own discretisation error.

Sample size: 8,000 pixel draws per case.  The ddpm runs draw one normal per image per step through a
Python-level generator per image (~5 us each), so ddpm uses fewer, larger images (e.g. 250 images of
4x8 pixels): the pixels are independent draws because the noise is i.i.d. per element and the model
acts per pixel.  ddim/dpmpp/dpmpp_sde use 4,000 images (one per seed) of 1x2 pixels.

Tolerances are absolute, on the max over entries.  Monte Carlo standard errors at n = 8000: mean
<= sqrt(.16/n) = .0045, covariance entries <= ~.0025 (fixed seeds: the tests are deterministic; the
tolerances leave >= 4 SE of room so that legitimate refactors that change the noise stream still pass).
On top of that each case's discretisation bias, measured with three independent seed sets, is noted.
"""
import pytest
import torch

from diffusion.samplers import sample

from diffusion_testlib import GaussianMixtureEps

NULL = 2  # labels >= 2 select the whole mixture (the model's "null" class)


def pixel_moments(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = out.double().permute(0, 2, 3, 1).reshape(-1, 2)
    return z.mean(0), torch.cov(z.T)


def check_moments(out, model: GaussianMixtureEps, label, mean_tol, cov_tol):
    m, c = model.moments(label)
    em, ec = pixel_moments(out)
    assert (em - m).abs().max() <= mean_tol, f"mean {em.tolist()} vs {m.tolist()} (tol {mean_tol})"
    assert (ec - c).abs().max() <= cov_tol, f"cov {ec.tolist()} vs {c.tolist()} (tol {cov_tol})"


# sampler, steps, images, (C, H, W), mean tol, cov tol     # measured |bias| of the covariance
CASES = [
    ("ddpm", 1000, 250, (2, 4, 8), 0.02, 0.015),   # < .005: ancestral sampling with all 1000 steps
    ("ddpm", 100, 1000, (2, 2, 4), 0.02, 0.03),    # .016 (var too small): respaced chain
    ("ddim", 50, 4000, (2, 1, 2), 0.02, 0.03),     # .015 (var too small): first-order ODE solver
    ("dpmpp", 100, 4000, (2, 1, 2), 0.02, 0.02),   # .007
    # dpmpp-20 once over-dispersed this bimodal data (bias .095) through a second-order step into
    # t=0 (grid ...105, 53, 0; logSNR jump 2.9, r = .23); that step is first order now (bias ~.019).
    # NB moments cannot pin DPM-Solver++'s second-order arithmetic: test_reference_diffusers.py does.
    ("dpmpp", 20, 4000, (2, 1, 2), 0.02, 0.04),
    ("dpmpp_sde", 20, 4000, (2, 1, 2), 0.02, 0.04),  # .019-.020
    ("dpmpp_sde", 50, 4000, (2, 1, 2), 0.02, 0.02),  # .005
]


@pytest.mark.parametrize("sampler,steps,n,shape,mean_tol,cov_tol", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_mixture_moments(sampler, steps, n, shape, mean_tol, cov_tol, mixture_eps, linear_schedule):
    labels = torch.full((n,), NULL)
    out = sample(mixture_eps, linear_schedule, labels, list(range(n)), sampler=sampler, steps=steps,
                 image_shape=shape, null_class=None, clip_x0=False)
    assert out.shape == (n, *shape)
    # the data has ~1e-4 of its mass outside [-1, 1]; the final clamp must not shape the result
    # (over-dispersed dpmpp-20 output: .003)
    clamped = (out.abs() >= 1).float().mean().item()
    assert clamped < 5e-3, clamped
    check_moments(out, mixture_eps, None, mean_tol, cov_tol)


# Class-conditional: label k selects Gaussian component k (variances .03-.05).  Measured biases of
# the covariance: ddim-50 .011, dpmpp-20 .033 (ddim under-, dpmpp over-disperses); MC SE ~ .001.
@pytest.mark.parametrize("sampler,steps,cov_tol", [("ddim", 50, 0.02), ("dpmpp", 20, 0.045), ("ddpm", 100, 0.02)])
def test_class_conditional_moments(sampler, steps, cov_tol, mixture_eps, linear_schedule):
    n = 4000 if sampler != "ddpm" else 1000
    shape = (2, 1, 2) if sampler != "ddpm" else (2, 2, 4)
    labels = torch.arange(n) % 2
    out = sample(mixture_eps, linear_schedule, labels, list(range(n)), sampler=sampler, steps=steps,
                 image_shape=shape, null_class=None, clip_x0=False)
    for k in (0, 1):
        check_moments(out[labels == k], mixture_eps, k, 0.015, cov_tol)


def test_pixels_and_images_are_independent(mixture_eps, linear_schedule):
    """No noise shared across pixels or images: the correlation between neighbouring pixels (and
    between consecutive images) must vanish up to Monte Carlo error (1/sqrt(n) = .011 here)."""
    n = 2000
    out = sample(mixture_eps, linear_schedule, torch.full((n,), NULL), list(range(n)), sampler="ddpm", steps=50,
                 image_shape=(2, 2, 2), null_class=None, clip_x0=False).double()
    pairs = [(out[:, 0, 0, 0], out[:, 0, 0, 1]), (out[:, 1, 0, 0], out[:, 1, 1, 1]),
             (out[:-1, 0, 0, 0], out[1:, 0, 0, 0])]
    for a, b in pairs:
        r = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert abs(r) < 0.06, r


def test_closed_form_predictor_is_exact(linear_schedule):
    """The test oracle itself: eps*(x_t) = -sqrt(1 - abar) * grad log p_t(x_t), checked with autograd
    against torch.distributions, for each class and for the mixture."""
    from diffusion_testlib import MIXTURE
    model = GaussianMixtureEps(linear_schedule, **MIXTURE)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.7
    for ti in (0, 37, 500, 999):
        abar = linear_schedule.alphas_cumprod[ti]
        for label in (0, 1, NULL):
            comps = [label] if label < 2 else [0, 1]
            xr = x.clone().requires_grad_(True)
            z = xr.permute(0, 2, 3, 1)
            logps = []
            for k in comps:
                dist = torch.distributions.MultivariateNormal(
                    abar.sqrt() * model.mu[k], abar * model.sig[k] + (1 - abar) * torch.eye(2, dtype=torch.float64))
                logps.append(dist.log_prob(z) + (torch.log(model.w[k]) if label >= 2 else 0.0))
            (grad,) = torch.autograd.grad(torch.logsumexp(torch.stack(logps), 0).sum(), xr)
            eps = model(x, torch.full((3,), ti), torch.full((3,), label))
            torch.testing.assert_close(eps, -(1 - abar).sqrt() * grad, atol=1e-10, rtol=1e-8)


def test_mixture_moments_formula():
    """The oracle's moments: mean .02/.01, var .1596/.0724, cov -.0732 (worked by hand)."""
    from diffusion_testlib import MIXTURE
    sch = type("S", (), {"alphas_cumprod": torch.ones(1, dtype=torch.float64)})()
    m, c = GaussianMixtureEps(sch, **MIXTURE).moments()
    torch.testing.assert_close(m, torch.tensor([0.02, 0.01], dtype=torch.float64))
    torch.testing.assert_close(c, torch.tensor([[0.1596, -0.0732], [-0.0732, 0.0724]], dtype=torch.float64))
