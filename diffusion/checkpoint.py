"""Checkpoints are directories: ``config.json`` + ``model.safetensors`` (EMA weights).

``config.json``::

    {"format_version": 1,
     "unet": {...UNetConfig...},
     "schedule": {"name": "linear", "timesteps": 1000},
     "class_names": ["airplane", ...],
     "provenance": {"steps": ..., "images_seen": ..., "wall_time_s": ..., "dataset": ..., ...}}

Loading needs nothing but these two files and never unpickles anything.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from .precision import PrecisionChoice, choose_precision
from .schedules import NoiseSchedule, ScheduleConfig
from .unet import UNet, UNetConfig

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or of an unknown format."""


@dataclass
class Checkpoint:
    model: UNet
    schedule: NoiseSchedule
    class_names: tuple[str, ...]
    provenance: dict = field(default_factory=dict)
    path: Path | None = None
    sha256: str = ""  # of model.safetensors; identifies the weights in image metadata
    precision: PrecisionChoice | None = None  # of sampling calls, set by load_for_sampling (None: bf16 on CUDA only)

    @property
    def config(self) -> dict:
        return config_dict(self.model.config, self.schedule.config, self.class_names, self.provenance)


def config_dict(unet: UNetConfig, schedule: ScheduleConfig, class_names, provenance: dict) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "unet": unet.to_dict(),
        "schedule": schedule.to_dict(),
        "class_names": list(class_names),
        "provenance": provenance,
    }


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` to ``path``, its content on disk first and the rename after: a power loss or a
    killed VM then leaves the old file or the new one, never an empty one under the new name (as ext4 and XFS
    may after a rename of data still in the page cache)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened for reading (some platforms): the rename stands
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(directory: str | os.PathLike, model: torch.nn.Module, schedule: ScheduleConfig,
                    class_names, provenance: dict | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``config.json`` and ``model.safetensors`` atomically (tmp files, then rename).

    ``dtype=torch.float16`` halves the file (the shipped checkpoint); loading casts back to float32.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # Never save a torch.compile (_orig_mod) or DDP (module) wrapper, whichever way they are nested:
    # their state_dict keys carry a prefix that load_checkpoint cannot load.
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if inner is None:
            break
        model = inner
    if len(class_names) != model.config.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {model.config.num_classes} classes")
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in model.state_dict().items()}
    tmp_w, tmp_c = d / (WEIGHTS_FILE + ".tmp"), d / (CONFIG_FILE + ".tmp")
    save_file(state, str(tmp_w), metadata={"format_version": str(FORMAT_VERSION)})
    tmp_c.write_text(json.dumps(config_dict(model.config, schedule, class_names, provenance or {}), indent=2) + "\n")
    replace_durably(tmp_w, d / WEIGHTS_FILE)
    replace_durably(tmp_c, d / CONFIG_FILE)
    return d


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_config(directory: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a checkpoint, validated; no weights are read."""
    d = Path(directory)
    cfg_path = d / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{d}: not a checkpoint directory (no {CONFIG_FILE})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: not a JSON object")
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    for key in ("unet", "schedule", "class_names"):
        if key not in cfg:
            raise CheckpointError(f"{cfg_path}: missing key {key!r}")
    return cfg


def load_for_sampling(directory: str | os.PathLike, device: str | torch.device = "cpu",
                      precision: str | None = None) -> Checkpoint:
    """:func:`load_checkpoint`, then the precision and weight layout of its sampling calls decided
    (:func:`diffusion.precision.choose_precision`; ``precision`` None: ``$DREAMDATA_PRECISION`` or auto)."""
    ckpt = load_checkpoint(directory, device)
    ckpt.precision = choose_precision(ckpt.model, precision)
    return ckpt


def load_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the EMA model (eval mode) and its schedule from a checkpoint directory."""
    d = Path(directory)
    cfg = read_config(d)
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{d}: missing {WEIGHTS_FILE}")
    try:
        unet_cfg = UNetConfig.from_dict(cfg["unet"])
        schedule = NoiseSchedule(ScheduleConfig(**cfg["schedule"]))
        model = UNet(unet_cfg)  # mistyped sizes ("base_channels": 128.0, "dropout": "0.1") fail only here
    except (TypeError, ValueError, AttributeError) as e:  # unknown or mistyped keys, an unknown schedule name
        raise CheckpointError(f"{d / CONFIG_FILE}: invalid model or schedule config: {e}") from e
    class_names = cfg["class_names"]
    if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
        raise CheckpointError(f"{d / CONFIG_FILE}: class_names must be a list of strings")
    class_names = tuple(class_names)
    if len(class_names) != unet_cfg.num_classes:
        raise CheckpointError(f"{d / CONFIG_FILE}: {len(class_names)} class names for a model with "
                              f"{unet_cfg.num_classes} classes")
    # One read: the sha256 is of the very bytes loaded, even if a training run rewrites the file meanwhile.
    blob = weights.read_bytes()
    try:
        model.load_state_dict(load_safetensors(blob), strict=True)
    except (RuntimeError, SafetensorError) as e:  # missing/extra/mis-shaped tensors, unreadable file
        raise CheckpointError(f"{weights}: weights do not match {CONFIG_FILE} or are unreadable: {e}") from e
    model.to(device).eval().requires_grad_(False)
    return Checkpoint(model, schedule, class_names, cfg.get("provenance", {}), d, hashlib.sha256(blob).hexdigest())
