"""Fixtures for every test package."""
from __future__ import annotations

import os

import pytest

# Sampling precision "auto" times the model on this CPU and may pick bf16; tests (and the worker processes they
# start, which inherit the environment) compare images across processes and runs, so they pin fp32. The tests
# of the choice itself pass it explicitly (tests/diffusion/test_precision.py).
os.environ["DREAMDATA_PRECISION"] = "fp32"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread per test, restored afterwards. The tests push small tensors through many small
    ops, and on a busy 2-core machine torch's intra-op thread pool costs far more than it saves
    (measured 10-20x slower per op). Tests that measure or need threads set their own."""
    import torch  # here, not at module level: the torch-free checks run in their own processes anyway

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cheap_compile(monkeypatch):
    """``torch.compile`` on the aot_eager backend (dynamo's capture, eager kernels: inductor's C++ build takes
    minutes on this machine), with inductor's process-wide ``freezing`` restored afterwards (a monkeypatch
    would delete the config key on undo). Yields the list of (mode, dynamic) of every compile."""
    import torch
    import torch._inductor.config as inductor_config

    real_compile, calls = torch.compile, []

    def compile_(model, *, mode=None, dynamic=None):
        calls.append((mode, dynamic))
        return real_compile(model, backend="aot_eager", dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", compile_)
    with inductor_config.patch(freezing=False):
        yield calls
