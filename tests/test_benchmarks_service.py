"""benchmarks/service.py end to end on its tiny random checkpoint: a real service (bundled Redis, a
worker, the API) is started, measured and stopped, and every row of the table is printed."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
