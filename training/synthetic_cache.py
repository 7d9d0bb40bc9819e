"""Synthetic training sets, sampled through the worker's sampling code (``training.generate``) and cached.

A set is ``per_class`` images of every checkpoint class.  Image j of class c gets seed
``base_seed + c * CLASS_SEED_STRIDE + j``, so the first k images of a class are the same whatever
``per_class`` a caller asks for: a set of 100 per class is the first 100 of a set of 5,000, and one
entry grows across runs (and sessions) instead of being sampled again.  It lives in::

    CACHE/synthetic/<sha12>-<sampler>-s<steps>-g<guidance>[-i<lo>,<hi>][-logsnr]-seed<base_seed>[-bf16]-<key>/
        images/<class index>/<j>.png    one PNG per image, with its metadata (class, seed, sampler, ...)
        grid.png                        the first 10 images of every class (rewritten when the set grows)
        timing.json                     images sampled into the entry and the seconds they took, summed
        .lock                           held (``fcntl.flock``) by the one process or thread sampling into it

keyed by the checkpoint weights' sha256, the sampler settings, the seed base and the precision of the
model calls (``diffusion.precision``: bf16 images differ from fp32 ones).  A PNG is written
atomically as soon as its batch is done, so an interrupted run keeps its images; a set is complete when
all of its PNGs exist.  One writer fills an entry at a time: a second (another job of a threads-pool worker,
or the command line and the service sharing a cache) waits for the lock, then samples only what is still
missing, so no image is sampled twice; it stops waiting as soon as the images it needs are on disk (a
smaller set than the first writer's).  Missing images are sampled j-major (every class's image j before any class's
j + 1), so an interrupted run toward a large set leaves the largest possible complete smaller set.
``CACHE`` defaults to ``training.data.default_cache_dir()`` (``$DREAMDATA_CACHE`` or ``~/.cache/dreamdata``).
Any single image can be reproduced through the service: ``POST /generate`` with its class, n=1 and its seed
(recorded in the PNG's metadata) when that seed is within the service's range (up to 2**31 - 1), on the
same kind of machine and code.  The key holds what decides an image, not the rounding of the kernels that
compute it: another CPU's bf16 kernels, another torch, or a change that computes the same function with
other roundings (such as the folded upsampling of 2026-11-30, ``diffusion.unet.Upsample``) give images
that differ by rounding noise that the stochastic sampler amplifies (``benchmarks/sampling_ab.py
--unfolded`` prints how much), and an entry keeps the images it has.  They are draws from the same
sampler, so a set whose images came from both sides of such a change is still a set from that sampler.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from diffusion.checkpoint import Checkpoint, load_for_sampling
from diffusion.precision import sampling_batch
from diffusion.samplers import SamplerSettings, sample
from diffusion.schedules import ScheduleConfig
from diffusion.spec import format_guidance_interval

from .data import LabelledImages, default_cache_dir, touch
from .generate import ImageSpec, progress_fraction, sample_specs, sampling_autocast, tmp_path, write_grid

log = logging.getLogger(__name__)

CACHE_VERSION = 2
CLASS_SEED_STRIDE = 1_000_000  # image j of class c gets seed base_seed + c * CLASS_SEED_STRIDE + j
ProgressFn = Callable[[float], None]  # fraction of the images sampled, 0..1; may raise to cancel


def cache_path(cache_dir: Path, sha256: str, settings: SamplerSettings, base_seed: int, num_classes: int,
               bf16: bool = False, schedule: ScheduleConfig | None = None) -> Path:
    """The entry of one set. ``sha256`` is the checkpoint's weights' hash; ``schedule`` its noise schedule, which
    config.json holds beside the weights (keyed only when not the default linear T = 1000, so the entries made
    before it was keyed keep their names)."""
    s = asdict(settings)
    # entries guided at every step keep the keys they had before intervals; unguided ones (w 0 or 1) have no
    # guided steps, so an interval changes nothing in them and stays out of their key
    interval = settings.guidance_interval if settings.guided else None
    if interval is None:
        del s["guidance_interval"]
    if settings.spacing == "time":  # entries made before the spacing was a setting (all time-spaced) keep their keys
        del s["spacing"]
    key = {"v": CACHE_VERSION, "sha256": sha256, "settings": s, "base_seed": base_seed,
           "num_classes": num_classes, "stride": CLASS_SEED_STRIDE}
    if bf16:  # only then: fp32 entries keep the keys they had before precision was a choice
        key["precision"] = "bf16"
    if schedule is not None and schedule != ScheduleConfig():
        key["schedule"] = schedule.to_dict()
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    tag = ("" if interval is None else f"-i{format_guidance_interval(interval)}") + \
        ("" if settings.spacing == "time" else f"-{settings.spacing}")
    name = (f"{sha256[:12]}-{settings.sampler}-s{settings.steps}-g{settings.guidance:g}{tag}-seed{base_seed}"
            f"{'-bf16' if bf16 else ''}-{h}")
    return Path(cache_dir) / "synthetic" / name


def image_specs(per_class: int, num_classes: int, base_seed: int) -> list[ImageSpec]:
    """Every image of a set, j-major (image j of every class, then j + 1); ``index`` is the position in the
    returned set, which is class-major (all of class 0, then class 1, ...), the order the images load in."""
    if per_class > CLASS_SEED_STRIDE:
        raise ValueError(f"per_class must be at most {CLASS_SEED_STRIDE}, got {per_class}")
    return [ImageSpec(c * per_class + j, c, base_seed + c * CLASS_SEED_STRIDE + j, f"images/{c}/{j:06d}.png")
            for j in range(per_class) for c in range(num_classes)]


def missing(folder: Path, per_class: int, num_classes: int, base_seed: int) -> int:
    """How many images of the set are not on disk yet (0: complete)."""
    return sum(not (folder / s.file).exists() for s in image_specs(per_class, num_classes, base_seed))


def sampling_time(folder: Path) -> dict:
    """``{"images", "seconds"}`` summed over every run that sampled into the entry ({} if none recorded)."""
    f = folder / "timing.json"
    return json.loads(f.read_text()) if f.exists() else {}


def _add_time(folder: Path, images: int, seconds: float) -> None:
    t = sampling_time(folder)
    t = {"images": t.get("images", 0) + images, "seconds": round(t.get("seconds", 0.0) + seconds, 3)}
    tmp = tmp_path(folder / "timing.json")
    tmp.write_text(json.dumps(t) + "\n")
    tmp.replace(folder / "timing.json")


@contextlib.contextmanager
def filling(folder: Path, check: Callable[[], None] | None = None, enough: Callable[[], bool] | None = None,
            poll: float = 1.0) -> Iterator[bool]:
    """Hold ``folder``'s fill lock (creating the folder): one writer per entry, across processes and threads
    (each call opens the lock file anew, and ``flock`` locks belong to an open file).  Yields True once held.
    While another writer holds it, wait, calling ``check`` every ``poll`` seconds (it may raise to give up: a
    canceled job) and then ``enough``: when that says the images this caller needs are on disk now (the other
    writer sampled them), stop waiting and yield False, without the lock.  The kernel drops the lock of a
    writer that dies, so a killed run never leaves an entry locked."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as f:
        waited = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log.info("another writer is sampling into %s: waiting for it", folder)
                    waited = True
                if check is not None:
                    check()
                if enough is not None and enough():
                    yield False
                    return
                time.sleep(poll)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class DamagedImages(Exception):
    """Some PNGs of a cache entry could not be read (and were deleted, so that the entry samples them again)."""


