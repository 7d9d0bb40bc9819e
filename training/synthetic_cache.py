"""Synthetic training sets, sampled once through ``training.generate.generate_to_dir`` and cached.

A set is ``per_class`` images of every checkpoint class; image i gets seed ``base_seed + i``
(classes in checkpoint order, as ``training.generate.plan`` assigns them).  It lives in::

    CACHE/synthetic/<sha12>-<sampler>-s<steps>-g<guidance>-seed<base_seed>-k<per_class>-<key>/
        images/NNNNN.png, grid.png, manifest.json    the generate_to_dir layout (same as the worker's)
        images.pt                                    the PNGs decoded: uint8 [N, 3, H, W] + labels

keyed by the checkpoint weights' sha256, the sampler settings, the seed range and ``per_class``.
``images.pt`` is written last, so its presence means "complete"; an interrupted run resumes
(generate_to_dir skips PNGs already on disk).  ``CACHE`` defaults to
``training.data.default_cache_dir()`` (``$DREAMDATA_CACHE`` or ``~/.cache/dreamdata``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from diffusion.checkpoint import WEIGHTS_FILE, Checkpoint, file_sha256, load_checkpoint, read_config
from diffusion.samplers import SamplerSettings, sample

from .data import LabelledImages, default_cache_dir
from .generate import generate_to_dir

log = logging.getLogger(__name__)

CACHE_VERSION = 1
ProgressFn = Callable[[float], None]  # fraction of the images sampled, 0..1; may raise to cancel


def cache_path(cache_dir: Path, sha256: str, settings: SamplerSettings, base_seed: int, per_class: int,
               num_classes: int) -> Path:
    key = json.dumps({"v": CACHE_VERSION, "sha256": sha256, "settings": asdict(settings), "base_seed": base_seed,
                      "per_class": per_class, "num_classes": num_classes}, sort_keys=True)
    h = hashlib.sha256(key.encode()).hexdigest()[:10]
    name = (f"{sha256[:12]}-{settings.sampler}-s{settings.steps}-g{settings.guidance:g}-seed{base_seed}"
            f"-k{per_class}-{h}")
    return Path(cache_dir) / "synthetic" / name


def load_pngs(folder: Path, manifest: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The images listed in a generate_to_dir manifest -> (uint8 [N, 3, H, W], int64 [N])."""
    arrays = [np.asarray(Image.open(folder / im["file"]).convert("RGB"), dtype=np.uint8) for im in manifest["images"]]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([im["class_index"] for im in manifest["images"]], dtype=torch.int64)


def synthetic_images(checkpoint: str | os.PathLike | Checkpoint, per_class: int, settings: SamplerSettings, *,
                     base_seed: int = 0,                      # image i gets seed base_seed + i
                     cache_dir: str | os.PathLike | None = None,
                     device: str | torch.device = "cpu",      # used only when sampling is needed
                     batch_size: int = 100,                   # images per model batch
                     sample_fn: Callable = sample,            # the worker may pass its batching sampler
                     progress: ProgressFn | None = None,
                     ) -> tuple[LabelledImages, dict]:
    """``per_class`` synthetic images of every class, from the cache or sampled into it.

    ``checkpoint`` is a checkpoint directory (the model is loaded only if sampling is needed) or
    an already loaded :class:`Checkpoint`.  Returns the images and ``{"cache_dir", "reused",
    "checkpoint_sha256", "seconds"}`` (seconds of sampling in this call; 0 when reused).
    """
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    if isinstance(checkpoint, Checkpoint):
        ckpt, sha, names = checkpoint, checkpoint.sha256, checkpoint.class_names
        num_timesteps = ckpt.schedule.num_timesteps
    else:
        ckpt, cfg = None, read_config(checkpoint)
        sha, names = file_sha256(Path(checkpoint) / WEIGHTS_FILE), tuple(cfg["class_names"])
        num_timesteps = int(cfg["schedule"]["timesteps"])
    settings.validate(num_timesteps)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache_path(cache_dir, sha, settings, base_seed, per_class, len(names))
    done_file = folder / "images.pt"
    info = {"cache_dir": str(folder), "reused": True, "checkpoint_sha256": sha, "seconds": 0.0}
    if done_file.exists():
        d = torch.load(done_file, weights_only=True)
        log.info("reusing %d synthetic images from %s", len(d["labels"]), folder)
        if progress:
            progress(1.0)
        return LabelledImages(d["images"], d["labels"], tuple(d["class_names"]), str(folder)), info

    if ckpt is None:
        ckpt = load_checkpoint(checkpoint, device=device)
        if torch.device(device).type == "cpu":
            ckpt.model.to(memory_format=torch.channels_last)
    total = per_class * len(names)

    def on_progress(done: int, total_: int, step: int, steps: int) -> None:
        if progress:
            in_batch = min(batch_size, total_ - done) if done < total_ else 0
            progress(min(1.0, (done + in_batch * step / max(1, steps)) / total_))

    log.info("sampling %d synthetic images into %s", total, folder)
    manifest = generate_to_dir(ckpt, [(c, per_class) for c in range(len(names))], folder, settings=settings,
                               base_seed=base_seed, batch_size=batch_size, progress=on_progress, sample_fn=sample_fn)
    images, labels = load_pngs(folder, manifest)
    tmp = folder / f"images.pt.{os.getpid()}.tmp"  # several processes may fill the same cache entry
    torch.save({"images": images, "labels": labels, "class_names": list(names)}, tmp)
    tmp.replace(done_file)
    info.update(reused=False, seconds=manifest["seconds"])
    return LabelledImages(images, labels, tuple(names), str(folder)), info


def align_classes(synth: LabelledImages, class_names: tuple[str, ...]) -> LabelledImages:
    """Relabel synthetic images into the data set's class order (the checkpoint's may differ)."""
    if tuple(synth.class_names) == tuple(class_names):
        return synth
    if sorted(synth.class_names) != sorted(class_names):
        raise ValueError(f"checkpoint classes {list(synth.class_names)} differ from data set classes {list(class_names)}")
    remap = torch.tensor([class_names.index(c) for c in synth.class_names])
    return LabelledImages(synth.images, remap[synth.labels], tuple(class_names), synth.source)
