"""The precision of sampling calls: the auto rule, the requested one, and where the choice shows."""
import json
from types import SimpleNamespace

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
    def fake_time(model, bf16, channels_last, device, give_up_after=float("inf")):  # cl faster in fp32, NCHW in bf16
        fp32 = 1.0 if channels_last else 1.3
        return (1.0 / bf16_speedup) * (1.0 if not channels_last else 1.1) if bf16 else fp32

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
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


@pytest.mark.parametrize("bf16,other_speedup,expect_cl", [
    (True, 1.05, False), (True, 1.2, True),     # bf16: NCHW, as forced, unless channels_last has the margin
    (False, 1.05, True), (False, 1.2, False),   # fp32: channels_last, as forced, unless NCHW has it
])
def test_auto_keeps_the_forced_layout_unless_the_other_has_the_margin(monkeypatch, bf16, other_speedup, expect_cl):
    """The layouts round differently, so a seed's image follows the layout: a near tie must not flip it from
    one load to the next, and auto then gives the images of the forced precision."""
    forced_cl = precision.FORCED_CHANNELS_LAST[bf16]

    def fake_time(model, b, channels_last, device, give_up_after=float("inf")):
        if b != bf16:
            return 10.0  # the other precision loses (bf16 needs its margin: 10 against 1 either way)
        return 1.0 if channels_last == forced_cl else 1.0 / other_speedup

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(precision, "_time_forward", fake_time)
    monkeypatch.setattr(precision, "_AUTO_CACHE", {})
    choice = precision.choose_precision(make_tiny_unet(), "auto")
    assert choice.bf16 is bf16 and choice.channels_last is expect_cl
    forced = precision.choose_precision(make_tiny_unet(), "bf16" if bf16 else "fp32")
    assert forced.channels_last is forced_cl
    assert (choice.channels_last == forced.channels_last) is (other_speedup < precision.LAYOUT_MARGIN)


@pytest.mark.parametrize("has_bf16", [False, None])
def test_auto_does_not_time_bf16_on_a_cpu_without_bf16_instructions(monkeypatch, has_bf16):
    timed = []

    def fake_time(model, bf16, channels_last, device, give_up_after=float("inf")):
        timed.append((bf16, channels_last))
        return 50.0 if bf16 else (1.0 if channels_last else 1.3)  # bf16 emulated: far slower

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: has_bf16)
    monkeypatch.setattr(precision, "_time_forward", fake_time)
    monkeypatch.setattr(precision, "_AUTO_CACHE", {})
    choice = precision.choose_precision(make_tiny_unet(), "auto")
    assert (choice.name, choice.layout) == ("fp32", "channels_last")
    if has_bf16 is False:  # torch says the CPU has no bf16 instructions: bf16 is not even timed
        assert timed == [(False, False), (False, True)]
        assert set(choice.timings) == {"fp32 NCHW", "fp32 channels_last"}
        assert "no bf16 instructions" in choice.reason and "bf16 not timed" in choice.reason
    else:  # torch cannot tell: all four are timed, and the margin rule decides
        assert len(timed) == 4 and "0.02x" in choice.reason


def test_a_variant_far_slower_than_the_best_so_far_is_timed_once(monkeypatch):
    model = make_tiny_unet()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    monkeypatch.setattr(precision, "PROBE_BATCH", 2)
    # the warm-up pass takes longer than it may: its seconds stand for the variant, no repeats
    seconds = precision._time_forward(model, False, False, torch.device("cpu"), give_up_after=0.0)
    assert seconds > 0 and len(calls) == 1
    calls.clear()
    precision._time_forward(model, False, False, torch.device("cpu"))
    assert len(calls) == 1 + precision.PROBE_REPEATS
    # and the probe hands each variant the bound of SLOW_FACTOR x the best so far
    bounds = []

    def fake_time(model, bf16, channels_last, device, give_up_after=float("inf")):
        bounds.append(give_up_after)
        return {(False, False): 2.0, (False, True): 1.0, (True, False): 30.0, (True, True): 0.5}[(bf16, channels_last)]

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(precision, "_time_forward", fake_time)
    monkeypatch.setattr(precision, "_AUTO_CACHE", {})
    choice = precision.choose_precision(model, "auto")
    f = precision.SLOW_FACTOR
    assert bounds == [float("inf"), 2.0 * f, 1.0 * f, 1.0 * f]
    assert (choice.name, choice.layout) == ("bf16", "channels_last")


