"""Generate images to a directory: the one output layout used by ``dreamdata sample`` and the worker.

    OUT/grid.png            one row per requested class (up to 10 images per row)
    OUT/images/NNNNN.png    every image, with PNG text metadata (class, seed, sampler, steps,
                            guidance, guidance interval, precision, DDIM's eta where not 0, the step
                            spacing where not time, checkpoint hash)
    OUT/manifest.json       one entry per image: file, class name, class index, seed, sampler, steps, guidance,
                            guidance interval ("lo,hi" or "all"), precision (and eta where not 0, spacing
                            where not time)
    OUT/images.zip          (optional) all images

Image i of a request gets seed ``base_seed + i``; images are produced in batches and written as
they come, so memory holds at most one batch. Images already on disk (a previous attempt that
crashed) are skipped one by one: the same seed gives the same image whichever batch it lands in
(up to float rounding: a pixel may rarely round to the next level), so a retried job completes with the
same images. An image on disk whose metadata says it was made
otherwise (another checkpoint or precision, say: the attempt ran on another worker) is made again, so
the manifest is true of every image.
"""
from __future__ import annotations

import json
import logging
import os
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from diffusion.checkpoint import Checkpoint
from diffusion.precision import sampling_batch
from diffusion.samplers import SamplerSettings, sample
from diffusion.schedules import ScheduleConfig
from diffusion.spec import (DEFAULT_SETTINGS, SHIPPED_CHECKPOINT, draw_seed,  # noqa: F401  (re-exported)
                            format_guidance_interval, resolve_class)

from .data import tmp_path  # noqa: F401  (re-exported: the worker writes its files with it)
from .plots import image_grid, to_uint8

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = SHIPPED_CHECKPOINT
GRID_PER_CLASS = 10

ProgressFn = Callable[[int, int, int, int], None]  # (images done, images total, step, steps); may raise


def default_checkpoint() -> Path:
    """``$DREAMDATA_CHECKPOINT`` or the shipped ``checkpoints/cifar10``."""
    return Path(os.environ.get("DREAMDATA_CHECKPOINT", DEFAULT_CHECKPOINT))


def resolve_classes(specs: Sequence[str], class_names: Sequence[str]) -> list[int]:
    """Several class specs (``all`` means every class), de-duplicated, in the order given."""
    out: list[int] = []
    for s in specs:
        idx = range(len(class_names)) if str(s).strip().lower() == "all" else [resolve_class(s, class_names)]
        out.extend(i for i in idx if i not in out)
    return out


@dataclass(frozen=True)
class ImageSpec:
    index: int       # position in the request; file images/{index:05d}.png unless ``name`` says otherwise
    class_index: int
    seed: int
    name: str = ""   # a path relative to the output directory, for layouts other than the request's

    @property
    def file(self) -> str:
        return self.name or f"images/{self.index:05d}.png"


def sampling_autocast(ckpt: Checkpoint) -> bool:
    """bf16 autocast for ``ckpt``'s sampling calls: as decided when it was loaded for sampling
    (``diffusion.checkpoint.load_for_sampling``), else on CUDA only."""
    if ckpt.precision is not None:
        return ckpt.precision.bf16
    return next(ckpt.model.parameters()).device.type == "cuda"


# Metadata keys written only when not at their default (images made before they were recorded keep matching):
# an image that has one differs from a call that does not write it, so drop_stale_images reads them back too.
OPTIONAL_META = ("eta", "schedule", "spacing")


def _common_meta(settings: SamplerSettings, autocast: bool, schedule: ScheduleConfig | None = None) -> dict:
    """What every image of one call shares, for its PNG metadata and manifest entry."""
    meta = {"sampler": settings.sampler, "steps": settings.steps, "guidance": settings.guidance,
            "guidance_interval": format_guidance_interval(settings.guidance_interval),
            "precision": "bf16" if autocast else "fp32"}
    if settings.eta:  # DDIM with noise; absent at 0, so images made before eta was recorded keep matching
        meta["eta"] = settings.eta
    if settings.spacing != "time":  # absent for time-spaced steps, so images made before the setting keep matching
        meta["spacing"] = settings.spacing
    # the same weights under another schedule make other images, and the checkpoint's sha256 covers the weights only
    if schedule is not None and schedule != ScheduleConfig():
        meta["schedule"] = f"{schedule.name}-{schedule.timesteps}"
    return meta


def plan(class_counts: Sequence[tuple[int, int]], base_seed: int) -> list[ImageSpec]:
    """[(class index, n), ...] -> one ImageSpec per image; image i gets seed base_seed + i."""
    specs, i = [], 0
    for c, n in class_counts:
        for _ in range(n):
            specs.append(ImageSpec(i, c, base_seed + i))
            i += 1
    return specs


