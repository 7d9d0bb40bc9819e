"""``dreamdata sample``: images from a checkpoint into OUT (the layout of ``training.generate``)."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from diffusion.checkpoint import load_for_sampling
from diffusion.precision import default_device
from diffusion.samplers import SAMPLERS, SamplerSettings
from diffusion.spec import PRECISIONS, SPACINGS, check_seed, format_guidance_interval, parse_guidance_interval

from .generate import DEFAULT_SETTINGS, default_checkpoint, draw_seed, generate_to_dir, resolve_classes

log = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` (a GPU if there is one), ``cpu``, ``cuda`` or ``cuda:N``; ValueError for a device that is not
    there, before anything is loaded."""
    if name == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r}: no CUDA GPU is available here (use cpu or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: there are {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r}: only cpu and cuda are supported")
    return device


def arg_type(parse: Callable[[str], object]) -> Callable[[str], object]:
    """``parse`` as an argparse ``type=``: its ValueError's own message reaches the user (argparse would say
    only "invalid <name> value")."""
    def wrapped(text: str) -> object:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    wrapped.__name__ = parse.__name__
    return wrapped


def as_options(message: str, settings_class: type, renamed: dict[str, str] | None = None) -> str:
    """A settings dataclass's error that starts with a field name ("synthetic_per_class must be at least 1, ...") in
    the words of the command line ("--synthetic-per-class must be ..."); ``renamed``: fields whose option is not
    the field's name with dashes."""
    field, sep, rest = message.partition(" ")
    if field.isidentifier() and field in getattr(settings_class, "__dataclass_fields__", {}):
        return (renamed or {}).get(field, "--" + field.replace("_", "-")) + sep + rest
    return message


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    """--sampler, --steps, --guidance, --guidance-interval, --eta, --spacing, --precision: shared by sample,
    evaluate and metrics."""
    d = DEFAULT_SETTINGS
    p.add_argument("--sampler", choices=SAMPLERS, default=d.sampler, help=f"default {d.sampler}")
    p.add_argument("--steps", type=int, default=d.steps, help=f"sampler steps (default {d.steps})")
    p.add_argument("--guidance", type=float, default=d.guidance,
                   help=f"classifier-free guidance scale w (1 = none; default {d.guidance})")
    p.add_argument("--guidance-interval", type=arg_type(parse_guidance_interval), default=d.guidance_interval,
                   metavar="LO,HI|all",
                   help="guide only the steps whose noise level sigma_t = sqrt((1 - abar_t)/abar_t) is in (LO, HI]; "
                        "'all': every step (default "
                        f"{format_guidance_interval(d.guidance_interval)})")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    p.add_argument("--spacing", choices=SPACINGS, default=d.spacing,
                   help="where the steps fall: evenly in the timestep index (time) or in logSNR (logsnr; Lu et al. "
                        f"2022; more steps at low noise); default {d.spacing}")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="model calls in fp32 or bf16 autocast; auto: bf16 on a GPU, and on a CPU whichever a short "
                        "timing finds faster (default $DREAMDATA_PRECISION or auto; recorded in every PNG)")


def add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the shipped checkpoints/cifar10)")
    p.add_argument("--class", dest="classes", action="append", default=None,
                   help="class name or index 0-9; repeat for several; 'all' for every class (default: all)")
    p.add_argument("--n", type=int, default=10, help="images per class (default 10)")
    add_sampler_args(p)
    p.add_argument("--seed", type=int, default=None,
                   help="base seed in 0..2147483647, as the API takes; image i gets seed+i (default: random, recorded)")
    p.add_argument("--batch-size", type=int, default=None, help="images per model batch (default 50 on a CPU, 256 on a GPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--zip", action="store_true", help="also write images.zip")
    p.add_argument("--out", required=True, help="output folder")


def check_out_dir(out: str) -> None:
    """``--out`` names a folder to write into: ValueError now if it names a file (not after the model loads)."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")


def run_sample(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    check_out_dir(args.out)
    settings = SamplerSettings(args.sampler, args.steps, args.guidance, args.eta, args.guidance_interval, args.spacing)
    settings.validate()  # before the model loads (checked again against the checkpoint's timesteps)
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.seed is not None:
        check_seed("--seed", args.seed)
    device = pick_device(args.device)
    ckpt = load_for_sampling(args.checkpoint or default_checkpoint(), device=device, precision=args.precision)
    classes = resolve_classes(args.classes or ["all"], ckpt.class_names)
    seed = draw_seed() if args.seed is None else args.seed
    if args.seed is None:  # said now, not only at the end: a stopped run goes on only with the same seed
        log.info("base seed %d (drawn); after a stop, add --seed %d to go on from the images already made", seed, seed)
    total = args.n * len(classes)
    bar = tqdm(total=total, unit="img", dynamic_ncols=True)

    def progress(done: int, total_: int, step: int, steps: int) -> None:
        bar.n = done
        bar.set_postfix_str(f"step {step}/{steps}")
        bar.refresh()

    manifest = generate_to_dir(ckpt, [(c, args.n) for c in classes], args.out, settings=settings, base_seed=seed,
                               batch_size=args.batch_size, make_zip=args.zip, progress=progress)
    bar.close()
    print(json.dumps({"out": args.out, "images": len(manifest["images"]), "seed": seed,
                      "seconds": manifest["seconds"], "grid": f"{args.out}/grid.png"}))
