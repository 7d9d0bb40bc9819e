"""benchmarks/sampling.py end to end with --quick on a tiny random checkpoint: every row is measured
and printed, with the header facts and the comparisons (the numbers themselves mean nothing here)."""
from __future__ import annotations

import importlib.util
import re
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from diffusion import precision
from diffusion.checkpoint import save_checkpoint
from diffusion.samplers import model_calls
from diffusion.schedules import NoiseSchedule, ScheduleConfig
from diffusion.spec import DEFAULT_SETTINGS, SamplerSettings, format_guidance_interval
from diffusion.unet import UNet, UNetConfig
from tests.fixtures import CIFAR10_CLASSES

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sampling.py"
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
TABLE_ROW = re.compile(r"^(ours|ours\+compile|\(a\) report|\(b\) diffusers) +(fp32|bf16) ")


def script_module(filename: str, monkeypatch):
    """benchmarks/<filename> as a module (benchmarks/ is not a package); torch's thread count restored afterwards."""
    spec = importlib.util.spec_from_file_location("benchmarks_" + filename.removesuffix(".py"),
                                                  SCRIPT.with_name(filename))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)


@pytest.fixture
def bench(monkeypatch):
    yield from script_module("sampling.py", monkeypatch)


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                            attn_resolutions=(8,), dropout=0.0))
    return save_checkpoint(tmp_path / "ckpt", model, ScheduleConfig("linear", 1000), CIFAR10_CLASSES,
                           {"dataset": "none (test)"})


def test_quick_run_measures_and_prints_every_row(bench, tiny_checkpoint, capsys):
    rows = bench.main(["--checkpoint", str(tiny_checkpoint), "--quick", "--skip-compile", "--threads", "1",
                       "--guidance", "1.5", "--guidance-interval", "all", "--precisions", "fp32,bf16"])
    out = capsys.readouterr().out

    expected = {("ours", p, layout, "1.5") for p in ("fp32", "bf16") for layout in ("NCHW", "channels_last")}
    expected |= {("ours", p, layout, "1.0") for p in ("fp32", "bf16") for layout in ("NCHW", "channels_last")}
    expected |= {("(a) report", "fp32", "NCHW", "1.0")}
    if HAS_DIFFUSERS:
        expected |= {("(b) diffusers", p, layout, g) for p in ("fp32", "bf16")
                     for layout in ("NCHW", "channels_last") for g in ("uncond", "1.5")}
    assert sorted((r.name, r.precision, r.layout, r.guidance) for r in rows) == sorted(expected)
    assert all(r.batch == 2 and len(r.rates) == 1 and r.rates[0] > 0 and r.flops > 0 for r in rows)

    report = next(r for r in rows if r.name == "(a) report")
    assert (report.steps, report.calls) == (1000, 1000) and "extrapolated from 1 of 1000 steps" in report.note
    (default,) = [r for r in rows if r.note.startswith("default")]
    # the service's path: the tests pin DREAMDATA_PRECISION=fp32, for which the layout is channels_last
    assert (default.precision, default.layout, default.steps, default.calls) == ("fp32", "channels_last", 2, 4)
    assert "the service's precision here (fp32): fp32 (requested)" in out
    for r in rows:  # a guided step is two model calls per image, an unguided one is one
        assert r.calls == r.steps * (2 if r.guidance == "1.5" else 1)

    assert len([line for line in out.splitlines() if TABLE_ROW.match(line)]) == len(rows)
    for needle in ("GFLOP per image per call", "peak fp32 torch.mm", "peak bf16 torch.mm", "sha256",
                   "speed-up vs (a)", "default row", "fastest row of ours"):
        assert needle in out, needle
    if HAS_DIFFUSERS:
        assert "UNet2DModel, class-conditional (random weights): 45,611 parameters (+0.00% vs ours)" in out
        for layout in ("NCHW", "channels_last"):
            assert re.search(rf"{layout}, +guided w=1.5 at every step, .* = \d+\.\d\dx", out)
            assert re.search(rf"{layout}, +unguided, .* = \d+\.\d\dx", out)
        assert re.search(r"guidance 1.5: vs diffusers fp32 \(its default\) in the same layout .* = \d+\.\d\dx; "
                         r"vs diffusers' fastest row \((fp32|bf16) (NCHW|channels_last)\) \d+\.\d\dx", out)