def _image_meta(common: dict, spec: ImageSpec, class_names: Sequence[str], checkpoint_sha256: str) -> dict:
    """The PNG text metadata of one image, as it is written (every value a string)."""
    meta = dict(common, **{"class": class_names[spec.class_index], "class_index": spec.class_index,
                           "seed": spec.seed, "checkpoint_sha256": checkpoint_sha256})
    return {k: str(v) for k, v in meta.items()}


def _write_png(path: Path, img: torch.Tensor, meta: dict) -> None:
    """img: [3, H, W] uint8.  Written atomically so a crash never leaves a truncated file."""
    info = PngImagePlugin.PngInfo()
    for k, v in meta.items():
        info.add_text(k, str(v))
    tmp = tmp_path(path)
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)


def drop_stale_images(out: Path, specs: Sequence[ImageSpec], common: dict, class_names: Sequence[str],
                      checkpoint_sha256: str) -> int:
    """Delete the images of ``specs`` on disk under ``out`` whose PNG metadata differs from what this call
    would write (an earlier attempt with another checkpoint, precision or sampler), so they are made again;
    returns how many."""
    stale = 0
    for s in specs:
        f = out / s.file
        if not f.exists():
            continue
        want = _image_meta(common, s, class_names, checkpoint_sha256)
        try:
            with Image.open(f) as im:
                have = {k: im.text[k] for k in (*want, *OPTIONAL_META) if k in im.text}
        except (OSError, ValueError):  # unreadable: made again too
            have = {}
        if have != want:
            f.unlink(missing_ok=True)
            stale += 1
    if stale:
        log.warning("%d of %d images in %s were made with other settings (another checkpoint or precision?): "
                    "making them again", stale, len(specs), out)
    return stale


def progress_fraction(done: int, total: int, step: int, steps: int, batch_size: int) -> float:
    """Share of ``total`` images finished, from a ``progress(done, total, step, steps)`` call of
    :func:`sample_specs`: whole images done plus the current batch's share of its steps.

    ``step == steps`` is read as "between batches": ``sample_specs`` reports a batch's last step only once
    the batch is written, with ``done`` counting it, so the current batch counts only while ``step < steps``
    and the fraction never goes back.
    """
    if total <= 0:
        return 0.0
    in_batch = min(batch_size, total - done) if step < steps else 0
    return round(min(1.0, (done + in_batch * step / max(steps, 1)) / total), 4)


def sample_specs(ckpt: Checkpoint, specs: Sequence[ImageSpec], out_dir: str | os.PathLike, *,
                 settings: SamplerSettings = DEFAULT_SETTINGS,
                 batch_size: int | None = None,   # default: diffusion.precision.sampling_batch of the model's device
                 autocast: bool | None = None,    # bf16 autocast; default: sampling_autocast(ckpt)
                 progress: ProgressFn | None = None,
                 sample_fn: Callable = sample,    # the worker passes a batching sampler here
                 on_batch: Callable[[int, float], None] | None = None,  # (images, seconds) once a batch is written
                 check: Callable[[], None] | None = None,  # raises to stop a batch waiting its turn in sample_fn
                 ) -> int:
    """Sample the images of ``specs`` whose files are not yet under ``out_dir``, in batches of ``batch_size``
    (in the order given), writing each PNG with its metadata; returns how many were sampled.

    Images already on disk (an earlier attempt, or a smaller set being grown) are skipped one by one: the
    same seed gives the same image whichever batch it lands in (up to float rounding).  ``progress`` counts the
    skipped ones as done; ``on_batch`` hears only of sampled ones, batch by batch, so an interrupted run has
    reported what it wrote.  ``check`` goes to ``sample_fn`` (only when given): the worker's batching sampler
    calls it while a batch waits behind other jobs' batches, so a job canceled, out of time or stopped by its
    worker does not wait for its turn to find out (``diffusion.samplers.sample`` calls it after every step).
    """
    out = Path(out_dir)
    settings.validate(ckpt.schedule.num_timesteps)
    names = ckpt.class_names
    total = len(specs)
    if total == 0:
        raise ValueError("nothing to generate: every class count is 0")
    missing = [s for s in specs if not (out / s.file).exists()]
    for d in {(out / s.file).parent for s in missing}:
        d.mkdir(parents=True, exist_ok=True)
    device = next(ckpt.model.parameters()).device
    batch_size = sampling_batch(device) if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if autocast is None:
        autocast = sampling_autocast(ckpt)
    common = _common_meta(settings, autocast, ckpt.schedule.config)
    done = total - len(missing)
    if progress and done:
        progress(done, total, settings.steps, settings.steps)
    for start in range(0, len(missing), batch_size):
        batch = missing[start: start + batch_size]

        def on_step(step: int, steps: int, _done=done) -> None:
            if progress and step < steps:  # the last step is reported once the batch is written, counted as done
                progress(_done, total, step, steps)

        t0 = time.perf_counter()
        labels = torch.tensor([s.class_index for s in batch], device=device)
        x = sample_fn(ckpt.model, ckpt.schedule, labels, [s.seed for s in batch], sampler=settings.sampler,
                      steps=settings.steps, guidance=settings.guidance, eta=settings.eta,
                      guidance_interval=settings.guidance_interval, autocast=autocast, progress=on_step,
                      # only off time: sample functions written before the setting (fakes) do not take it
                      **({} if settings.spacing == "time" else {"spacing": settings.spacing}),
                      **({} if check is None else {"check": check}))
        imgs = to_uint8(x.cpu())
        for s, img in zip(batch, imgs):
            _write_png(out / s.file, img, _image_meta(common, s, names, ckpt.sha256))
        if on_batch:
            on_batch(len(batch), time.perf_counter() - t0)
        done += len(batch)
        if progress:
            progress(done, total, settings.steps, settings.steps)
    return len(missing)


