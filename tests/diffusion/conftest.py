"""Fixtures for the diffusion/ tests; helpers live in diffusion_testlib.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from diffusion.schedules import NoiseSchedule, ScheduleConfig
from diffusion.unet import UNet

if str(Path(__file__).resolve().parent) not in sys.path:  # `import diffusion_testlib` under --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusion_testlib import MIXTURE, GaussianMixtureEps, make_tiny_unet


@pytest.fixture
def tiny_unet() -> UNet:
    return make_tiny_unet()


@pytest.fixture(scope="session")
def linear_schedule() -> NoiseSchedule:
    return NoiseSchedule(ScheduleConfig("linear", 1000))


@pytest.fixture(scope="session")
def mixture_eps(linear_schedule) -> GaussianMixtureEps:
    return GaussianMixtureEps(linear_schedule, **MIXTURE)
