"""benchmarks/fd_interval_coverage.py end to end at a tiny size (its counts mean little there; the table, the
check that the library's interval is the moved one, and the keys do)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fd_interval_coverage.py"


def test_the_coverage_script_runs_and_prints_its_table(capsys):
    spec = importlib.util.spec_from_file_location("benchmarks_fd_interval_coverage", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--features", "4", "--images", "30", "--draws", "4", "--boot", "30", "--fd-infinity"])
    table = capsys.readouterr().out
    assert "4 features, 30 paired images, 4 draws x 30 resamples" in table and "FD_inf" in table
    assert [(r["measure"], r["interval"]) for r in out["rows"]] == [
        ("difference", "percentile"), ("difference", "moved"), ("relative", "percentile"), ("relative", "moved")]
    assert all(0 <= r[k] <= 1 for r in out["rows"] for k in ("holds_expected_estimate", "holds_its_estimate"))
    assert out["truth"]["relative"] > 0  # generator a is the farther one from the real set
    assert set(out["fd_infinity_relative"]) == {"mean", "sd"}


def test_fd_infinity_with_too_few_images_is_refused_before_the_draws(capsys):
    import pytest

    spec = importlib.util.spec_from_file_location("benchmarks_fd_interval_coverage", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--features", "4", "--images", "23", "--fd-infinity"])
    assert e.value.code == 2 and "--fd-infinity needs --images >= 6 x --features (24), got 23" in capsys.readouterr().err
    assert module.parse_args(["--features", "4", "--images", "24", "--fd-infinity"]).images == 24