def test_cpu_has_bf16_answers_or_says_it_cannot_tell(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert precision.cpu_has_bf16() is True
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert precision.cpu_has_bf16() is False

    def broken():
        raise RuntimeError("private API changed")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", broken, raising=False)
    assert precision.cpu_has_bf16() is None


def test_auto_really_times_the_model(monkeypatch):
    monkeypatch.setattr(precision, "_AUTO_CACHE", {})
    monkeypatch.setattr(precision, "PROBE_BATCH", 2)
    choice = precision.choose_precision(make_tiny_unet(), "auto")
    fp32 = {"fp32 NCHW", "fp32 channels_last"}
    assert fp32 <= set(choice.timings) and all(v > 0 for v in choice.timings.values())
    assert choice.reason.startswith("auto: ")
    fastest = {p: min(choice.timings[f"{p} {layout}"] for layout in ("NCHW", "channels_last"))
               for p in ("fp32", "bf16") if f"{p} NCHW" in choice.timings}
    # the layout --precision forces with the precision chosen, unless the other beats it by the layout margin;
    # bf16 only with its margin (both on rounded timings: a hair of slack)
    forced = "channels_last" if precision.FORCED_CHANNELS_LAST[choice.bf16] else "NCHW"
    other = "NCHW" if forced == "channels_last" else "channels_last"
    t_forced, t_other = (choice.timings[f"{choice.name} {layout}"] for layout in (forced, other))
    if choice.layout == forced:
        assert t_other * precision.LAYOUT_MARGIN >= t_forced - 2e-4
    else:
        assert t_other * precision.LAYOUT_MARGIN <= t_forced + 2e-4
    if choice.bf16:
        assert fastest["bf16"] * precision.BF16_MARGIN <= fastest["fp32"] + 2e-4
    elif "bf16" in fastest:
        assert fastest["bf16"] * precision.BF16_MARGIN >= fastest["fp32"] - 2e-4


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
    assert 0 < diff.max() and diff.mean() < 8


def test_the_default_sampling_batch_is_the_devices_and_a_bad_one_is_refused(tmp_path):
    assert precision.sampling_batch("cpu") == precision.CPU_SAMPLING_BATCH == 50
    assert precision.sampling_batch(torch.device("cuda", 1)) == precision.GPU_SAMPLING_BATCH == 256
    ckpt = load_for_sampling(save_checkpoint(tmp_path / "ckpt", make_tiny_unet(), ScheduleConfig("linear", 1000),
                                             CLASSES, {}), precision="fp32")
    batches = []

    def counting_sample(model, schedule, labels, seeds, **kw):
        batches.append(len(labels))
        return torch.zeros(len(labels), 3, 8, 8)
    generate_to_dir(ckpt, [(0, 60)], tmp_path / "out", sample_fn=counting_sample)
    assert batches == [50, 10]  # no batch size given: the CPU's default
    with pytest.raises(ValueError, match="batch size must be at least 1, got 0"):
        generate_to_dir(ckpt, [(0, 2)], tmp_path / "zero", batch_size=0, sample_fn=counting_sample)


@pytest.mark.parametrize("cuda", [False, True])
def test_one_device_rule_for_the_worker_and_the_clis(monkeypatch, cuda):
    from training.sample_cli import pick_device
    from worker.settings import Settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.delenv("DREAMDATA_BATCH_SIZE", raising=False)
    expect = torch.device("cuda" if cuda else "cpu")
    assert precision.default_device() == pick_device("auto") == expect
    assert Settings().model_batch == precision.sampling_batch(expect)


@pytest.mark.parametrize("has_bf16, default", [(True, ["fp32", "bf16"]), (None, ["fp32", "bf16"]), (False, ["fp32"])])
def test_benchmarks_time_bf16_by_default_unless_the_cpu_has_no_bf16_instructions(monkeypatch, has_bf16, default):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: has_bf16)
    chosen, left_out = precision.benchmark_precisions(None)
    assert chosen == default
    assert (left_out == "bf16 rows left out: this CPU has no bf16 instructions (--precisions fp32,bf16 times them "
                        "anyway)") if has_bf16 is False else left_out is None
    assert precision.benchmark_precisions("bf16, fp32") == (["fp32", "bf16"], None)  # asked for: in fp32, bf16 order
    assert precision.benchmark_precisions("fp32") == (["fp32"], "bf16 rows left out: --precisions fp32")
    for bad in ("fp16", "", " , ", "fp32,fp16"):
        with pytest.raises(ValueError, match="--precisions: a comma-separated list of fp32 and bf16"):
            precision.benchmark_precisions(bad)


@pytest.mark.parametrize("capability, requested, bf16", [((9, 0), "auto", True), ((8, 0), "auto", True),
                                                          ((7, 5), "auto", False), ((7, 5), "bf16", True),
                                                          ((9, 0), "fp32", False)])
def test_auto_on_a_gpu_picks_bf16_only_where_it_is_native(monkeypatch, capability, requested, bf16):
    """A T4 or V100 (capability 7.x) emulates bf16, slower than fp32: auto takes fp32 there; asked for, bf16."""
    class OnTheGpu:  # choose_precision reads only the device of a GPU model's weights
        def parameters(self):
            yield SimpleNamespace(device=torch.device("cuda", 0))

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    choice = precision.choose_precision(OnTheGpu(), requested)
    assert choice.bf16 is bf16 and choice.channels_last is False
    assert ("no native bf16" in choice.reason) is (requested == "auto" and not bf16)
