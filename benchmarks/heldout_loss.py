"""Held-out denoising loss of checkpoints: the training objective on real test images with fixed
timesteps and fixed noise, so different checkpoints are scored on exactly the same problems.
Lower is better. Used to pick the shipped model size at equal training wall-clock.

    python benchmarks/heldout_loss.py --data ../shared/data/cifar10-jpeg.tar.gz runs/a/checkpoint runs/b/checkpoint
"""
from __future__ import annotations

import argparse
import json

import torch

from diffusion.checkpoint import load_checkpoint
from training.data import load_dataset, to_model_range


@torch.no_grad()
def heldout_loss(ckpt, x0: torch.Tensor, y: torch.Tensor, n_t: int = 10, batch: int = 250, seed: int = 0) -> dict:
    """Mean eps-MSE over every image at n_t evenly spaced timesteps (same noise for every checkpoint)."""
    T = ckpt.schedule.num_timesteps
    ts = torch.linspace(0, T - 1, n_t).round().long()
    g = torch.Generator().manual_seed(seed)
    per_t = []
    for t in ts:
        tot = 0.0
        for i in range(0, len(x0), batch):
            xb = x0[i: i + batch]
            noise = torch.randn(xb.shape, generator=g)
            tt = torch.full((len(xb),), int(t))
            xt = ckpt.schedule.q_sample(xb, tt, noise)
            eps = ckpt.model(xt.contiguous(memory_format=torch.channels_last), tt, y[i: i + batch])
            tot += float(((eps - noise) ** 2).mean()) * len(xb)
        per_t.append(tot / len(x0))
    return {"loss": sum(per_t) / len(per_t), "per_t": {int(t): round(v, 5) for t, v in zip(ts, per_t)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data", required=True)
    p.add_argument("--n", type=int, default=1000, help="test images used (class-balanced)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ds = load_dataset(a.data, "test")
    ds = ds.subset(a.n / len(ds), seed=0)
    x0, y = to_model_range(ds.images), ds.labels
    print(f"{'checkpoint':<50} {'params':>8} {'steps':>7} {'train min':>9} {'held-out loss':>13}")
    for path in a.checkpoints:
        ckpt = load_checkpoint(path)
        ckpt.model.to(memory_format=torch.channels_last)
        r = heldout_loss(ckpt, x0, y)
        prov = ckpt.provenance
        n_params = sum(q.numel() for q in ckpt.model.parameters())
        print(f"{path:<50} {n_params / 1e6:>7.2f}M {prov.get('steps', 0):>7} "
              f"{prov.get('wall_time_s', 0) / 60:>9.1f} {r['loss']:>13.5f}", flush=True)
        print("  per t:", json.dumps(r["per_t"]))


if __name__ == "__main__":
    main()
