"""benchmarks/service.py end to end on its tiny random checkpoint: a real service (bundled Redis, a
worker, the API) is started, measured and stopped, and every row of the table is printed; and the sampler
settings that it and benchmarks/dynamic_batching.py ask the service for (and sample with directly)."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion.spec import DEFAULT_SETTINGS, format_guidance_interval

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_prints_every_row_and_how_the_worker_loaded_the_model():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "service.py"), "--tiny", "--n", "4", "--repeats", "1",
                        "--requests", "20", "--clients", "2", "--memory-n", "8", "--threads", "1", "--poll", "0.05"],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert re.search(r"^worker: .*precision (auto|fp32|bf16)", out, re.M), out  # the worker's load line
    assert re.search(r"^direct: \S", out, re.M)
    for row in (r"4-image job, end to end \(median of 1, poll 0\.05 s\) +\d+\.\d+ s",
                r"of it running in the worker \(timings\.run_seconds\) +\d+\.\d+ s",
                r"sampler called directly, same batches +\d+\.\d+ s",
                r"service overhead vs generate_to_dir +[+-]\d+\.\d %",
                r"GET /jobs/\{id\}, 2 clients, 20 requests: median +\d+\.\d ms",
                r"peak RSS during the job +\d+ MiB"):
        assert re.search(row, out), (row, out)
    # each round on its own, in the order the table's medians come from
    assert re.search(r"^  1 +(\d+\.\d{3} +){3}\d+\.\d{3}$", out, re.M), out
    d = DEFAULT_SETTINGS  # the settings line names all of the default, its step spacing too
    assert f"; {d.sampler} {d.steps} steps ({d.spacing}-spaced), guidance {d.guidance} " in out, out


def load_script(filename: str, monkeypatch):
    """benchmarks/<filename> as a module; benchmarks/service.py is also ``service`` while the test runs, as
    dynamic_batching.py imports it (run as a script, benchmarks/ is on its path)."""
    spec = importlib.util.spec_from_file_location("benchmarks_" + filename.removesuffix(".py"),
                                                  ROOT / "benchmarks" / filename)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    if filename == "dynamic_batching.py":
        monkeypatch.setitem(sys.modules, "service", load_script("service.py", monkeypatch))
    spec.loader.exec_module(module)
    return module


def default_request(spacing: str) -> dict:
    d = DEFAULT_SETTINGS
    return {"sampler": d.sampler, "steps": d.steps, "guidance": d.guidance,
            "guidance_interval": format_guidance_interval(d.guidance_interval), "spacing": spacing}


@pytest.mark.parametrize("spacing", [None, "time"])
def test_service_asks_for_all_of_the_default_its_spacing_too(monkeypatch, spacing):
    bench = load_script("service.py", monkeypatch)
    a = bench.parse_args(["--tiny"] + (["--spacing", spacing] if spacing else []))
    s = bench.settings(a)
    assert s.spacing == (spacing or DEFAULT_SETTINGS.spacing)
    if spacing is None:
        assert s == DEFAULT_SETTINGS
    assert bench.request_params(s, 7) == {"class": "cat", "n": 7, **default_request(s.spacing), "seed": 0}
    with pytest.raises(SystemExit):
        bench.parse_args(["--spacing", "sideways"])


def test_service_direct_runs_sample_with_the_spacing_too(monkeypatch, tmp_path):
    """The overhead rows' direct runs (the sampler alone, and generate_to_dir) use the same settings as the job."""
    import diffusion.samplers

    bench = load_script("service.py", monkeypatch)
    spacings, real = [], diffusion.samplers.sample

    def recording(*args, **kwargs):
        spacings.append(kwargs.get("spacing", "time"))  # sample()'s own default
        return real(*args, **kwargs)
    monkeypatch.setattr(diffusion.samplers, "sample", recording)  # direct() imports it when it runs
    s = bench.settings(bench.parse_args(["--tiny", "--steps", "2"]))
    t_sample, t_files, _ = bench.direct(bench.tiny_checkpoint(tmp_path / "ckpt"), 2, s, 2, tmp_path / "out")
    assert t_sample > 0 and t_files > 0 and (tmp_path / "out").is_dir()
    assert spacings == [DEFAULT_SETTINGS.spacing] * 2  # the warm-up batch and the timed one


@pytest.mark.parametrize("spacing", [None, "time"])
def test_dynamic_batching_asks_for_all_of_the_default_its_spacing_too(monkeypatch, spacing):
    bench = load_script("dynamic_batching.py", monkeypatch)
    a = bench.parse_args(["--tiny"] + (["--spacing", spacing] if spacing else []))
    assert bench.sampler_params(a) == default_request(spacing or DEFAULT_SETTINGS.spacing)
    with pytest.raises(SystemExit):
        bench.parse_args(["--spacing", "sideways"])
