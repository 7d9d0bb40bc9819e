"""The ``dreamdata`` command.

    dreamdata train   --config cifar10-cpu --data ../shared/data/cifar10-jpeg.tar.gz --out runs/cpu [--resume]
    dreamdata sample  [--checkpoint DIR] --class cat --n 100 [--sampler dpmpp_sde --steps 20 --guidance 8] --seed 0 --out OUT
    dreamdata evaluate --data DATA --classifier mlp|cnn --synthetic-per-class K --real-fraction F --out DIR
    dreamdata metrics  --data DATA --n-per-class N
    dreamdata serve   [--host 127.0.0.1] [--port 8000] [--data-dir PATH] [--checkpoint DIR] [--eval-data PATH] ...
    dreamdata worker | dreamdata api

Sub-commands import their heavy dependencies lazily, so ``dreamdata api`` never imports torch.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# sub-command -> (module, function that adds its arguments, function that runs it)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "train": ("training.train", "add_train_args", "run_train", "train a class-conditional DDPM checkpoint"),
    "sample": ("training.sample_cli", "add_sample_args", "run_sample", "sample images from a checkpoint to a folder"),
    "serve": ("worker.serve", "add_serve_args", "run_serve", "run redis + worker + API locally (no Docker)"),
    "worker": ("worker.serve", "add_worker_args", "run_worker", "run a Celery worker"),
    "api": ("worker.serve", "add_api_args", "run_api", "run the HTTP API"),
    "evaluate": ("training.evaluate_cli", "add_evaluate_args", "run_evaluate", "augmentation-and-evaluation run"),
    "metrics": ("training.metrics_cli", "add_metrics_args", "run_metrics", "generator quality measures"),
}


# What a person can do after stopping a command with Ctrl-C (train saves its state at the first one by itself).
AFTER_CTRL_C = {
    "sample": "; the same command with the same --seed goes on from the images already made",
    "evaluate": "; the same command goes on from the images and training runs it finished",
    "metrics": "; the same command reuses the images and feature classifier it finished",
    "train": "; the same command with --resume goes on from the last saved state",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="dreamdata", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    available = {}
    for name, (module, add, run, help_) in COMMANDS.items():
        try:
            mod = importlib.import_module(module) if name in argv[:1] or not argv else None
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith(module.split(".")[0]):
                continue  # that part is not built in this version
            raise
        p = sub.add_parser(name, help=help_, description=help_)
        if mod is not None:
            getattr(mod, add)(p)
            available[name] = getattr(mod, run)
    args = parser.parse_args(argv)
    try:
        available[args.command](args)
    except (ValueError, FileNotFoundError) as e:  # bad input, a missing --data or checkpoint: one line, status 2
        parser.exit(2, f"dreamdata {args.command}: error: {e}\n")
    except OSError as e:  # a disk, permission or file error met while working: one line, the path in it
        parser.exit(1, f"dreamdata {args.command}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"\ndreamdata {args.command}: stopped{AFTER_CTRL_C.get(args.command, '')}\n")


if __name__ == "__main__":
    main()
