"""Fixtures for the diffusion/ tests; helpers live in diffusion_testlib.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(autouse=True)
def _single_torch_thread():
    """These tests push tiny tensors through many small ops; on a busy 2-core machine torch's
    intra-op thread pool costs far more than it saves (measured 10-20x slower per op).  Restored after
    each test so that nothing leaks into other test packages."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