def load_pngs(folder: Path, specs: list[ImageSpec]) -> tuple[torch.Tensor, torch.Tensor]:
    """The PNGs of ``specs`` (in that order) -> (uint8 [N, 3, H, W], int64 [N]).

    Each PNG is written whole and renamed into place, but a disk that loses a write (power lost before it
    reached the disk) or a hand can leave an empty or cut file: such files are deleted, then
    :class:`DamagedImages` raised, so that the next call samples them again instead of failing for ever."""
    arrays, damaged = [], []
    for s in specs:
        try:
            with Image.open(folder / s.file) as img:
                arrays.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
        except (OSError, SyntaxError, ValueError):  # PIL: unidentified, truncated, or a broken chunk
            damaged.append(folder / s.file)
    if damaged:
        for f in damaged:
            f.unlink(missing_ok=True)
        raise DamagedImages(f"{len(damaged)} unreadable images in {folder} (deleted), e.g. {damaged[0].name}")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([s.class_index for s in specs], dtype=torch.int64)


def synthetic_images(checkpoint: str | os.PathLike | Checkpoint, per_class: int, settings: SamplerSettings, *,
                     base_seed: int = 0,                      # image j of class c: seed base_seed + c * stride + j
                     cache_dir: str | os.PathLike | None = None,
                     device: str | torch.device = "cpu",
                     precision: str | None = None,            # auto, fp32, bf16 (diffusion.precision)
                     batch_size: int | None = None,           # images per model batch (default: the device's)
                     sample_fn: Callable = sample,            # the worker may pass its batching sampler
                     progress: ProgressFn | None = None,
                     check: Callable[[], None] | None = None, # raises to stop waiting (the lock, a batch's turn)
                     repair: bool = True,                     # sample damaged images again (load_pngs), once
                     ) -> tuple[LabelledImages, dict]:
    """``per_class`` synthetic images of every class (class-major), from the cache or sampled into it.

    ``checkpoint`` is a checkpoint directory, loaded with ``precision`` (the choice keys the cache, so
    the model is loaded even when every image is cached), or an already loaded :class:`Checkpoint`, whose
    own precision is used (``ckpt.precision``; ``precision`` is then ignored).  Returns the images and
    ``{"cache_dir", "reused", "checkpoint_sha256", "seconds", "sampled", "class_seed_stride", "precision",
    "compiled"}`` (compiled: this call sampled images, on a ``torch.compile`` wrapper of the model):
    ``seconds`` of sampling in this call (0 when reused) for ``sampled`` images; ``reused`` is true when
    nothing had to be sampled.  ``check`` is called while this call waits for another writer of the same entry
    (:func:`filling`) and goes to ``sample_fn`` (both ``diffusion.samplers.sample`` and the worker's batching
    sampler take it); it may raise to stop.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_for_sampling(checkpoint, device, precision)
    sha, names = ckpt.sha256, ckpt.class_names
    settings.validate(ckpt.schedule.num_timesteps)
    bf16 = sampling_autocast(ckpt)
    batch_size = sampling_batch(next(ckpt.model.parameters()).device) if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache_path(cache_dir, sha, settings, base_seed, len(names), bf16, ckpt.schedule.config)
    specs = image_specs(per_class, len(names), base_seed)
    if folder.is_dir():
        touch(folder)  # in use from now on: sampling into it also renews this, batch by batch (timing.json)
    todo = [s for s in specs if not (folder / s.file).exists()]
    sampled, seconds, on_disk = 0, 0.0, len(specs) - len(todo)
    if todo:
        still = todo

        def written_by_another() -> bool:  # while waiting: report how much of the set is on disk; all of it?
            nonlocal still
            still = [s for s in still if not (folder / s.file).exists()]
            if progress:
                progress(round(1 - len(still) / len(specs), 4))
            return not still

        with filling(folder, check, written_by_another):
            todo = [s for s in specs if not (folder / s.file).exists()]  # another writer may have sampled some
            on_disk = len(specs) - len(todo)
            if todo:
                def on_progress(done: int, total: int, step: int, steps: int) -> None:  # done, total: of ``todo``
                    if progress:
                        progress(progress_fraction(on_disk + done, len(specs), step, steps, batch_size))

                log.info("sampling %d synthetic images into %s (%d on disk)", len(todo), folder, on_disk)
                t0 = time.perf_counter()
                # timing.json grows batch by batch, so a run stopped half way still accounts for the images it wrote
                sampled = sample_specs(ckpt, todo, folder, settings=settings, batch_size=batch_size, autocast=bf16,
                                       progress=on_progress, sample_fn=sample_fn, check=check,
                                       on_batch=lambda n, secs: _add_time(folder, n, secs))
                seconds = round(time.perf_counter() - t0, 3)
    if not sampled and progress:
        progress(1.0)
    info = {"cache_dir": str(folder), "reused": not sampled, "checkpoint_sha256": sha, "seconds": seconds,
            "sampled": sampled, "class_seed_stride": CLASS_SEED_STRIDE,  # image j of class c: base + c * stride + j
            "precision": "bf16" if bf16 else "fp32",
            "compiled": bool(sampled) and isinstance(ckpt.model, torch._dynamo.eval_frame.OptimizedModule)}
    if ckpt.precision is not None:
        info["precision_reason"] = ckpt.precision.reason
    touch(folder)  # its last use, for the service's cache pruning (worker.jobs.prune_cache)
    ordered = sorted(specs, key=lambda s: s.index)
    try:
        images, labels = load_pngs(folder, ordered)
    except DamagedImages as e:
        if not repair:
            raise
        log.warning("%s: sampling them again", e)
        synth, again = synthetic_images(ckpt, per_class, settings, base_seed=base_seed, cache_dir=cache_dir,
                                        batch_size=batch_size, sample_fn=sample_fn, progress=progress, check=check,
                                        repair=False)
        # this call's work in all: what the first pass sampled too
        again.update(sampled=again["sampled"] + sampled, seconds=round(again["seconds"] + seconds, 3),
                     reused=again["reused"] and not sampled, compiled=again["compiled"] or info["compiled"])
        return synth, again
    if sampled:  # read back from disk: once they are known to be readable
        write_grid(folder, specs, [(c, per_class) for c in range(len(names))])
    log.info("%d synthetic images from %s (%d sampled now)", len(labels), folder, info["sampled"])
    return LabelledImages(images, labels, tuple(names), str(folder)), info


def check_classes(checkpoint_names: Sequence[str], data_names: Sequence[str]) -> None:
    """ValueError unless the checkpoint and the data set have the same classes (in any order)."""
    if sorted(checkpoint_names) != sorted(data_names):
        raise ValueError(f"checkpoint classes {list(checkpoint_names)} differ from data set classes {list(data_names)}")


def align_classes(synth: LabelledImages, class_names: tuple[str, ...]) -> LabelledImages:
    """Relabel synthetic images into the data set's class order (the checkpoint's may differ)."""
    if tuple(synth.class_names) == tuple(class_names):
        return synth
    check_classes(synth.class_names, class_names)
    remap = torch.tensor([class_names.index(c) for c in synth.class_names])
    return LabelledImages(synth.images, remap[synth.labels], tuple(class_names), synth.source)
