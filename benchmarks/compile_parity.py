"""Are the compiled model's images (``diffusion.precision.compile_for_sampling``) the eager model's images?

The same seeds through the default sampler (all of ``DEFAULT_SETTINGS``, its step spacing included), eager and
compiled, compared as they are saved (uint8 pixel values); and, with ``--cache``, both against a synthetic-set
cache entry's PNGs (the images a long job such as ``dreamdata evaluate`` sampled earlier, eager or ``--compile``;
an entry of the default's settings: one sampled under an earlier default holds other images).
Image j of class c has the synthetic sets' seed (base seed + c * CLASS_SEED_STRIDE + j), for j from ``--first``
on, every class in one batch, j-major, as the sets are sampled. Prints one row per comparison: the largest
difference (levels of 255), the share of values that differ, and how many images are identical.

    python benchmarks/compile_parity.py [--checkpoint checkpoints/cifar10] [--threads 2] [--precision fp32]
        [--first 1000] [--per-class 5] [--cache ~/.cache/dreamdata/synthetic/<entry>]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from diffusion.checkpoint import load_for_sampling
from diffusion.precision import compile_for_sampling
from diffusion.samplers import sample
from diffusion.spec import DEFAULT_SETTINGS as D
from training.plots import to_uint8
from training.synthetic_cache import image_specs, load_pngs

ROOT = Path(__file__).resolve().parent.parent


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Two stacks of uint8 images [N, C, H, W]: largest difference, share of values differing, identical images."""
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max": int(d.max()), "differing": float((d > 0).mean()),
            "identical": int((d.reshape(len(d), -1) == 0).all(axis=1).sum()), "images": len(d)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "cifar10"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="fp32", help="auto, fp32, bf16 (default fp32)")
    p.add_argument("--first", type=int, default=0, help="first image index j of every class (default 0)")
    p.add_argument("--per-class", type=int, default=5, help="images of every class (default 5: one batch of 50)")
    p.add_argument("--base-seed", type=int, default=0, help="the set's base seed (default 0)")
    p.add_argument("--cache", type=Path, default=None, help="a synthetic-set cache entry (its images/<c>/ folders)")
    a = p.parse_args(argv)
    if min(a.threads, a.per_class) < 1 or a.first < 0:
        p.error("--threads and --per-class must be at least 1, --first at least 0")
    torch.set_num_threads(a.threads)
    ckpt = load_for_sampling(a.checkpoint, "cpu", a.precision)
    k = ckpt.model.config.num_classes
    specs = image_specs(a.first + a.per_class, k, a.base_seed)[a.first * k:]
    labels = torch.tensor([s.class_index for s in specs])
    seeds = [s.seed for s in specs]

    def run(model: torch.nn.Module) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        x = sample(model, ckpt.schedule, labels, seeds, sampler=D.sampler, steps=D.steps, guidance=D.guidance,
                   guidance_interval=D.guidance_interval, spacing=D.spacing, autocast=ckpt.precision.bf16)
        return to_uint8(x).numpy(), time.perf_counter() - t0

    eager, t_eager = run(ckpt.model)
    compiled, t_compiled = run(compile_for_sampling(ckpt.model))  # includes compiling its shapes
    rows = {"eager vs compiled": compare(eager, compiled)}
    if a.cache is not None:
        cached = load_pngs(a.cache, specs)[0].numpy()
        rows["eager vs cache"] = compare(eager, cached)
        rows["compiled vs cache"] = compare(compiled, cached)
    print(f"{len(specs)} images (j {a.first}..{a.first + a.per_class - 1} of {k} classes), {D.sampler} {D.steps} "
          f"steps ({D.spacing}-spaced), {ckpt.precision.reason}; eager {t_eager:.1f} s, compiled {t_compiled:.1f} s "
          "(with compiling)")
    print(f"{'comparison':<20} {'max diff':>8} {'values differing':>17} {'identical images':>17}")
    for name, r in rows.items():
        print(f"{name:<20} {r['max']:>8} {r['differing']:>16.3%} {r['identical']:>10} of {r['images']}")
    return rows


if __name__ == "__main__":
    main()
