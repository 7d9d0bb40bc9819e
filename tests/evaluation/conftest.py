"""Tiny on-the-fly fixtures for the evaluation tests: a 10-class data set and a width-8 checkpoint."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.checkpoint import save_checkpoint
from diffusion.schedules import ScheduleConfig
from diffusion.unet import UNet, UNetConfig
from training.data import CIFAR10_CLASSES

TRAIN_PER_CLASS, TEST_PER_CLASS = 8, 4


def patterned(class_index: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, 32, 32, 3] uint8: a class colour (hue step 36 degrees) with stripes and noise."""
    angle = 2 * np.pi * class_index / 10
    base = 128 + 90 * np.array([np.cos(angle), np.cos(angle - 2.1), np.cos(angle + 2.1)])
    stripes = 20 * np.sign(np.sin(np.arange(32) * (class_index + 1) / 3))[None, :, None, None]
    x = base[None, None, None, :] + stripes + rng.normal(0, 15, (n, 32, 32, 3))
    return np.clip(x, 0, 255).astype(np.uint8)


def write_tar(path, per_split: dict[str, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w:gz") as tf:
        for split, n in per_split.items():
            for c, name in enumerate(CIFAR10_CLASSES):
                for i, arr in enumerate(patterned(c, n, rng)):
                    buf = io.BytesIO()
                    Image.fromarray(arr).save(buf, format="PNG")
                    info = tarfile.TarInfo(f"cifar10/{split}/{name}/{i:04d}.png")
                    info.size = buf.tell()
                    buf.seek(0)
                    tf.addfile(info, buf)
    return path


@pytest.fixture(scope="session")
def data_tar(tmp_path_factory):
    return write_tar(tmp_path_factory.mktemp("data") / "tiny-cifar.tar.gz",
                     {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", model, ScheduleConfig("linear", 1000),
                           CIFAR10_CLASSES, {"note": "random weights, for tests"})


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("DREAMDATA_CACHE", str(d))
    return d


@pytest.fixture
def separable():
    """(images uint8 [100, 3, 32, 32], labels [100]): 10 well-separated patterned classes."""
    rng = np.random.default_rng(1)
    x = np.concatenate([patterned(c, 10, rng) for c in range(10)])
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.arange(10).repeat_interleave(10)


@pytest.fixture
def sampling_calls(monkeypatch) -> list[list[int]]:
    """The seeds of every batch of images the synthetic cache samples (``sample_specs`` calls), in order."""
    import training.synthetic_cache as synthetic_cache

    calls: list[list[int]] = []
    real = synthetic_cache.sample_specs

    def counting(ckpt, specs, *args, **kwargs):
        calls.append([s.seed for s in specs])
        return real(ckpt, specs, *args, **kwargs)

    monkeypatch.setattr(synthetic_cache, "sample_specs", counting)
    return calls
