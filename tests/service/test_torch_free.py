"""The API never imports torch: the image it runs in does not need it (DESIGN: app -> task names)."""
from __future__ import annotations

import subprocess
import sys

from .service_testlib import REPO

CHECK = """
import sys
import app.main
assert 'torch' not in sys.modules, 'import app.main imported torch'
app.main.create_app().openapi()
import worker.tasks, worker.celery_app, worker.serve  # the worker's main process stays torch-free too
bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))
assert not bad, bad
print('ok')
"""


def test_import_app_main_leaves_torch_out():
    r = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
