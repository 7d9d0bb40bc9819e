"""DREAMDATA_COMPILE: the worker's model through torch.compile, fed padded batch shapes.

Inductor's C++ code generation takes minutes on the 2-core CI machine, so the test compiles with
the ``aot_eager`` backend: the same dynamo capture and AOT autograd graph of the UNet, run by
eager kernels. Inductor itself, and its speed, are measured by ``benchmarks/sampling.py``.
"""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from diffusion.samplers import sample
from worker.generation import job_sampler, worker_model
from worker.settings import Settings

KW = dict(sampler="dpmpp", steps=2, guidance=1.5)


def test_compile_mode_is_validated():
    with pytest.raises(ValidationError, match="compile"):
        Settings(compile="fast")


def test_a_compiled_worker_model_pads_batches_and_gives_the_eager_images(tiny_checkpoint, service_dir, cheap_compile):
    import torch._inductor.config as inductor_config

    modes = cheap_compile
    eager_settings = Settings(checkpoint=tiny_checkpoint, data_dir=service_dir, batch_size=4)
    compiled_settings = Settings(checkpoint=tiny_checkpoint, data_dir=service_dir, batch_size=4, compile="default")
    eager, compiled = worker_model(eager_settings), worker_model(compiled_settings)
    frozen = inductor_config.freezing
    assert not job_sampler(eager_settings).pad
    assert compiled.model is not eager.model and compiled.sha256 == eager.sha256
    assert isinstance(compiled.model, torch._dynamo.eval_frame.OptimizedModule) and modes == [("default", False)]
    assert frozen  # on a CPU: weights folded in and convolutions prepacked (compile_for_sampling)
    assert compiled.config == eager.config  # the wrapper still answers for the UNet's config
    assert torch._dynamo.config.recompile_limit >= 2 * 8  # guided + unguided padded shapes stay compiled

    batcher = job_sampler(compiled_settings)
    assert batcher.pad
    labels, seeds = torch.tensor([0, 1, 2]), [5, 6, 7]
    x = batcher(compiled.model, compiled.schedule, labels, seeds, **KW)  # padded to 4 rows, 3 returned
    assert x.shape[0] == 3 and batcher.stats.padded == 1
    torch.testing.assert_close(x, sample(eager.model, eager.schedule, labels, seeds, **KW), atol=1e-3, rtol=0)
