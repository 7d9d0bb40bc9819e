"""The checkpoint that ships in the repo: small, loadable without pickle, and it samples."""
from __future__ import annotations

import torch

from diffusion.checkpoint import WEIGHTS_FILE, load_checkpoint, read_config
from diffusion.samplers import sample
from training.data import CIFAR10_CLASSES
from training.generate import DEFAULT_CHECKPOINT


def test_shipped_checkpoint_is_small_and_documented():
    cfg = read_config(DEFAULT_CHECKPOINT)
    assert tuple(cfg["class_names"]) == CIFAR10_CLASSES
    prov = cfg["provenance"]
    for key in ("steps", "images_seen", "wall_time_s", "dataset"):
        assert key in prov, key
    assert prov["steps"] > 0 and prov["images_seen"] >= prov["steps"]
    assert (DEFAULT_CHECKPOINT / WEIGHTS_FILE).stat().st_size < 16 * 2**20


def test_shipped_checkpoint_samples_images_in_range():
    torch.set_num_threads(1)
    ckpt = load_checkpoint(DEFAULT_CHECKPOINT)
    assert sum(p.numel() for p in ckpt.model.parameters()) <= 8_000_000
    x = sample(ckpt.model, ckpt.schedule, torch.tensor([3, 8]), [0, 1], sampler="dpmpp", steps=2, guidance=1.5)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.05  # an image, not a constant