def test_a_guidance_interval_adds_rows_guided_at_every_step_for_diffusers(bench, tiny_checkpoint, capsys):
    # --quick runs 2 steps, at sigma 157 and 0.01: the interval (0, 1] guides the second only
    rows = bench.main(["--checkpoint", str(tiny_checkpoint), "--quick", "--skip-compile", "--threads", "1",
                       "--guidance", "1.5", "--guidance-interval", "0,1", "--precisions", "fp32,bf16"])
    out = capsys.readouterr().out
    calls = {(r.name, r.guidance, r.note.split(",")[0]): r.calls for r in rows}
    assert {c for (name, g, _), c in calls.items() if name == "ours" and g == "1.5i"} == {3}
    assert {c for (name, g, _), c in calls.items() if g == "1.5"} == {4}  # ours every step, and diffusers
    assert [r.guidance for r in rows if r.note.startswith("default")] == ["1.5i"]
    assert len([r for r in rows if r.name == "ours" and r.guidance == "1.5"]) == 4  # both precisions and layouts
    assert "in the noise interval (0,1] (guidance column '1.5i'): 3 model calls per image" in out
    if HAS_DIFFUSERS:
        assert all(r.calls == 4 for r in rows if r.name == "(b) diffusers" and r.guidance == "1.5")
        assert "guided only in (0,1]: 3 calls per image against diffusers' 4" in out
        assert re.search(r"guidance 1.5i: vs diffusers fp32 \(its default\) in the same layout .* = \d+\.\d\dx", out)


def test_unguided_settings_need_no_extra_row(bench, tiny_checkpoint, capsys):
    rows = bench.main(["--checkpoint", str(tiny_checkpoint), "--quick", "--skip-compile", "--skip-diffusers",
                       "--threads", "1", "--guidance", "1", "--batch-sizes", "1,3", "--n", "2",
                       "--precisions", "fp32,bf16"])
    assert sorted({r.batch for r in rows if r.name == "ours"}) == [1, 2]  # --n caps the batch sizes
    assert all(r.guidance == "1.0" and r.calls == r.steps for r in rows)
    assert len([r for r in rows if r.name == "ours"]) == 4 * 2  # no separate unguided row
    assert "the same unguided" not in capsys.readouterr().out


def recording_sample(module, monkeypatch) -> list[str]:
    """Replaces ``module.sample`` with the real sampler that also records each call's ``spacing``."""
    spacings, real = [], module.sample

    def recording(*args, **kwargs):
        spacings.append(kwargs.get("spacing", "time"))  # sample()'s own default
        return real(*args, **kwargs)
    monkeypatch.setattr(module, "sample", recording)
    return spacings


@pytest.mark.parametrize("spacing", [None, "time"])
def test_the_default_sampler_is_all_of_the_default_its_spacing_too(bench, tiny_checkpoint, capsys, monkeypatch,
                                                                   spacing):
    # 4 steps of the default interval: 4 model calls per image spaced in logSNR (DEFAULT_SETTINGS), 5 in time
    spacings = recording_sample(bench, monkeypatch)
    rows = bench.main(["--checkpoint", str(tiny_checkpoint), "--quick", "--skip-compile", "--skip-diffusers",
                       "--threads", "1", "--precisions", "fp32", "--steps", "4"]
                      + (["--spacing", spacing] if spacing else []))
    out = capsys.readouterr().out
    expected = replace(DEFAULT_SETTINGS, steps=4, spacing=spacing or DEFAULT_SETTINGS.spacing)
    schedule = NoiseSchedule(ScheduleConfig("linear", 1000))
    (default,) = [r for r in rows if r.note.startswith("default")]
    assert default.calls == model_calls(expected, schedule) == (4 if expected.spacing == "logsnr" else 5)
    assert spacings and set(spacings) == {expected.spacing}  # every row of ours, guided or not
    assert f"sampler {expected.sampler}, 4 steps ({expected.spacing}-spaced), guidance {expected.guidance:g}" in out
    assert f"{expected.sampler} 4 steps ({expected.spacing}-spaced), guidance" in out  # the speed-up's default row
    with pytest.raises(SystemExit):
        bench.parse_args(["--spacing", "sideways"])


