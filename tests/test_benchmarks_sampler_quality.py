"""benchmarks/sampler_quality.py: the choice rule on hand-made rows, and the script end to end on a tiny
random checkpoint and a tiny data set (the numbers mean nothing there; the rows, caching and output do)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusion.checkpoint import save_checkpoint
from diffusion.samplers import model_calls
from diffusion.schedules import NoiseSchedule, ScheduleConfig
from diffusion.spec import DEFAULT_SETTINGS, format_guidance_interval
from diffusion.unet import UNet, UNetConfig
from tests.fixtures import CIFAR10_CLASSES, make_images, write_tar

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sampler_quality.py"


@pytest.fixture(scope="module")
def bench():
    """The script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("benchmarks_sampler_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def row(bench, name: str, guidance: float, fd: float, fidelity: float):
    sampler, steps = name.split("-")
    return bench.Row(sampler, int(steps), guidance, fd, fidelity)


# ---- the choice rule -------------------------------------------------------------------------

def test_fewest_calls_within_tolerance_of_ddpm1000(bench):
    rows = [row(bench, "ddpm-1000", 1.0, 10.0, 0.50),
            row(bench, "ddim-100", 1.0, 10.2, 0.52),
            row(bench, "ddim-50", 1.0, 10.49, 0.46),   # FD +4.9%, fidelity -4 points: passes
            row(bench, "dpmpp-20", 1.0, 10.3, 0.44),   # FD fine but fidelity -6 points (absolute): fails
            row(bench, "dpmpp-10", 1.0, 10.6, 0.55)]   # FD +6%: fails
    (c,) = bench.choose(rows, 0.05)
    assert c.reference is rows[0] and c.reference_is_ddpm1000
    assert c.chosen is rows[2]
    assert [r.name for r in c.passing] == ["ddpm-1000", "ddim-100", "ddim-50"]
    # a looser tolerance (7%: FD up to 10.7, fidelity down to 0.43) lets cheaper ones in; equal calls: lower FD
    assert bench.choose(rows, 0.07)[0].chosen.name == "dpmpp-10"
    rows.append(row(bench, "ddim-10", 1.0, 10.65, 0.50))
    assert bench.choose(rows, 0.07)[0].chosen.name == "dpmpp-10"
    rows[-1].frechet_distance = 10.55
    assert bench.choose(rows, 0.07)[0].chosen.name == "ddim-10"


def test_reference_is_the_slowest_setting_without_ddpm1000_per_guidance(bench):
    rows = [row(bench, "ddpm-1000", 1.0, 10.0, 0.5), row(bench, "dpmpp-20", 1.0, 10.1, 0.5),
            # guided: no DDPM-1000, DDIM-100 (200 calls) is the slowest; ddpm-50 (100 calls) is not the reference
            row(bench, "ddpm-50", 1.5, 9.0, 0.6), row(bench, "ddim-100", 1.5, 8.0, 0.6),
            row(bench, "dpmpp-15", 1.5, 8.3, 0.6), row(bench, "dpmpp-10", 1.5, 8.5, 0.6)]
    unguided, guided = bench.choose(rows, 0.05)
    assert (unguided.guidance, unguided.reference.name, unguided.chosen.name) == (1.0, "ddpm-1000", "dpmpp-20")
    assert (guided.guidance, guided.reference.name, guided.chosen.name) == (1.5, "ddim-100", "dpmpp-15")
    assert unguided.reference_is_ddpm1000 and not guided.reference_is_ddpm1000
    assert [r.calls for r in rows] == [1000, 20, 100, 200, 30, 20]


def test_only_the_reference_within_tolerance(bench):
    rows = [row(bench, "dpmpp-10", 1.5, 20.0, 0.5), row(bench, "ddpm-1000", 1.5, 10.0, 0.5),
            row(bench, "ddim-50", 1.5, 10.0, 0.40)]  # same FD, fidelity 10 points lower
    (c,) = bench.choose(rows, 0.05)
    assert c.chosen is c.reference is rows[1] and c.passing == [rows[1]]


def test_settings_parsing(bench):
    assert bench.parse_settings("ddpm:1000, DDIM:50,dpmpp:10,dpmpp:10") == [("ddpm", 1000), ("ddim", 50),
                                                                            ("dpmpp", 10)]
    for bad in ("dpmpp", "foo:10", "dpmpp:500", "ddim:x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_settings(bad)
    assert bench.parse_guidances("1,1.5,1.0") == [1.0, 1.5]
    a = bench.parse_args(["--data", "d", "--skip-ddpm"])
    assert a.settings == [("ddim", 50), ("ddim", 100), ("dpmpp", 10), ("dpmpp", 15), ("dpmpp", 20),
                          ("dpmpp_sde", 10), ("dpmpp_sde", 15), ("dpmpp_sde", 20)]
    # the service default's sampler and steps are measured (time-spaced, as every row of the grid)
    assert (DEFAULT_SETTINGS.sampler, DEFAULT_SETTINGS.steps) in a.settings
    assert a.guidances == [1.0, bench.CLASSIC_GUIDANCE] and a.n_per_class == 100 and a.tolerance == 0.05
    # the service default guides inside an interval: its row is in the grid, held against guidance 4's reference
    d = DEFAULT_SETTINGS
    assert a.interval_guidances == ([(d.guidance, d.guidance_interval)] if d.guidance_interval else [])
    assert a.reference_guidance == bench.CLASSIC_GUIDANCE
    assert a.bootstrap == 1000
    for bad in (["--tolerance", "-0.1"], ["--bootstrap", "-1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--data", "d", *bad])


# ---- end to end ------------------------------------------------------------------------------

@pytest.fixture
def tiny(tmp_path):
    data = write_tar(tmp_path / "tiny.tar.gz", make_images(CIFAR10_CLASSES, 3),
                     make_images(CIFAR10_CLASSES, 3, offset=3), ext=".png")
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, ScheduleConfig("linear", 1000), CIFAR10_CLASSES,
                           {"note": "random weights, for tests"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield data, ckpt
    torch.set_num_threads(threads)


def test_end_to_end_rows_choice_and_cache(bench, tiny, tmp_path, capsys):
    data, ckpt = tiny
    argv = ["--checkpoint", str(ckpt), "--data", str(data), "--n-per-class", "2", "--settings",
            "ddpm:3,ddim:3,dpmpp:2", "--skip-ddpm", "--guidances", "1,1.5", "--interval-guidances", "", "--k", "2",
            "--feature-classifier",  # width 6: 3 features, so 20 images are enough for FD_inf (6 per feature)
            "mlp", "--feature-width", "6", "--feature-epochs", "1", "--device", "cpu", "--threads", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out.json")]
    first = bench.main(argv)
    out = capsys.readouterr().out
    rows = first["rows"]
    assert sorted((r.sampler, r.steps, r.guidance, r.calls) for r in rows) == [
        ("ddim", 3, 1.0, 3), ("ddim", 3, 1.5, 6), ("dpmpp", 2, 1.0, 2), ("dpmpp", 2, 1.5, 4)]
    assert [r.calls for r in rows] == sorted(r.calls for r in rows)  # cheapest first
    for r in rows:
        assert r.images == 20 and r.frechet_distance >= 0 and 0 <= r.class_fidelity <= 1
        assert 0 <= r.recall <= 1 and 0 <= r.coverage <= 1
        assert r.seconds_per_image > 0 and r.timing == "this run"
    # the chosen rows are the rule's answer on these rows, per guidance; the reference is DDIM-3, not DDPM-1000
    choices = first["choices"]
    assert [(c.guidance, c.reference.name) for c in choices] == [(1.0, "ddim-3"), (1.5, "ddim-3")]
    assert [c.chosen for c in choices] == [c.chosen for c in bench.choose(rows, 0.05)]
    assert not any(c.reference_is_ddpm1000 for c in choices)
    # paired intervals against the reference: none on the reference, estimate inside its interval elsewhere
    for c in choices:
        for r in c.rows:
            if r is c.reference:
                assert r.vs_reference is None
                continue
            est, lo, hi = r.vs_reference["class_fidelity"]
            assert lo <= est <= hi and est == pytest.approx(r.class_fidelity - c.reference.class_fidelity)
            est, lo, hi = r.vs_reference["frechet_distance_relative"]
            assert lo <= hi  # a percentile interval of a biased statistic need not hold the estimate
            assert est == pytest.approx(r.frechet_distance / c.reference.frechet_distance - 1, rel=1e-6)

    lines = out.splitlines()
    assert len([line for line in lines if line.startswith("real_train ")]) == 1
    table = [line for line in lines if line.split()[:1] in (["ddim"], ["dpmpp"])]
    assert len(table) == 4 and sum("reference" in line for line in table) == 2
    assert sum("<- chosen" in line for line in table) == 2
    assert all("+0.0%" in line for line in table if "reference" in line)
    assert "percentage points below the reference's (absolute)" in out
    assert "paired bootstrap over the 20 images" in out and sum("]pp" in line for line in table) == 2
    assert out.count("NOT DDPM-1000") == 2 and "service default now" in out
    assert all(r.fd_infinity is not None and math.isfinite(r.fd_infinity) for r in rows)
    fd_inf = [line for line in lines if line.startswith("  ") and "FD_inf" in line]
    assert len(fd_inf) == 4 and sum("(reference)" in line for line in fd_inf) == 2

    saved = json.loads((tmp_path / "out.json").read_text())
    assert [(r["sampler"], r["steps"], r["guidance"], r["model_calls_per_image"]) for r in saved["rows"]] == \
        [(r.sampler, r.steps, r.guidance, r.calls) for r in rows]
    assert saved["real_train"]["images"] == 20 and saved["choices"][0]["reference_is_ddpm1000"] is False
    assert saved["choices"][0]["chosen"] == choices[0].chosen.name
    assert sum(r["vs_reference"] is not None for r in saved["rows"]) == 2
    assert all(r["fd_infinity"] is not None for r in saved["rows"])

    # a rerun takes the feature classifier and every setting's images from the cache: same numbers; with a figure
    second = bench.main(argv[:-2] + ["--figure", str(tmp_path / "fig.png")])
    with Image.open(tmp_path / "fig.png") as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 4 * 60  # four panels
    for a, b in zip(rows, second["rows"]):
        assert (a.name, a.guidance) == (b.name, b.guidance)
        assert math.isclose(a.frechet_distance, b.frechet_distance, rel_tol=1e-6, abs_tol=1e-9)
        assert a.class_fidelity == b.class_fidelity and b.timing.startswith("cached") and b.seconds_per_image > 0
    assert "cached timing" in capsys.readouterr().out

    # an interrupted run (the first 10 of the 20 PNGs on disk) samples only the rest
    entry = Path(rows[0].cache_dir)
    for png in sorted((entry / "images").glob("*/*.png"))[10:]:
        png.unlink()
    third = bench.main(argv[:-2] + ["--batch-size", "10", "--settings", f"{rows[0].sampler}:{rows[0].steps}",
                                    "--guidances", str(rows[0].guidance), "--interval-guidances", ""])
    (resumed,) = third["rows"]
    assert resumed.timing == "this run" and resumed.seconds_per_image > 0
    # the resumed 10 were sampled in a batch of 10, not 20: the conv kernels round in a batch-dependent
    # order (about 1e-6 in the model's output), which can move a PNG value by one level, so not to 1e-6
    assert math.isclose(resumed.frechet_distance, rows[0].frechet_distance, rel_tol=1e-4)


def test_precisions_pair_each_bf16_row_with_its_fp32_row(bench, tiny, tmp_path, capsys):
    data, ckpt = tiny
    result = bench.main(["--checkpoint", str(ckpt), "--data", str(data), "--n-per-class", "2", "--settings", "ddim:2",
                         "--guidances", "1.5", "--interval-guidances", "", "--precisions", "bf16,fp32", "--k", "2",
                         "--feature-classifier", "mlp",
                         "--feature-width", "8", "--feature-epochs", "1", "--device", "cpu", "--threads", "1",
                         "--cache-dir", str(tmp_path / "cache")])
    rows = result["rows"]
    assert sorted((r.name, r.dtype) for r in rows) == [("ddim-2", "fp32"), ("ddim-2-bf16", "bf16")]
    (choice,) = result["choices"]
    assert choice.reference.dtype == "fp32"  # the exact arithmetic is the reference, whatever the order asked
    bf16 = next(r for r in rows if r.dtype == "bf16")
    assert bf16.vs_reference is not None and bf16.cache_dir != choice.reference.cache_dir
    assert " bf16 " in capsys.readouterr().out


def test_interval_rows_are_held_against_the_classic_reference(bench, tiny, tmp_path, capsys):
    """A row guided only inside a noise interval joins the group of --reference-guidance: its calls count only
    the guided steps, it has its own cache entry, and it is compared with that group's reference."""
    data, ckpt = tiny
    result = bench.main(["--checkpoint", str(ckpt), "--data", str(data), "--n-per-class", "2", "--settings", "ddim:3",
                         "--guidances", "1.5", "--interval-guidances", "2@0.28:5", "--k", "2",
                         "--feature-classifier", "mlp", "--feature-width", "8", "--feature-epochs", "1",
                         "--device", "cpu", "--threads", "1", "--cache-dir", str(tmp_path / "cache")])
    rows = result["rows"]
    # ddim-3 visits sigma 157, 3.5 and 0.01: only the middle step is inside (0.28, 5]
    assert [(r.guidance_label, r.calls) for r in rows] == [("2@0.28:5", 4), ("1.5", 6)]
    (choice,) = result["choices"]
    assert choice.guidance == 1.5 and choice.reference is rows[1] and len(choice.rows) == 2
    assert rows[0].vs_reference is not None and rows[0].cache_dir != rows[1].cache_dir
    assert "-g2-i0.28,5-" in Path(rows[0].cache_dir).name
    out = capsys.readouterr().out
    assert "2@0.28:5" in out and "held against guidance 1.5's reference" in out


def test_interval_rows_without_a_guided_reference(bench, tiny, tmp_path, capsys):
    """With no guided --guidances there is no --reference-guidance: an interval row is its own guidance's group
    (the report says so instead of failing on the missing weight)."""
    data, ckpt = tiny
    result = bench.main(["--checkpoint", str(ckpt), "--data", str(data), "--n-per-class", "2", "--settings", "ddim:3",
                         "--guidances", "1", "--interval-guidances", "2@0.28:5", "--k", "2",
                         "--feature-classifier", "mlp", "--feature-width", "8", "--feature-epochs", "1",
                         "--device", "cpu", "--threads", "1", "--cache-dir", str(tmp_path / "cache")])
    assert sorted(c.guidance for c in result["choices"]) == [1.0, 2.0]
    assert "held against the reference of their own guidance" in capsys.readouterr().out


def test_the_grid_stays_time_spaced_and_says_how_the_service_default_differs(bench, tiny, tmp_path, capsys):
    """The row of the default's sampler, steps, guidance and interval is sampled time-spaced like every grid row
    (its own cache entry, its calls counted on time-spaced steps), marked as not quite the service default, and
    the closing line names the default's spacing."""
    data, ckpt = tiny
    d = DEFAULT_SETTINGS
    label = bench.guidance_label(d.guidance, d.guidance_interval)
    result = bench.main(["--checkpoint", str(ckpt), "--data", str(data), "--n-per-class", "2", "--settings",
                         f"{d.sampler}:{d.steps}", "--guidances", "1.5", "--interval-guidances", label, "--k", "2",
                         "--feature-classifier", "mlp", "--feature-width", "8", "--feature-epochs", "1",
                         "--device", "cpu", "--threads", "1", "--cache-dir", str(tmp_path / "cache"),
                         "--out", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    (row,) = [r for r in result["rows"] if r.guidance_interval is not None]
    schedule = NoiseSchedule(ScheduleConfig("linear", 1000))
    time_spaced = replace(d, spacing="time")
    assert row.spacing == "time" and row.calls == model_calls(time_spaced, schedule)
    assert d.spacing == "time" or row.calls != model_calls(d, schedule)  # 29 and 25 on the shipped schedule
    name = Path(row.cache_dir).name  # a logsnr-spaced entry would end its settings with "-logsnr"
    assert f"-g{d.guidance:g}-i{format_guidance_interval(d.guidance_interval)}-seed0-" in name and "logsnr" not in name
    assert all(r["spacing"] == "time" for r in json.loads((tmp_path / "out.json").read_text())["rows"])
    (line,) = [line for line in out.splitlines() if line.startswith(d.sampler) and label in line]
    assert line.endswith("service default" if d.spacing == "time" else "as the service default but time-spaced")
    assert (f"service default now (diffusion/spec.py DEFAULT_SETTINGS): {d.sampler}-{d.steps} guidance {label}, "
            f"steps {d.spacing}-spaced") in out
    assert (d.spacing == "time") is ("(every row above: time-spaced)" not in out)


@pytest.mark.parametrize("text", ["6", "6@0.28", "6@2.9:0.28", "1@0.28:2.9", "x@0:1"])
def test_bad_interval_guidances(bench, text):
    with pytest.raises(argparse.ArgumentTypeError, match="bad interval guidance"):
        bench.parse_interval_guidances(text)