def generate_to_dir(ckpt: Checkpoint, class_counts: Sequence[tuple[int, int]], out_dir: str | os.PathLike, *,
                    settings: SamplerSettings = DEFAULT_SETTINGS,
                    base_seed: int = 0,
                    batch_size: int | None = None,   # default: diffusion.precision.sampling_batch of the model's device
                    autocast: bool | None = None,    # bf16 autocast; default: sampling_autocast(ckpt)
                    make_zip: bool = False,
                    progress: ProgressFn | None = None,
                    sample_fn: Callable = sample,    # the worker passes a batching sampler here
                    check: Callable[[], None] | None = None,  # see sample_specs
                    ) -> dict:
    """Sample every requested image into ``out_dir`` (layout in the module docstring); returns the manifest."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = ckpt.class_names
    specs = plan(class_counts, base_seed)
    if autocast is None:
        autocast = sampling_autocast(ckpt)
    common = _common_meta(settings, autocast, ckpt.schedule.config)
    t0 = time.perf_counter()
    drop_stale_images(out, specs, common, names, ckpt.sha256)
    sample_specs(ckpt, specs, out, settings=settings, batch_size=batch_size, autocast=autocast, progress=progress,
                 sample_fn=sample_fn, check=check)
    manifest = {
        # its folder's name (as GET /models shows it), not its path: the service serves this file
        "checkpoint": {"name": ckpt.path.name if ckpt.path else None, "sha256": ckpt.sha256},
        "settings": asdict(settings),
        "base_seed": base_seed,
        "precision": common["precision"],
        "counts": {names[c]: n for c, n in class_counts},
        "images": [dict(file=s.file, class_name=names[s.class_index], class_index=s.class_index, seed=s.seed, **common)
                   for s in specs],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_grid(out, specs, class_counts)
    if make_zip:
        write_zip(out, specs)
    tmp = tmp_path(out / "manifest.json")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(out / "manifest.json")
    return manifest


def write_grid(out: Path, specs: Sequence[ImageSpec], class_counts: Sequence[tuple[int, int]]) -> None:
    """grid.png: one row per requested class, its first GRID_PER_CLASS images (read back from disk)."""
    per = min(GRID_PER_CLASS, max(n for _, n in class_counts))
    rows = []
    for c, n in class_counts:
        if n == 0:
            continue
        mine = [s for s in specs if s.class_index == c][:per]
        imgs = [torch.from_numpy(np.array(Image.open(out / s.file).convert("RGB"))).permute(2, 0, 1)
                for s in mine]
        blank = torch.full_like(imgs[0], 255)
        rows.extend(imgs + [blank] * (per - len(imgs)))
    tmp = tmp_path(out / "grid.png")
    image_grid(torch.stack(rows), nrow=per).save(tmp, format="PNG")
    tmp.replace(out / "grid.png")


def write_zip(out: Path, specs: Sequence[ImageSpec]) -> Path:
    """images.zip with every image (PNG is already compressed: stored, not deflated)."""
    tmp = tmp_path(out / "images.zip")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        for s in specs:
            z.write(out / s.file, arcname=s.file)
        z.write(out / "grid.png", arcname="grid.png")
    tmp.replace(out / "images.zip")
    return out / "images.zip"
