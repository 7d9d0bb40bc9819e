"""Noise schedules and the forward process q(x_t | x_0)."""
import math

import pytest
import torch

from diffusion.schedules import SCHEDULES, NoiseSchedule, ScheduleConfig, make_betas


def test_linear_endpoints_float64():
    betas = make_betas("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12, abs=0)   # beta_1
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12, abs=0)   # beta_T
    assert (betas[1:] > betas[:-1]).all()


def test_cosine_shape_and_clip():
    betas = make_betas("cosine", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert (betas > 0).all() and (betas <= 0.999).all()
    assert betas[-1].item() == pytest.approx(0.999)  # the last beta hits the clip
    # abar follows the cosine formula (before the clip bites)
    s, T = 0.008, 1000
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    abar = NoiseSchedule(ScheduleConfig("cosine", T)).alphas_cumprod
    for t in (1, 10, 500, 900):
        assert abar[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [1000, 50])
def test_alphas_cumprod_and_snr_monotone(name, T):
    sch = NoiseSchedule(ScheduleConfig(name, T))
    abar = sch.alphas_cumprod
    assert abar.dtype == torch.float64 and abar.shape == (T,)
    assert ((abar > 0) & (abar < 1)).all()
    assert (abar[1:] < abar[:-1]).all()  # strictly decreasing
    torch.testing.assert_close(abar, torch.cumprod(1 - sch.betas, 0))
    snr = sch.snr(torch.arange(T))
    assert snr.dtype == torch.float64
    assert (snr[1:] < snr[:-1]).all()
    torch.testing.assert_close(snr, abar / (1 - abar))


def test_linear_endpoints_other_T_scaled():
    # improved-diffusion convention: scale 1000/T, so T=1000 is exactly Ho et al.
    betas = make_betas("linear", 500)
    assert betas[0].item() == pytest.approx(2e-4) and betas[-1].item() == pytest.approx(0.04)


def test_linear_T1000_terminal_snr_is_small():
    abar = NoiseSchedule(ScheduleConfig()).alphas_cumprod
    assert abar[-1].item() == pytest.approx(4.036e-5, rel=1e-3)  # known value for Ho et al.'s schedule
    assert abar[0].item() == pytest.approx(1 - 1e-4)


@pytest.mark.parametrize("name", SCHEDULES)
def test_q_sample_closed_form(name):
    sch = NoiseSchedule(ScheduleConfig(name, 1000))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 250, 998, 999])
    xt = sch.q_sample(x0, t, noise)
    assert xt.shape == x0.shape and xt.dtype == torch.float32
    for i, ti in enumerate(t.tolist()):
        a = sch.alphas_cumprod[ti].item()
        expected = math.sqrt(a) * x0[i].double() + math.sqrt(1 - a) * noise[i].double()
        # float32 tolerance: q_sample casts abar to the data dtype before 1 - abar, which at t=0
        # (1 - abar = 1e-4) costs ~1e-4 relative precision in the noise coefficient (abs <= ~4e-6 here).
        torch.testing.assert_close(xt[i].double(), expected, atol=1e-5, rtol=0)


def test_q_sample_float64_and_marginal_variance():
    sch = NoiseSchedule(ScheduleConfig())
    n = 20000
    x0 = torch.full((n, 1, 1, 1), 0.5, dtype=torch.float64)
    noise = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.full((n,), 300)
    xt = sch.q_sample(x0, t, noise)
    assert xt.dtype == torch.float64
    a = sch.alphas_cumprod[300].item()
    assert xt.mean().item() == pytest.approx(0.5 * math.sqrt(a), abs=0.03)   # 4 SE of 1/sqrt(n) scale
    assert xt.var().item() == pytest.approx(1 - a, abs=0.03)


@pytest.mark.parametrize("T", [1, 2, 10, 20, 21])
def test_short_linear_schedules_stay_valid(T):
    """beta_T = 20/T reached 1 at T = 20 and went past it below (abar_T <= 0, NaN noise levels)."""
    s = NoiseSchedule(ScheduleConfig("linear", T))
    assert float(s.betas.max()) <= 0.999 and bool((s.alphas_cumprod > 0).all())
    assert torch.isfinite(s.q_sample(torch.ones(1, 1), torch.tensor([T - 1]), torch.ones(1, 1))).all()


def test_a_schedule_needs_a_timestep():
    with pytest.raises(ValueError, match="at least 1 timestep"):
        make_betas("linear", 0)


def test_unknown_schedule_name():
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'"):
        make_betas("quadratic", 1000)
    with pytest.raises(ValueError, match="linear, cosine"):
        NoiseSchedule(ScheduleConfig("sigmoid", 10))


def test_schedule_config_to_dict():
    assert ScheduleConfig("cosine", 4000).to_dict() == {"name": "cosine", "timesteps": 4000}
