"""The precision of sampling calls: the auto rule, the requested one, and where the choice shows."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion.precision as precision
from diffusion.checkpoint import load_for_sampling, save_checkpoint
from diffusion.schedules import ScheduleConfig
from diffusion.spec import requested_precision
from training.generate import generate_to_dir

from diffusion_testlib import make_tiny_unet

CLASSES = ("a", "b", "c")  # the tiny UNet has 3 classes


def test_requested_precision_argument_then_environment_then_auto(monkeypatch):
    monkeypatch.delenv("DREAMDATA_PRECISION", raising=False)
    assert requested_precision() == "auto" and requested_precision("BF16") == "bf16"
    monkeypatch.setenv("DREAMDATA_PRECISION", "bf16")
    assert requested_precision() == "bf16" and requested_precision("fp32") == "fp32"
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        requested_precision("fp16")


@pytest.mark.parametrize("bf16_speedup,expect_bf16", [(2.0, True), (1.1, False), (0.7, False)])
def test_auto_on_a_cpu_keeps_the_fastest_variant_and_bf16_only_with_a_margin(monkeypatch, bf16_speedup, expect_bf16):
    def fake_time(model, bf16, channels_last, device):  # channels_last faster in fp32, NCHW in bf16
        fp32 = 1.0 if channels_last else 1.3
        return (1.0 / bf16_speedup) * (1.0 if not channels_last else 1.1) if bf16 else fp32

    monkeypatch.setattr(precision, "_time_forward", fake_time)
    monkeypatch.setattr(precision, "_AUTO_CACHE", {})
    model = make_tiny_unet()
    choice = precision.choose_precision(model, "auto")
    assert choice.bf16 is expect_bf16 and choice.name == ("bf16" if expect_bf16 else "fp32")
    assert choice.channels_last is (not expect_bf16)  # the faster layout of the chosen precision
    assert set(choice.timings) == {"fp32 NCHW", "fp32 channels_last", "bf16 NCHW", "bf16 channels_last"}
    assert choice.reason.startswith("auto:") and f"{bf16_speedup:.2f}x" in choice.reason
    weight = next(p for p in model.parameters() if p.dim() == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last) is choice.channels_last
    # decided once per architecture and thread count in a process
    monkeypatch.setattr(precision, "_time_forward", lambda *a: pytest.fail("timed twice"))
    assert precision.choose_precision(make_tiny_unet(seed=3), "auto") == choice


def test_auto_really_times_the_model(monkeypatch):
    monkeypatch.setattr(precision, "_AUTO_CACHE", {})
    monkeypatch.setattr(precision, "PROBE_BATCH", 2)
    choice = precision.choose_precision(make_tiny_unet(), "auto")
    assert all(v > 0 for v in choice.timings.values())


def test_requested_precision_is_kept_and_recorded_in_every_image(tmp_path):
    ckdir = save_checkpoint(tmp_path / "ckpt", make_tiny_unet(), ScheduleConfig("linear", 1000), CLASSES, {})
    out = {}
    for p in ("fp32", "bf16"):
        ckpt = load_for_sampling(ckdir, precision=p)
        assert ckpt.precision.name == p and ckpt.precision.reason == f"{p} (requested)"
        manifest = generate_to_dir(ckpt, [(1, 2)], tmp_path / p, base_seed=5)
        assert manifest["precision"] == p and {im["precision"] for im in manifest["images"]} == {p}
        with Image.open(tmp_path / p / "images" / "00000.png") as im:
            assert im.text["precision"] == p
            out[p] = torch.tensor(np.array(im.convert("RGB")), dtype=torch.int32)
        assert json.loads((tmp_path / p / "manifest.json").read_text())["precision"] == p
    # bf16 rounds the model's output: the same seed gives a nearby image, not the same one
    diff = (out["bf16"] - out["fp32"]).abs().float()
    assert diff.mean() < 8