@pytest.mark.parametrize("has_bf16", [True, False, None])
def test_bf16_rows_by_default_only_where_the_cpu_has_bf16_instructions(bench, tiny_checkpoint, capsys, monkeypatch,
                                                                       has_bf16):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: has_bf16)
    rows = bench.main(["--checkpoint", str(tiny_checkpoint), "--quick", "--skip-compile", "--skip-diffusers",
                       "--threads", "1", "--guidance", "1"])
    out = capsys.readouterr().out
    precisions = {r.precision for r in rows if r.name == "ours"}
    assert precisions == ({"fp32"} if has_bf16 is False else {"fp32", "bf16"})
    assert ("peak bf16 torch.mm" in out) is (has_bf16 is not False)
    assert ("bf16 rows left out: this CPU has no bf16 instructions" in out) is (has_bf16 is False)


def test_precisions_asked_for_and_the_ones_always_measured(bench, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    args = ["--checkpoint", str(tiny_checkpoint), "--quick", "--skip-compile", "--skip-diffusers", "--threads", "1",
            "--guidance", "1"]
    rows = bench.main(args + ["--precisions", "fp32"])
    assert {r.precision for r in rows} == {"fp32"} and "bf16 rows left out: --precisions fp32" in capsys.readouterr().out
    # the service's precision makes the default row, and fp32 is every comparison's reference
    rows = bench.main(args + ["--precisions", "bf16", "--precision", "bf16"])
    assert {r.precision for r in rows if r.name == "ours"} == {"fp32", "bf16"}
    with pytest.raises(SystemExit, match="--precisions"):
        bench.main(args + ["--precisions", "fp16"])


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers not installed")
def test_diffusers_scheduler_takes_the_same_kind_of_step_for_every_sampler(bench):
    from diffusion.samplers import SAMPLERS
    from diffusion.schedules import NoiseSchedule

    schedule = NoiseSchedule(ScheduleConfig("linear", 1000))
    expected = {"ddpm": ("DDPMScheduler", None), "ddim": ("DDIMScheduler", None),
                "dpmpp": ("DPMSolverMultistepScheduler", "dpmsolver++"),
                "dpmpp_sde": ("DPMSolverMultistepScheduler", "sde-dpmsolver++")}
    assert set(expected) == set(SAMPLERS)
    for sampler, (cls, algorithm) in expected.items():
        sc = bench.diffusers_scheduler(schedule, sampler)
        assert type(sc).__name__ == cls and getattr(sc.config, "algorithm_type", None) == algorithm, sampler


@pytest.fixture
def ab(monkeypatch):
    yield from script_module("sampling_ab.py", monkeypatch)


@pytest.fixture
def batch_bench(monkeypatch):
    yield from script_module("sampling_batch.py", monkeypatch)


def test_interleaved_ab_times_every_variant_in_every_round(ab, tiny_checkpoint, capsys):
    result = ab.main(["--checkpoint", str(tiny_checkpoint), "--threads", "1", "--batch", "2", "--rounds", "2",
                      "--steps", "3"])
    out = capsys.readouterr().out
    d = DEFAULT_SETTINGS
    schedule = NoiseSchedule(ScheduleConfig("linear", 1000))
    default = f"default (interval {format_guidance_interval(d.guidance_interval)})"
    names = list(result["rates"])
    assert names == [default, "every step"] + ["diffusers"] * HAS_DIFFUSERS
    assert all(len(v) == 2 and min(v) > 0 for v in result["rates"].values())
    calls = model_calls(SamplerSettings(d.sampler, 3, d.guidance, guidance_interval=d.guidance_interval,
                                        spacing=d.spacing), schedule)
    assert result["calls"] == {default: calls, "every step": 6, **({"diffusers": 6} if HAS_DIFFUSERS else {})}
    assert "round 2:" in out and f"{default} / every step: " in out and f"({d.spacing}-spaced)" in out
    r = result["ratios"][f"{default} / every step"]  # paired by round, not a ratio of medians
    rounds = [x / y for x, y in zip(result["rates"][default], result["rates"]["every step"])]
    assert r["rounds"] == rounds
    assert (r["min"], r["median"], r["max"]) == (min(rounds), statistics.median(rounds), max(rounds))


def test_interleaved_ab_can_time_the_reports_loop(ab, tiny_checkpoint, capsys):
    """--report-loop: DDPM at 1000 steps, unguided (the report's method) and guided as the default is, each
    timed in every round, and the default's speed over each (the 50x goal's ratio)."""
    result = ab.main(["--checkpoint", str(tiny_checkpoint), "--threads", "1", "--batch", "2", "--rounds", "1",
                      "--steps", "3", "--skip-diffusers", "--report-loop"])
    d = DEFAULT_SETTINGS
    schedule = NoiseSchedule(ScheduleConfig("linear", 1000))
    guided = model_calls(SamplerSettings("ddpm", 1000, d.guidance, 0.0, d.guidance_interval), schedule)
    assert result["calls"][ab.REPORT] == 1000 and result["calls"][ab.REPORT_GUIDED] == guided > 1000
    default = list(result["rates"])[0]
    for name in (ab.REPORT, ab.REPORT_GUIDED):
        r = result["ratios"][f"{default} / {name}"]
        assert r["rounds"] == [result["rates"][default][0] / result["rates"][name][0]]
    assert f"{default} / {ab.REPORT_GUIDED}: " in capsys.readouterr().out


def test_interleaved_ab_can_time_the_unfolded_upsampling_too(ab, tiny_checkpoint, capsys):
    result = ab.main(["--checkpoint", str(tiny_checkpoint), "--threads", "1", "--batch", "2", "--rounds", "1",
                      "--steps", "3", "--skip-diffusers", "--unfolded"])
    names = list(result["rates"])
    assert names[1:] == ["every step", "default, unfolded upsampling"]
    assert result["calls"][names[0]] == result["calls"]["default, unfolded upsampling"]
    assert f"{names[0]} / default, unfolded upsampling: " in capsys.readouterr().out
    diff = result["unfolded_difference"]
    assert diff["max"] <= 1 and diff["changed"] < 0.01  # the same maths: float rounding at most


def test_interleaved_ab_can_time_the_compiled_default(ab, tiny_checkpoint, capsys, cheap_compile):
    import torch._inductor.config as inductor_config

    compiled = cheap_compile
    result = ab.main(["--checkpoint", str(tiny_checkpoint), "--threads", "1", "--batch", "2", "--rounds", "1",
                      "--steps", "3", "--compile"])
    frozen = inductor_config.freezing
    out = capsys.readouterr().out
    names = list(result["rates"])
    assert names[1:] == ["every step", "default, compiled"] + ["diffusers"] * HAS_DIFFUSERS
    assert compiled == [("default", False)] and frozen
    assert result["calls"][names[0]] == result["calls"]["default, compiled"]
    assert "default, compiled: warm-up run (compiling)" in out
    assert f"{names[0]} / default, compiled: " in out
    if HAS_DIFFUSERS:
        assert "default, compiled / diffusers: " in out and "default, compiled / diffusers" in result["ratios"]


def test_image_difference_counts_8_bit_levels(ab):
    a = torch.zeros(1, 3, 2, 2)
    b = a.clone()
    b[0, 0, 0, 0] = 2 / 127.5  # two levels up
    diff = ab.image_difference(a, b)
    assert diff == pytest.approx({"changed": 1 / 12, "mean": 2 / 12, "max": 2.0})


def test_sampling_batch_times_every_size_in_rotated_rounds(batch_bench, tiny_checkpoint, capsys, monkeypatch):
    module = batch_bench
    order = []
    real = module.sample

    def recording(model, schedule, labels, seeds, **kw):
        order.append(len(labels))
        return real(model, schedule, labels, seeds, **kw)
    monkeypatch.setattr(module, "sample", recording)
    times = module.main(["--checkpoint", str(tiny_checkpoint), "--batch-sizes", "1,2,3", "--rounds", "3",
                         "--steps", "2", "--threads", "1", "--precision", "fp32"])
    assert order == [1, 1, 2, 3, 2, 3, 1, 3, 1, 2]  # the warm-up, then each round starting one size later
    assert set(times) == {1, 2, 3} and all(len(v) == 3 and min(v) > 0 for v in times.values())
    out = capsys.readouterr().out
    assert "the default batch here (diffusion.precision.sampling_batch): 50" in out
    assert re.search(r"^ +3 +\d+\.\d{3} +\d+\.\d{3} +\d+\.\d{3} +\d+\.\d\dx  ", out, re.M), out
    with pytest.raises(SystemExit):
        module.main(["--checkpoint", str(tiny_checkpoint), "--batch-sizes", "0,2"])


@pytest.mark.parametrize("spacing", [None, "time"])
def test_sampling_batch_samples_all_of_the_default_its_spacing_too(batch_bench, tiny_checkpoint, capsys, monkeypatch,
                                                                   spacing):
    spacings = recording_sample(batch_bench, monkeypatch)
    batch_bench.main(["--checkpoint", str(tiny_checkpoint), "--batch-sizes", "1", "--rounds", "1", "--steps", "4",
                      "--threads", "1", "--precision", "fp32"] + (["--spacing", spacing] if spacing else []))
    expected = replace(DEFAULT_SETTINGS, steps=4, spacing=spacing or DEFAULT_SETTINGS.spacing)
    calls = model_calls(expected, NoiseSchedule(ScheduleConfig("linear", 1000)))
    assert spacings == [expected.spacing] * 2  # the warm-up and the round
    out = capsys.readouterr().out
    assert f"{expected.sampler} 4 steps ({expected.spacing}-spaced), guidance {expected.guidance:g}" in out
    assert f", {calls} model calls per image;" in out and calls == (4 if expected.spacing == "logsnr" else 5)


@pytest.fixture
def time_bench(monkeypatch):
    yield from script_module("sampling_time.py", monkeypatch)


def test_sampling_time_rows_keep_their_time_spaced_steps(time_bench, tiny_checkpoint, monkeypatch):
    """Its rows (DDPM 1000, DDIM 50, DPM-Solver++ 20, guided at every step or not at all) are not the service
    default: they stay time-spaced whatever DEFAULT_SETTINGS.spacing is."""
    from diffusion.checkpoint import load_checkpoint

    spacings = recording_sample(time_bench, monkeypatch)
    seconds = time_bench.time_sampler(load_checkpoint(tiny_checkpoint), 2, "dpmpp", 3, DEFAULT_SETTINGS.guidance,
                                      False, None)
    assert seconds > 0 and spacings == ["time"]


@pytest.mark.parametrize("has_bf16", [True, False])
def test_training_throughput_times_bf16_only_where_the_cpu_has_it(monkeypatch, capsys, has_bf16):
    bench = next(script_module("training_throughput.py", monkeypatch))
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: has_bf16)
    args = ["--config", "tiny", "--threads", "1", "--steps", "1", "--warmup", "0", "--repeats", "1"]
    bench.main(args)
    out = capsys.readouterr().out
    rows = re.findall(r"^(fp32|bf16) +(NCHW|channels_last) +\d", out, re.M)
    assert rows == [("fp32", "NCHW"), ("fp32", "channels_last")] + (
        [("bf16", "NCHW"), ("bf16", "channels_last")] if has_bf16 else [])
    assert ("bf16 rows left out: this CPU has no bf16 instructions" in out) is (not has_bf16)
    bench.main(args + ["--precisions", "bf16"])  # asked for: timed anyway
    assert re.findall(r"^(fp32|bf16) ", capsys.readouterr().out, re.M) == ["bf16", "bf16"]
    with pytest.raises(SystemExit):
        bench.main(args + ["--precisions", "fp16"])


