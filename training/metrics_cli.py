"""``dreamdata metrics``: Frechet distance, precision/recall, density/coverage and class fidelity of a
checkpoint's images (``training.generator_metrics``), printed as JSON.

    dreamdata metrics --data ../shared/data/cifar10-jpeg.tar.gz --n-per-class 100
    dreamdata metrics --checkpoint runs/cpu/checkpoint --data ... --n-per-class 500 --sampler ddim --steps 50 \\
        --guidance 2 --inception-weights ~/weights/inception_v3_google-0cc3c7bd.pth --out metrics.json

The first run per data set trains the feature classifier (cached under --cache-dir); later runs reuse it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm


from .classifiers import CLASSIFIERS, DEFAULT_WIDTH
from .generator_metrics import MetricsSettings, measure_generator
from .sample_cli import add_sampler_args, as_options


def add_feature_args(p: argparse.ArgumentParser) -> None:
    """The feature classifier and where it runs: shared by `dreamdata metrics` and benchmarks/sampler_quality.py."""
    p.add_argument("--feature-classifier", choices=CLASSIFIERS, default="cnn", help="default cnn")
    p.add_argument("--feature-width", type=int, default=None,
                   help=f"feature classifier width (default cnn {DEFAULT_WIDTH['cnn']}, mlp {DEFAULT_WIDTH['mlp']})")
    p.add_argument("--feature-epochs", type=int, default=10, help="feature classifier epochs (default 10)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cache-dir", default=None, help="cache folder (default $DREAMDATA_CACHE or ~/.cache/dreamdata)")


def add_metrics_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the shipped checkpoints/cifar10)")
    p.add_argument("--data", required=True, help="data set with train and test splits")
    p.add_argument("--n-per-class", type=int, default=100, help="generated images per class (default 100)")
    add_sampler_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed base: generated image j of class c gets seed S + c x 1,000,000 + j (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="images per sampling batch (default 50 on a CPU, 256 on a GPU)")
    p.add_argument("--k", type=int, default=5, help="neighbours for precision/recall, density/coverage (default 5)")
    p.add_argument("--inception-weights", default=None,
                   help="local torchvision inception_v3 state dict: adds an Inception-space Frechet distance")
    add_feature_args(p)
    p.add_argument("--out", default=None, help="also write the JSON to this file")


def run_metrics(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    s = MetricsSettings(
        data=args.data, checkpoint=args.checkpoint, n_per_class=args.n_per_class, sampler=args.sampler,
        steps=args.steps, guidance=args.guidance, eta=args.eta,
        guidance_interval=args.guidance_interval, spacing=args.spacing, seed=args.seed, batch_size=args.batch_size, k=args.k,
        feature_classifier=args.feature_classifier, feature_width=args.feature_width,
        feature_epochs=args.feature_epochs, inception_weights=args.inception_weights, device=args.device,
        cache_dir=args.cache_dir, precision=args.precision)
    try:  # checked again first thing in measure_generator; here to name the options in the message
        s.validate()
    except ValueError as e:
        raise ValueError(as_options(str(e), MetricsSettings)) from None
    if args.out and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder; name a file for the JSON")
    bars: list[tqdm] = []  # opened at the first call: the feature classifier trains under its own bar before

    def progress(fraction: float) -> None:
        if not bars:
            bars.append(tqdm(total=100, dynamic_ncols=True, desc="sampling the generated images",
                             bar_format="{percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {desc}"))
        bars[0].n = round(100 * fraction, 1)
        bars[0].refresh()

    try:
        result = measure_generator(s, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    text = json.dumps(result, indent=1)
    print(text)  # first: a --out that cannot be written loses nothing
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
