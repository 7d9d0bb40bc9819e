"""Guidance in a limited interval of noise levels (Kynkaanniemi et al. 2024): which steps make the second call,
how a request spells the interval, and that an interval holding every step changes nothing."""
import math

import pytest
import torch

from diffusion.samplers import SAMPLERS, SamplerSettings, model_calls, sample, sigma_at, step_sigmas, timesteps_for
from diffusion.spec import DEFAULT_SETTINGS, format_guidance_interval, parse_guidance_interval

from diffusion_testlib import make_tiny_unet


class RecordingModel:
    """eps = 0.1 x; records (batch, t) of every call."""

    def __init__(self, null_class: int = 5):
        self.null_class, self.calls = null_class, []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], int(t[0])))
        return 0.1 * x


def test_sigmas_of_the_shipped_schedule(linear_schedule):
    sig = step_sigmas(linear_schedule, 20)
    assert len(sig) == 20 and sig == sorted(sig, reverse=True)  # noisiest first
    assert sig[0] == pytest.approx(157.4, abs=0.1) and sig[-1] == pytest.approx(0.01, abs=0.001)
    abar = float(linear_schedule.alphas_cumprod[500])
    assert sigma_at(linear_schedule, 500) == pytest.approx(math.sqrt((1 - abar) / abar))


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("interval", [(0.28, 2.9), (0.0, 11.0), (1.0, 1e6)])
def test_only_steps_inside_the_interval_are_guided(sampler, interval, linear_schedule):
    model = RecordingModel()
    steps = 20 if sampler != "ddpm" else 30
    sample(model, linear_schedule, torch.tensor([0, 1, 2]), [1, 2, 3], sampler=sampler, steps=steps, guidance=4.0,
           guidance_interval=interval, image_shape=(1, 2, 2))
    ts = timesteps_for(1000, steps)
    lo, hi = interval
    expected = [(6 if lo < sigma_at(linear_schedule, t) <= hi else 3, t) for t in ts]
    assert model.calls == expected
    assert {n for n, _ in model.calls} == {3, 6}  # both kinds of step occur
    calls = model_calls(SamplerSettings(sampler, steps, 4.0, guidance_interval=interval), linear_schedule)
    assert calls == sum(n for n, _ in model.calls) // 3  # per image


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_an_interval_does_not_change_unguided_sampling(guidance, linear_schedule):
    model = RecordingModel()
    sample(model, linear_schedule, torch.tensor([0, 1]), [1, 2], sampler="dpmpp", steps=10, guidance=guidance,
           guidance_interval=(0.28, 2.9), image_shape=(1, 2, 2))
    assert [n for n, _ in model.calls] == [2] * 10
    assert model_calls(SamplerSettings("dpmpp", 10, guidance, guidance_interval=(0.28, 2.9)), linear_schedule) == 10


def test_an_interval_holding_every_step_is_classic_guidance(linear_schedule):
    model = make_tiny_unet().eval()
    labels, seeds = torch.tensor([0, 1, 2]), [7, 8, 9]
    kw = dict(sampler="dpmpp_sde", steps=6, guidance=3.0)
    every = sample(model, linear_schedule, labels, seeds, **kw)
    wide = sample(model, linear_schedule, labels, seeds, guidance_interval=(0.0, 1e4), **kw)
    narrow = sample(model, linear_schedule, labels, seeds, guidance_interval=(0.28, 2.9), **kw)
    torch.testing.assert_close(wide, every, rtol=0, atol=0)
    assert not torch.allclose(narrow, every)


def test_model_calls_needs_the_noise_levels_with_an_interval(linear_schedule):
    s = SamplerSettings("dpmpp_sde", 20, 4.0, guidance_interval=(0.28, 2.9))
    with pytest.raises(ValueError, match="noise levels"):
        s.model_calls()
    assert s.model_calls(step_sigmas(linear_schedule, 20)) == 27  # 7 of the 20 steps are guided
    assert SamplerSettings("dpmpp_sde", 20, 4.0).model_calls() == 40
    assert SamplerSettings("dpmpp_sde", 20, 1.0).model_calls() == 20


@pytest.mark.parametrize("text,expected", [
    ("0.28,2.9", (0.28, 2.9)), (" 0 , 11 ", (0.0, 11.0)), ("all", None), ("ALL", None), (None, None),
    ([0.5, 3], (0.5, 3.0)), ((1, 2), (1.0, 2.0)), ("0.123456789,1e6", (0.123456789, 1e6))])
def test_parse_guidance_interval(text, expected):
    assert parse_guidance_interval(text) == expected
    if expected is not None:
        assert parse_guidance_interval(format_guidance_interval(expected)) == expected


@pytest.mark.parametrize("text,match", [
    ("2.9,0.28", "0 <= lo < hi"), ("1,1", "0 <= lo < hi"), ("-1,2", "0 <= lo < hi"), ("0,inf", "finite"),
    ("0.28", "two noise levels"), ("1,2,3", "two noise levels"), ("a,b", "'lo,hi'"), ("", "'lo,hi'"),
    ([1, "x"], "two numbers"), (5, "two numbers"), ("nan,1", "0 <= lo < hi")])
def test_bad_guidance_intervals_say_why(text, match):
    with pytest.raises(ValueError, match=match):
        parse_guidance_interval(text)


def test_settings_validate_and_normalise_the_interval(linear_schedule):
    s = SamplerSettings("ddim", 10, 2.0, guidance_interval=[0.5, 3])
    assert s.guidance_interval == (0.5, 3.0) and hash(s) == hash(SamplerSettings("ddim", 10, 2.0, 0.0, (0.5, 3.0)))
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        SamplerSettings("ddim", 10, 2.0, guidance_interval=(3, 0.5)).validate()
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        sample(RecordingModel(), linear_schedule, torch.tensor([0]), [0], sampler="ddim", steps=3,
               guidance=2.0, guidance_interval=(3, 0.5), image_shape=(1, 2, 2))
    DEFAULT_SETTINGS.validate()



@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_unguided_settings_carry_no_interval_but_a_bad_one_is_still_refused(guidance):
    """w 0 or 1 guides no step: the interval is dropped, so manifests and reports do not record one as applied."""
    s = SamplerSettings("dpmpp_sde", 20, guidance, guidance_interval=(0.28, 4))
    assert s.guidance_interval is None and s == SamplerSettings("dpmpp_sde", 20, guidance)
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        SamplerSettings("dpmpp_sde", 20, guidance, guidance_interval=(4, 0.28))