@pytest.fixture
def compile_bench(monkeypatch):
    yield from script_module("compile_ab.py", monkeypatch)


def test_compile_ab_child_times_the_compiled_model_after_a_whole_warm_up_run(compile_bench, tiny_checkpoint, capsys,
                                                                             cheap_compile):
    import json

    compile_bench.main(["--child", "compiled", "--checkpoint", str(tiny_checkpoint), "--threads", "1", "--batch",
                        "2", "--runs", "2", "--precision", "fp32"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["variant"] == "compiled" and len(res["rates"]) == 2 and min(res["rates"]) > 0
    assert cheap_compile == [("default", False)] and res["precision"] == "fp32 channels_last"
    compile_bench.main(["--child", "eager", "--checkpoint", str(tiny_checkpoint), "--threads", "1", "--batch", "2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["variant"] == "eager"
    assert cheap_compile == [("default", False)]  # the eager child compiles nothing


def test_compile_ab_child_samples_all_of_the_default_its_spacing_too(compile_bench, tiny_checkpoint, capsys,
                                                                     monkeypatch):
    import diffusion.samplers

    spacings = recording_sample(diffusion.samplers, monkeypatch)  # the child imports it when it runs
    compile_bench.main(["--child", "eager", "--checkpoint", str(tiny_checkpoint), "--threads", "1", "--batch", "2",
                        "--runs", "1", "--precision", "fp32"])
    assert spacings == [DEFAULT_SETTINGS.spacing] * 2  # the warm-up run and the timed one


def test_compile_ab_alternates_fresh_processes_and_pairs_each_round(compile_bench, monkeypatch, capsys):
    import json
    import subprocess

    calls = []
    rate = {"eager": iter([1.0, 2.0, 1.0]), "compiled": iter([1.5, 2.0, 1.2])}

    def fake_run(argv, **kwargs):
        variant = argv[argv.index("--child") + 1]
        calls.append((variant, argv[argv.index("--precision") + 1], argv[argv.index("--layout") + 1]))
        out = json.dumps({"variant": variant, "rates": [next(rate[variant])], "warmup_s": 1.0, "precision": "x"})
        return subprocess.CompletedProcess(argv, 0, stdout=out + "\n")

    monkeypatch.setattr(compile_bench.subprocess, "run", fake_run)
    result = compile_bench.main(["--rounds", "3", "--precision", "fp32"])
    assert [v for v, _, _ in calls] == ["eager", "compiled", "compiled", "eager", "eager", "compiled"]  # rotated
    assert {(p, layout) for _, p, layout in calls} == {("fp32", "channels_last")}  # decided once, for every child
    assert result["ratios"] == pytest.approx([1.5, 1.0, 1.2])
    out = capsys.readouterr().out
    assert "compiled / eager, per round: 1.20x [1.00, 1.50]" in out
    d = DEFAULT_SETTINGS
    assert f"the default sampler: {d.sampler}, {d.steps} steps ({d.spacing}-spaced), guidance {d.guidance:g} " in out


def test_compile_parity_compares_both_models_with_each_other_and_a_cache_entry(monkeypatch, tiny_checkpoint, tmp_path,
                                                                               capsys, cheap_compile):
    """The images of a synthetic-set cache entry, sampled eager, against the script's eager and compiled runs of
    the same seeds (j 0..1 of every class: the entry's first batch of 20, so even float rounding is the same)."""
    from diffusion.spec import DEFAULT_SETTINGS
    from training.synthetic_cache import synthetic_images

    parity = next(script_module("compile_parity.py", monkeypatch))
    _, info = synthetic_images(tiny_checkpoint, 3, DEFAULT_SETTINGS, cache_dir=tmp_path, precision="fp32",
                               batch_size=20)
    rows = parity.main(["--checkpoint", str(tiny_checkpoint), "--threads", "1", "--first", "0", "--per-class", "2",
                        "--cache", info["cache_dir"]])
    # the same seeds and all of the default's settings (its spacing too: time-spaced steps make other images), exactly
    assert rows["eager vs cache"]["max"] == 0 and rows["eager vs cache"]["images"] == 20
    assert rows["eager vs compiled"]["max"] <= 1 and cheap_compile == [("default", False)]
    out = capsys.readouterr().out
    assert re.search(r"^eager vs compiled +\d+ +[\d.]+% +\d+ of 20$", out, re.M)
    assert "compiled vs cache" in out
    d = DEFAULT_SETTINGS
    assert f"{d.sampler} {d.steps} steps ({d.spacing}-spaced)" in out
