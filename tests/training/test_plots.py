"""training.plots: image grids and the loss curve."""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from training.plots import image_grid, loss_curve, to_uint8


def test_to_uint8():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255]
    assert to_uint8(x).dtype == torch.uint8


def test_image_grid_layout():
    imgs = torch.stack([torch.full((3, 4, 5), 10 * i, dtype=torch.uint8) for i in range(5)])
    g = image_grid(imgs, nrow=2, pad=1)
    assert g.size == (2 * 6 + 1, 3 * 5 + 1)  # (width, height): 2 columns, 3 rows
    a = torch.from_numpy(np.array(g)).permute(2, 0, 1)
    assert int(a[0, 0, 0]) == 255  # padding is white
    assert int(a[0, 1, 1]) == 0 and int(a[0, 1, 7]) == 10 and int(a[0, 6, 1]) == 20  # row-major order
    assert int(a[0, 11, 7]) == 255  # the unused last cell stays white


def test_loss_curve(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 20))
                 + json.dumps({"step": 20, "fid": 3.0}) + "\n")
    loss_curve(m, tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as im:
        assert im.format == "PNG" and im.size == (700, 400)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    loss_curve(empty, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
