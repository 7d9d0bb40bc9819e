"""Agreement with an independent implementation: Hugging Face diffusers' schedulers.

Our sampler runs with a deterministic, nonlinear fake model; the diffusers scheduler is driven over
the *same* timestep list with the same model, the same x_T and (for the stochastic samplers) the same
noise draws.  Two comparisons per sampler:

* teacher-forced single steps: diffusers' step applied to our own x_t (and, for DPM-Solver++, our own
  history) must reproduce our next x_t;
* free-running: diffusers' loop from our x_T must end where ours does.

Conventions that had to be matched (not fudged):

* DDIM: diffusers' ``DDIMScheduler.step`` derives the previous timestep as
  ``t - num_train_timesteps // num_inference_steps``, i.e. it can only walk a uniform grid.  Ours
  (``timesteps_for``) is evenly spaced but rounded, so e.g. 50 steps have gaps of 20 and 21.  With
  1000 steps both grids are 999..0 and the scheduler is used untouched; for 50 steps
  ``num_inference_steps`` is set before each step so that its stride equals our gap (asserted).
  Our last step goes from index 0 to abar = 1 and returns the x0 prediction; diffusers does the same
  with ``set_alpha_to_one=True`` (prev_timestep < 0 -> final_alpha_cumprod = 1).
* DPM-Solver++(2M): ``set_timesteps(timesteps=ours)``; ``final_sigmas_type="zero"`` makes the last
  step a first-order step to sigma = 0 (= the x0 prediction), as ours.  Ours also takes the
  second-to-last step (into index 0) at first order, at every step count; diffusers does that with
  ``lower_order_final=True`` below 15 steps only, so for 15+ steps the test resets the scheduler's
  ``lower_order_nums`` before that step, which makes diffusers take its own first-order update there.
* DDPM: ``DDPMScheduler`` with custom timesteps walks our respaced chain; variance "fixed_small"
  (posterior variance).  It draws the step noise from a generator (shape of the batch), so it is run
  one image at a time with that image's generator, after x_T has been drawn from it, as ours does.
  At t = 0 it draws nothing where ours draws and discards: the outputs do not depend on that.

Everything is float32 on both sides, but diffusers keeps alphas_cumprod in float32 where we use
float64, hence a tolerance of 1e-4 (outputs are O(1)); measured differences are ~1e-6.
Ours clamps the final output to [-1, 1]; the fake model keeps samples inside (asserted), and the
reference output is clamped the same way.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from diffusion.samplers import sample, timesteps_for
from diffusion.schedules import NoiseSchedule, ScheduleConfig

from diffusion_testlib import MIXTURE, GaussianMixtureEps

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    diffusers = pytest.importorskip("diffusers", minversion="0.30")

T = 1000
SHAPE = (2, 4, 4)
SEEDS = [101, 202, 303]
LABELS = torch.tensor([0, 1, 2])  # class 0, class 1, mixture ("null")
ATOL = 1e-4

# diffusers 0.42 + numpy 2 warn inside DPMSolverMultistepScheduler.set_timesteps; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(ScheduleConfig("linear", T))


@pytest.fixture(scope="module")
def fake_eps(schedule):
    """A deterministic eps(x, t, y): the exact mixture predictor plus a nonlinear, t-dependent term, so
    that it is *not* a score field and no step can be right by accident.  Outputs stay O(1)."""
    exact = GaussianMixtureEps(schedule, **MIXTURE)
    abar = schedule.alphas_cumprod.float()

    def eps(x, t, y):
        a = abar[t].view(-1, 1, 1, 1).sqrt()
        return exact(x, t, y) + 0.1 * a * torch.sin(3 * x) + 0.01 * t.float().view(-1, 1, 1, 1) / T

    return eps


def run_ours(fake_eps, schedule, sampler, steps, eta=0.0):
    """Our sampler; returns the output and the (x_t, t) of every model call."""
    calls = []

    def model(x, t, y):
        assert (t == t[0]).all()
        calls.append((x.clone(), int(t[0])))
        return fake_eps(x, t, y)

    out = sample(model, schedule, LABELS, SEEDS, sampler=sampler, steps=steps, eta=eta, image_shape=SHAPE,
                 null_class=None, clip_x0=False)
    assert [t for _, t in calls] == timesteps_for(T, steps)
    inside = (out.abs() < 0.999).float().mean().item()
    assert inside > 0.97, f"only {inside:.3f} of the output is inside (-1, 1): the comparison would be blind"
    return out, calls


def our_noise(steps):
    """x_T and the per-step normals exactly as diffusion.samplers draws them (one generator per seed)."""
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    draw = lambda: torch.stack([torch.randn(SHAPE, generator=g) for g in gens])
    x_T = draw()
    return x_T, [draw() for _ in range(steps)]


def model_eps(fake_eps, x, t):
    return fake_eps(x, torch.full((x.shape[0],), int(t), dtype=torch.long), LABELS)


def assert_close(ref, ours, what):
    torch.testing.assert_close(ref.clamp(-1, 1), ours, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------ schedules

@pytest.mark.parametrize("ours,theirs", [("linear", dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
                                         ("cosine", dict(beta_schedule="squaredcos_cap_v2"))])
def test_schedules_match_diffusers(ours, theirs):
    sc = diffusers.DDPMScheduler(num_train_timesteps=T, **theirs)
    sch = NoiseSchedule(ScheduleConfig(ours, T))
    torch.testing.assert_close(sch.betas.float(), sc.betas, rtol=1e-5, atol=1e-8)
    # diffusers accumulates the product in float32
    torch.testing.assert_close(sch.alphas_cumprod.float(), sc.alphas_cumprod, rtol=1e-4, atol=1e-9)


# ----------------------------------------------------------------------------------------------- DDIM

def ddim_scheduler(schedule):
    return diffusers.DDIMScheduler(num_train_timesteps=T, trained_betas=schedule.betas.numpy(), clip_sample=False,
                                   set_alpha_to_one=True, prediction_type="epsilon", steps_offset=0,
                                   timestep_spacing="leading")


def ddim_step(sc, eps, t, t_prev, x, eta, z):
    """One diffusers DDIM step from t to t_prev (-1: to abar = 1), setting its stride to our gap."""
    gap = t - t_prev if t_prev >= 0 else 1
    n = next((n for n in range(1, T + 1) if T // n == gap), None)
    assert n is not None, f"diffusers' DDIM cannot take a step of {gap}"
    sc.num_inference_steps = n
    assert t - T // sc.num_inference_steps == t_prev or (t_prev < 0 and t - T // n < 0)
    return sc.step(eps, t, x, eta=eta, variance_noise=z if eta > 0 else None).prev_sample


def test_ddim_1000_steps_untouched_scheduler(fake_eps, schedule):
    out, calls = run_ours(fake_eps, schedule, "ddim", T)
    sc = ddim_scheduler(schedule)
    sc.set_timesteps(T)
    assert sc.timesteps.tolist() == timesteps_for(T, T)  # the grids coincide: 999, 998, ..., 0
    x = calls[0][0]
    for t in sc.timesteps:
        x = sc.step(model_eps(fake_eps, x, t), int(t), x, eta=0.0).prev_sample
    assert_close(x, out, "free-running DDIM, 1000 steps")


@pytest.mark.parametrize("steps,eta", [(50, 0.0), (50, 1.0), (10, 0.0)])
def test_ddim_matches_diffusers(fake_eps, schedule, steps, eta):
    out, calls = run_ours(fake_eps, schedule, "ddim", steps, eta)
    ts = timesteps_for(T, steps)
    x_T, zs = our_noise(steps)
    torch.testing.assert_close(calls[0][0], x_T, atol=0, rtol=0)
    sc = ddim_scheduler(schedule)
    # teacher-forced single steps: diffusers applied to our x_t gives our next x_t
    for i, (x, t) in enumerate(calls):
        t_prev = ts[i + 1] if i + 1 < steps else -1
        ref = ddim_step(sc, model_eps(fake_eps, x, t), t, t_prev, x, eta, zs[i])
        if i + 1 < steps:
            torch.testing.assert_close(ref, calls[i + 1][0], atol=ATOL, rtol=0, msg=lambda m: f"step {t}: {m}")
        else:
            assert_close(ref, out, f"last step {t} -> x0")
    # free-running
    x = x_T
    for i, t in enumerate(ts):
        x = ddim_step(sc, model_eps(fake_eps, x, t), t, ts[i + 1] if i + 1 < steps else -1, x, eta, zs[i])
    assert_close(x, out, f"free-running DDIM, {steps} steps, eta={eta}")


# ------------------------------------------------------------------------------------ DPM-Solver++(2M)

@pytest.mark.parametrize("steps", [10, 20, 50])
def test_dpmpp_2m_matches_diffusers(fake_eps, schedule, steps):
    out, calls = run_ours(fake_eps, schedule, "dpmpp", steps)
    ts = timesteps_for(T, steps)

    def scheduler():
        sc = diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=T, trained_betas=schedule.betas.numpy(), algorithm_type="dpmsolver++", solver_order=2,
            solver_type="midpoint", prediction_type="epsilon", thresholding=False, final_sigmas_type="zero",
            lower_order_final=True, euler_at_final=False, use_karras_sigmas=False)
        sc.set_timesteps(timesteps=ts)
        assert sc.timesteps.tolist() == ts
        return sc

    sc = scheduler()  # teacher-forced: our x_t in, with diffusers' history built from our x_t as well
    for i, (x, t) in enumerate(calls):
        if i == steps - 2:
            sc.lower_order_nums = 0  # first-order step into index 0 (see the module docstring)
        ref = sc.step(model_eps(fake_eps, x, t), sc.timesteps[i], x).prev_sample
        if i + 1 < steps:
            torch.testing.assert_close(ref, calls[i + 1][0], atol=ATOL, rtol=0, msg=lambda m: f"step {t}: {m}")
        else:
            assert_close(ref, out, f"last step {t} -> x0")
    sc = scheduler()  # free-running
    x = calls[0][0]
    for i, t in enumerate(sc.timesteps):
        if i == steps - 2:
            sc.lower_order_nums = 0
        x = sc.step(model_eps(fake_eps, x, t), t, x).prev_sample
    assert_close(x, out, f"free-running DPM-Solver++(2M), {steps} steps")


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_dpmpp_sde_matches_diffusers(fake_eps, schedule, steps):
    """SDE-DPM-Solver++(2M): diffusers' "sde-dpmsolver++" (midpoint), fed our per-step normals."""
    out, calls = run_ours(fake_eps, schedule, "dpmpp_sde", steps)
    ts = timesteps_for(T, steps)
    x_T, noises = our_noise(steps)
    torch.testing.assert_close(calls[0][0], x_T)

    def scheduler():
        sc = diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=T, trained_betas=schedule.betas.numpy(), algorithm_type="sde-dpmsolver++",
            solver_order=2, solver_type="midpoint", prediction_type="epsilon", thresholding=False,
            final_sigmas_type="zero", lower_order_final=True, euler_at_final=False, use_karras_sigmas=False)
        sc.set_timesteps(timesteps=ts)
        return sc

    sc = scheduler()  # teacher-forced
    for i, (x, t) in enumerate(calls):
        if i == steps - 2:
            sc.lower_order_nums = 0
        ref = sc.step(model_eps(fake_eps, x, t), sc.timesteps[i], x, variance_noise=noises[i]).prev_sample
        if i + 1 < steps:
            torch.testing.assert_close(ref, calls[i + 1][0], atol=ATOL, rtol=0, msg=lambda m: f"step {t}: {m}")
        else:
            assert_close(ref, out, f"last step {t} -> x0")
    sc = scheduler()  # free-running
    x = x_T
    for i, t in enumerate(sc.timesteps):
        if i == steps - 2:
            sc.lower_order_nums = 0
        x = sc.step(model_eps(fake_eps, x, t), t, x, variance_noise=noises[i]).prev_sample
    assert_close(x, out, f"free-running SDE-DPM-Solver++(2M), {steps} steps")
    # the noise matters: the deterministic solver ends elsewhere
    assert (sample(fake_eps, schedule, LABELS, SEEDS, sampler="dpmpp", steps=steps, image_shape=SHAPE,
                   null_class=None, clip_x0=False) - out).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------- DDPM

@pytest.mark.parametrize("steps", [1000, 100, 9])
def test_ddpm_matches_diffusers(fake_eps, schedule, steps):
    out, calls = run_ours(fake_eps, schedule, "ddpm", steps)
    ts = timesteps_for(T, steps)
    for j, seed in enumerate(SEEDS):  # one image at a time: diffusers draws noise for the whole batch
        sc = diffusers.DDPMScheduler(num_train_timesteps=T, trained_betas=schedule.betas.numpy(),
                                     variance_type="fixed_small", clip_sample=False, prediction_type="epsilon")
        sc.set_timesteps(timesteps=ts)
        assert sc.timesteps.tolist() == ts
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(SHAPE, generator=g)[None]
        torch.testing.assert_close(x[0], calls[0][0][j], atol=0, rtol=0)
        y = LABELS[j:j + 1]
        for t in sc.timesteps:
            eps = fake_eps(x, torch.full((1,), int(t), dtype=torch.long), y)
            x = sc.step(eps, t, x, generator=g).prev_sample
        assert_close(x[0], out[j], f"free-running DDPM, {steps} steps, image {j}")
