"""benchmarks/step_spacing.py end to end on a tiny random checkpoint and data set (the numbers mean nothing there;
the rows and their pairing do). The logSNR spacing itself is tested in tests/diffusion/test_samplers.py."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import diffusion.samplers as samplers
from diffusion.checkpoint import save_checkpoint
from diffusion.schedules import ScheduleConfig
from diffusion.unet import UNet, UNetConfig
from tests.fixtures import CIFAR10_CLASSES, make_images, write_tar

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_spacing.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmarks_step_spacing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture
def tiny(tmp_path):
    """A tiny data set (3 images per class and split) and a random tiny checkpoint."""
    data = write_tar(tmp_path / "tiny.tar.gz", make_images(CIFAR10_CLASSES, 3),
                     make_images(CIFAR10_CLASSES, 3, offset=3), ext=".png")
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0))
    return data, save_checkpoint(tmp_path / "ckpt", model, ScheduleConfig("linear", 1000), CIFAR10_CLASSES, {})


def run(bench, tiny, tmp_path, *extra):
    """The script at the tiny size (fp32, one feature epoch, 20 resamples), its cache in tmp_path."""
    data, ckpt = tiny
    return bench.main(["--data", str(data), "--checkpoint", str(ckpt), "--steps", "3", "--precision", "fp32",
                       "--feature-epochs", "1", "--feature-width", "4", "--bootstrap", "20", "--threads", "1",
                       "--cache-dir", str(tmp_path / "cache"), *extra])


def test_the_script_measures_both_spacings(bench, tiny, tmp_path, capsys):
    out = run(bench, tiny, tmp_path, "--n-per-class", "2", "--guidance", "6@0.28:4", "--logsnr-guidance", "8@0.28:4",
              "--out", str(tmp_path / "o.json"))
    rows = out["rows"]
    assert [(r["steps"], r["spacing"]) for r in rows] == [(3, "time"), (3, "logsnr")]
    assert rows[0]["timesteps"] == [999, 500, 0] and rows[1]["timesteps"] != rows[0]["timesteps"]
    assert all(r["images"] == 20 and r["frechet_distance"] >= 0 for r in rows)
    assert (rows[0]["guidance"], rows[1]["guidance"], rows[1]["guidance_interval"]) == (6.0, 8.0, (0.28, 4.0))
    assert "vs_time" not in rows[0] and set(rows[1]["vs_time"]) >= {"frechet_distance_relative", "class_fidelity"}
    assert json.loads((tmp_path / "o.json").read_text())["rows"][1]["spacing"] == "logsnr"
    assert "logsnr" in capsys.readouterr().out
    # both rows came through the synthetic cache: a second run reuses them
    again = run(bench, tiny, tmp_path, "--n-per-class", "2", "--guidance", "6@0.28:4", "--logsnr-guidance", "8@0.28:4")
    assert [r["source"] for r in again["rows"]] == ["cache", "cache"]
    for r, before in zip(again["rows"], rows):
        assert r["frechet_distance"] == pytest.approx(before["frechet_distance"], rel=1e-4)


def test_a_bad_logsnr_guidance_is_refused(bench, capsys):
    for bad in ("8", "8@4:0.28", "x@0.28:4"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--data", "x", "--logsnr-guidance", bad])
        assert "--logsnr-guidance: expected W@LO:HI" in capsys.readouterr().err


def test_the_two_rows_pair_image_by_image(bench, tiny, tmp_path, monkeypatch):
    """With the logSNR spacing swapped for the time spacing the two rows are the same images in the same order:
    no FD or fidelity difference (the rows pair image i with image i, same seed and class)."""
    monkeypatch.setattr(samplers, "logsnr_timesteps", lambda schedule, steps: samplers.timesteps_for(1000, steps))
    out = run(bench, tiny, tmp_path, "--n-per-class", "3", "--batch-size", "30")
    time_row, same = out["rows"]
    assert same["class_fidelity"] == time_row["class_fidelity"]
    assert same["frechet_distance"] == pytest.approx(time_row["frechet_distance"], rel=1e-3, abs=1e-3)
    assert same["vs_time"]["class_fidelity"][0] == 0
    # image i against image i in every resample: no spread at all (mispaired images would have one)
    assert max(abs(x) for x in same["vs_time"]["frechet_distance"]) < 1e-3, same["vs_time"]


def test_guidance_pairs_and_a_reference_row(bench, tiny, tmp_path, capsys):
    """--guidance twice: a time/logSNR pair of rows per setting; --reference-steps: a DDPM row first, every other
    row paired against it; every row has the k-NN measures."""
    out = run(bench, tiny, tmp_path, "--n-per-class", "2", "--guidance", "6@0.28:4", "--guidance", "2@0:1000",
              "--reference-steps", "4")
    rows = out["rows"]
    assert [(r["sampler"], r["steps"], r["spacing"], r["guidance"]) for r in rows] == [
        ("ddpm", 4, "time", 6.0), ("dpmpp_sde", 3, "time", 6.0), ("dpmpp_sde", 3, "logsnr", 6.0),
        ("dpmpp_sde", 3, "time", 2.0), ("dpmpp_sde", 3, "logsnr", 2.0)]
    assert rows[0]["reference"] and "vs_reference" not in rows[0] and "vs_time" not in rows[0]
    assert all("vs_reference" in r for r in rows[1:])
    assert ["vs_time" in r for r in rows[1:]] == [False, True, False, True]
    assert all(0 <= r[m] <= 1 for r in rows for m in ("precision", "recall", "coverage"))
    assert rows[3]["guidance_interval"] == (0.0, 1000.0)
    table = capsys.readouterr().out
    assert "reference" in table and "FD vs ref" in table and "coverage" in table


def test_bad_guidance_options_are_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--data", "x", "--guidance", "6@0.28:4", "--guidance", "8@0.28:4",
                          "--logsnr-guidance", "8@0.28:4"])
    assert "--logsnr-guidance goes with one --guidance" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--data", "x", "--guidance", "6"])
    assert "--guidance: expected W@LO:HI" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--data", "x", "--reference-steps", "1"])
    assert "--reference-steps" in capsys.readouterr().err


def test_another_seed_set_and_fd_infinity(bench, tiny, tmp_path, monkeypatch, capsys):
    """--seed samples other images (their own cache entries); rows with FD_inf get it and its relative differences
    (FD_inf itself is tested in tests/training; here it is stubbed so the tiny sets count as large enough)."""
    base = run(bench, tiny, tmp_path, "--n-per-class", "2", "--reference-steps", "4")["rows"]
    assert all(r["frechet_distance_infinity"] is None for r in base)  # 20 images in 32 features: too few
    assert "FD_inf" not in capsys.readouterr().out
    monkeypatch.setattr(bench, "frechet_distance_infinity", lambda feats, stats: float(feats.float().std() + 1))
    monkeypatch.setattr(bench, "FD_INF_IMAGES_PER_FEATURE", 0)
    other = run(bench, tiny, tmp_path, "--n-per-class", "2", "--reference-steps", "4", "--seed", "7")["rows"]
    assert [r["source"] for r in other] == ["sampled"] * 3
    assert all(r["frechet_distance"] != b["frechet_distance"] for r, b in zip(other, base))
    assert sorted(p.name.split("-seed")[1][0] for p in (tmp_path / "cache" / "synthetic").iterdir()) == ["0"] * 3 + ["7"] * 3
    ref, timed, logsnr = other
    assert logsnr["fd_infinity_vs_time"] == pytest.approx(
        logsnr["frechet_distance_infinity"] / timed["frechet_distance_infinity"] - 1)
    assert timed["fd_infinity_vs_reference"] == pytest.approx(
        timed["frechet_distance_infinity"] / ref["frechet_distance_infinity"] - 1)
    table = capsys.readouterr().out
    assert "FD_inf vs ref" in table and "seed base 7" in table
