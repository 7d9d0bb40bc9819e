"""``dreamdata evaluate``: real vs real+synthetic vs synthetic-only classifiers (``training.evaluate``).

    dreamdata evaluate --data ../shared/data/cifar10-jpeg.tar.gz --classifier cnn \\
        --synthetic-per-class 500 --real-fraction 0.1 --epochs 10 --seeds 0,1,2 --out out/eval-cnn
    dreamdata evaluate --checkpoint runs/cpu/checkpoint --data ... --classifier mlp --synthetic-per-class 1000 \\
        --real-fraction 1 --epochs 20 --seeds 0,1,2,3,4 --sampler ddim --steps 50 --guidance 2 --out out/eval-mlp

Writes OUT/report.json, OUT/report.md and PNG plots; prints a one-line JSON summary. Each finished
training run is saved in OUT/runs/ at once: the same command after an interruption trains only what is
left (``--restart`` trains everything again).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch
from tqdm import tqdm

from diffusion.checkpoint import load_for_sampling
from diffusion.precision import compile_for_sampling

from .classifiers import CLASSIFIERS, DEFAULT_WIDTH
from .evaluate import BUDGETS, CLASSIFIER_PRECISIONS, EvaluationSettings, run_evaluation
from .generate import default_checkpoint
from .sample_cli import add_sampler_args, arg_type, as_options, check_out_dir, pick_device


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` or ``"0-4"`` -> (0, 1, 2) / (0, 1, 2, 3, 4)."""
    seeds: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            a, dash, b = part.partition("-")
            if dash and int(b) < int(a):
                raise ValueError
            seeds.extend(range(int(a), int(b) + 1) if dash else [int(a)])
    except ValueError:
        raise ValueError(f"expected comma-separated seeds or a rising range like 0-4, got {text!r}") from None
    return tuple(seeds)


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the shipped checkpoints/cifar10)")
    p.add_argument("--data", required=True, help="data set: .tar.gz of an ImageFolder tree, cifar-10-batches-py, ...")
    p.add_argument("--classifier", choices=CLASSIFIERS, default="cnn", help="default cnn")
    p.add_argument("--width", type=int, default=None,
                   help=f"classifier width (default mlp {DEFAULT_WIDTH['mlp']}, cnn {DEFAULT_WIDTH['cnn']}; "
                        "cnn 64 is Page's full ResNet-9, for a GPU)")
    p.add_argument("--synthetic-per-class", type=int, default=500, help="k synthetic images per class (default 500)")
    p.add_argument("--real-fraction", type=float, default=0.1,
                   help="class-balanced share of the real training set, 0 < f <= 1 (default 0.1)")
    p.add_argument("--epochs", type=int, default=10,
                   help="epochs of the real arm; see --budget for the other arms (default 10)")
    p.add_argument("--budget", choices=BUDGETS, default="steps",
                   help="what every arm shares: steps (default; the real arm's optimizer steps, equal compute) or "
                        "epochs (each arm makes --epochs passes over its own set, so bigger arms train longer)")
    p.add_argument("--seeds", type=arg_type(parse_seeds), default=(0, 1, 2), help="e.g. 0,1,2 or 0-4 (default 0,1,2)")
    add_sampler_args(p)
    p.add_argument("--synthetic-seed", type=int, default=0, help="seed base of the synthetic set: image j of class c gets seed S + c x 1,000,000 + j (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="images per sampling batch (default 50 on a CPU, 256 on a GPU)")
    p.add_argument("--train-batch-size", type=int, default=None, help="classifier batch size (default mlp 256, cnn 512)")
    p.add_argument("--classifier-precision", choices=CLASSIFIER_PRECISIONS, default="fp32",
                   help="classifier training on a CPU: fp32 (default) or bf16 autocast, about twice as fast on a CPU "
                        "with bf16 instructions (0.23 against 0.49 s per CNN step on a 2-core Xeon with AMX); on "
                        "CUDA training always runs under bf16 autocast. Saved runs are kept apart by it")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cache-dir", default=None,
                   help="where synthetic sets and decoded data are cached (default $DREAMDATA_CACHE or ~/.cache/dreamdata)")
    p.add_argument("--out", required=True,
                   help="output folder; a run into a folder that holds finished training runs of the same experiment "
                        "(OUT/runs/, from a run that was stopped) reuses them and trains only the rest")
    p.add_argument("--restart", action="store_true",
                   help="train every run again instead of reusing the finished runs saved in OUT/runs/")
    p.add_argument("--compile", action="store_true",
                   help="sample the synthetic images on the model through torch.compile (on a CPU with inductor's "
                        "freezing: 1.09x eager on the AVX2 EPYC); the first batch of each shape waits for its "
                        "compile, minutes on a CPU. Images differ from eager ones by float rounding only (measured: "
                        "at most one level in 0.05%% of pixel values, benchmarks/compile_parity.py)")


def run_evaluate(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = EvaluationSettings(
        data=args.data, checkpoint=args.checkpoint, classifier=args.classifier, width=args.width,
        synthetic_per_class=args.synthetic_per_class, real_fraction=args.real_fraction, epochs=args.epochs,
        budget=args.budget,
        seeds=args.seeds, sampler=args.sampler, steps=args.steps, guidance=args.guidance, eta=args.eta,
        guidance_interval=args.guidance_interval, spacing=args.spacing, synthetic_seed=args.synthetic_seed,
        sample_batch_size=args.batch_size,
        train_batch_size=args.train_batch_size, device=args.device, cache_dir=args.cache_dir, precision=args.precision,
        classifier_precision=args.classifier_precision)
    try:
        settings.validate()
    except ValueError as e:  # the settings' field names, as the options that set them
        raise ValueError(as_options(str(e), EvaluationSettings, {"sample_batch_size": "--batch-size"})) from None
    check_out_dir(args.out)
    checkpoint = None
    if args.compile:
        checkpoint = load_for_sampling(settings.checkpoint or default_checkpoint(), pick_device(settings.device),
                                       settings.precision)
        checkpoint = replace(checkpoint, model=compile_for_sampling(checkpoint.model))
    bar = tqdm(total=100, dynamic_ncols=True, bar_format="{percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {desc}")

    def progress(fraction: float, message: str) -> None:
        bar.n = round(100 * fraction, 1)
        bar.set_description_str(message, refresh=True)

    try:
        report = run_evaluation(settings, args.out, progress=progress, show_bars=False,  # one bar, not one per run
                                resume=not args.restart, checkpoint=checkpoint)
    finally:  # an error message then starts on a line of its own
        bar.close()
    print(json.dumps({
        "out": args.out,
        "accuracy": {arm: {"mean": a["accuracy_mean"], "std": a["accuracy_std"]} for arm, a in report["arms"].items()},
        "delta": {"mean": report["delta"]["mean"], "ci95": report["delta"]["ci95"]},
        "report": f"{args.out}/report.md", "seconds": report["seconds"],
        "reused_runs": len(report["runs"]["reused"])}))
