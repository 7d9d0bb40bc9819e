"""PNG outputs: image grids (Pillow) and line plots (matplotlib, Agg backend)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from .data import tmp_path


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> [0, 255] uint8, same shape."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2) -> Image.Image:
    """images: [N, 3, H, W] uint8 -> one PIL image, ``nrow`` images per row, white padding."""
    n, c, h, w = images.shape
    ncol = nrow
    rows = (n + ncol - 1) // ncol
    grid = torch.full((c, rows * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = images[i]
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def loss_curve(metrics_jsonl: Path, out_png: Path) -> None:
    """Plot training loss (raw and smoothed) against step from a JSONL metrics log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    for line in metrics_jsonl.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            steps.append(rec["step"])
            losses.append(rec["loss"])
    if not steps:
        return
    smooth, acc = [], None
    for v in losses:
        acc = v if acc is None else 0.95 * acc + 0.05 * v
        smooth.append(acc)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, alpha=0.3, label="loss")
    ax.plot(steps, smooth, label="EMA-smoothed")
    ax.set_xlabel("step")
    ax.set_ylabel("eps-prediction MSE")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = tmp_path(out_png)  # a kill mid-write leaves the last curve, not a truncated file
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(out_png)
