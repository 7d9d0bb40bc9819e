"""Image classifiers for the augmentation experiment and the generator measures.

Two architectures, one training loop (CPU or CUDA, same code):

- ``mlp``: the report's multilayer perceptron.  Flattened 32x32x3 input ->
  ``Linear(3072, w) - ReLU - Dropout(0.2) - Linear(w, w/2) - ReLU - Dropout(0.2) - Linear(w/2, K)``;
  default ``w = 512`` (3072-512-256-10: 1,707,274 parameters).  AdamW, horizontal flips.
- ``cnn``: the ResNet-9 of Page's DAWNBench entry ("How to train your ResNet", 2018), which
  reaches ~94% on CIFAR-10 at width 64 in 24 epochs.  With width ``w``::

      prep    conv-bn-relu(3 -> w)                                            32x32
      layer1  conv-bn-relu(w -> 2w), maxpool 2, + residual(2 x conv-bn-relu)  16x16
      layer2  conv-bn-relu(2w -> 4w), maxpool 2                                8x8
      layer3  conv-bn-relu(4w -> 8w), maxpool 2, + residual(2 x conv-bn-relu)  4x4
      head    global max pool -> features [8w] -> Linear(8w, K, no bias) * 0.125

  3x3 convolutions without bias; 6,573,120 parameters at w = 64 (Page's net; use it on a GPU),
  1,646,112 at w = 32, 412,944 at w = 16 (the default, ``DEFAULT_WIDTH``, sized for a 2-core CPU).
  SGD with Nesterov momentum, one-cycle LR, label smoothing 0.2, random crop (4 px reflect
  padding) and horizontal flips; channels_last.

Training runs under bf16 autocast on CUDA; on a CPU in fp32 unless ``TrainSettings.cpu_bf16`` (one CNN step of
512 images at w = 16 took 0.49 s in fp32 and 0.23 s in bf16 on a 2-core Xeon with AMX, medians of six).

Every model takes ``x: [N, 3, H, W] float in [-1, 1]`` (``training.data.to_model_range``) and
normalises with the CIFAR-10 channel statistics inside, so features and logits need no outside
preprocessing.  ``model.features(x)`` gives the penultimate layer ``[N, D]`` (D = 8w for the CNN,
w/2 for the MLP), used as the feature space of ``training.features_metrics``.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .data import to_model_range

log = logging.getLogger(__name__)

ClassifierKind = Literal["mlp", "cnn"]
CLASSIFIERS: tuple[str, ...] = ("mlp", "cnn")
DEFAULT_WIDTH: dict[str, int] = {"mlp": 512, "cnn": 16}
# CIFAR-10 training-set channel mean / std in [0, 1] units.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

ProgressFn = Callable[[float], None]  # fraction of training done, 0..1; may raise to cancel


class _Normalize(nn.Module):
    """[-1, 1] images -> per-channel standardised (CIFAR-10 statistics)."""

    def __init__(self):
        super().__init__()
        mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1) * 2 - 1
        std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1) * 2
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MLP(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 512, dropout: float = 0.2, image_size: int = 32):
        super().__init__()
        self.kind, self.width, self.num_classes = "mlp", width, num_classes
        self.norm = _Normalize()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * image_size * image_size, width), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(width, width // 2), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.head = nn.Linear(width // 2, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.f = nn.Sequential(_conv_bn(c, c), _conv_bn(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class ResNet9(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 32, logit_scale: float = 0.125):
        super().__init__()
        self.kind, self.width, self.num_classes = "cnn", width, num_classes
        w = width
        self.norm = _Normalize()
        self.body = nn.Sequential(
            _conv_bn(3, w),
            _conv_bn(w, 2 * w), nn.MaxPool2d(2), _Residual(2 * w),
            _conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
            _conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), _Residual(8 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(8 * w, num_classes, bias=False)
        self.logit_scale = logit_scale

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(x).contiguous(memory_format=torch.channels_last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)) * self.logit_scale


def build_classifier(kind: ClassifierKind, num_classes: int = 10, width: int | None = None) -> nn.Module:
    """A fresh ``mlp`` or ``cnn`` (``width=None``: ``DEFAULT_WIDTH[kind]``), weights from the global RNG."""
    if kind not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {kind!r}; expected one of {', '.join(CLASSIFIERS)}")
    width = width or DEFAULT_WIDTH[kind]
    if width < 2:
        raise ValueError(f"width must be at least 2, got {width}")
    if kind == "mlp":
        return MLP(num_classes, width)
    return ResNet9(num_classes, width).to(memory_format=torch.channels_last)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 10
    steps: int | None = None     # optimizer steps; None: epochs x full batches per epoch (else epochs is ignored)
    batch_size: int = 512
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.4              # peak of the one-cycle schedule (linear up, linear down to 0)
    warmup: float = 0.2          # share of the steps spent rising to the peak
    weight_decay: float = 5e-4
    momentum: float = 0.9        # SGD (Nesterov) only
    label_smoothing: float = 0.2
    crop: bool = True            # random 32x32 crop of the 4-px reflect-padded image
    flip: bool = True            # random horizontal flip
    cpu_bf16: bool = False       # bf16 autocast on a CPU too (on CUDA training always runs under it)

    def to_dict(self) -> dict:
        """The settings; ``cpu_bf16`` only when on, so the saved-run keys of fp32 runs stay what they were."""
        d = asdict(self)
        if not self.cpu_bf16:
            del d["cpu_bf16"]
        return d


def default_train_settings(kind: ClassifierKind, epochs: int = 10, **overrides) -> TrainSettings:
    """Per-architecture defaults (DAWNBench recipe for the CNN, AdamW for the MLP)."""
    if kind == "mlp":
        base = TrainSettings(epochs, batch_size=256, optimizer="adamw", lr=1e-3, weight_decay=0.05,
                             label_smoothing=0.0, crop=False, flip=True)
    else:
        base = TrainSettings(epochs)
    return replace(base, **overrides)


def augment(x: torch.Tensor, g: torch.Generator, crop: bool, flip: bool, pad: int = 4) -> torch.Tensor:
    """x: [N, C, H, W] -> same shape; per-image random crop of the reflect-padded image and flip."""
    n, c, h, w = x.shape
    if crop:
        xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
        iy = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [N, 1, H, 1]
        ix = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [N, 1, 1, W]
        x = xp[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
               iy, ix]
    if flip:
        f = (torch.rand(n, generator=g) < 0.5).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(f, x.flip(-1), x)
    return x


def _autocast(device: torch.device, cpu_bf16: bool = False):
    """bf16 autocast on CUDA, and on a CPU when asked (``TrainSettings.cpu_bf16``); else fp32."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_bf16):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _lr_factor(step: int, total: int, warmup: float) -> float:
    """One-cycle: 0 -> 1 over the first ``warmup`` share of the steps, then linearly back to 0."""
    peak = max(1, round(total * warmup))
    if step < peak:
        return (step + 1) / peak
    return max(0.0, (total - step) / max(1, total - peak))


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: TrainSettings, *,
                     device: str | torch.device = "cpu",
                     seed: int = 0,                        # shuffling, augmentation and dropout
                     progress: ProgressFn | None = None,  # called <= ~100 times and at the end
                     desc: str = "train",
                     show_bar: bool = True,
                     ) -> dict:
    """Train ``model`` in place on ``images: [N, 3, H, W] uint8``, ``labels: [N] int64``.

    Returns ``{"steps", "final_loss", "seconds"}``.  The global RNG is left untouched.
    """
    import time

    device = torch.device(device)
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images (got {len(images)} images, {len(labels)} labels)")
    if settings.batch_size < 1:  # else no step is ever taken, and the loop below never ends
        raise ValueError(f"batch size must be at least 1, got {settings.batch_size}")
    model.to(device).train()
    x_all, y_all = images.to(device), labels.to(device)
    n = len(x_all)
    # Under a step budget every run takes batches of the one batch size, also on fewer images than a batch
    # (an arm of the evaluation at small k, which would otherwise train on smaller batches than the arms it
    # is compared with): such a batch is cut from as many shuffles of the images as it needs, so every image
    # is in it floor(bs/n) or ceil(bs/n) times.  Trained for epochs, a data set smaller than a batch is one batch.
    bs = settings.batch_size if settings.steps is not None else min(settings.batch_size, n)
    shuffles = -(-bs // n)  # 1 whenever n >= bs: one shuffle per epoch, as before
    per_epoch = shuffles * n // bs  # drop the last partial batch (reshuffled each epoch, so nothing is lost for long)
    total = settings.steps if settings.steps is not None else per_epoch * settings.epochs
    if total < 1:
        raise ValueError(f"steps must be at least 1, got {total}")
    if settings.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum, nesterov=True,
                              weight_decay=settings.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    g = torch.Generator().manual_seed(seed)
    every = max(1, total // 100)
    t0, step, loss_ema = time.perf_counter(), 0, float("nan")
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False, disable=not show_bar)
    cuda_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_ids):
        torch.manual_seed(seed)  # dropout
        epoch = 0
        while step < total:  # whole epochs, the last one cut short when a step budget ends mid-epoch
            perm = torch.cat([torch.randperm(n, generator=g) for _ in range(shuffles)]).to(device)
            for b in range(min(per_epoch, total - step)):
                idx = perm[b * bs:(b + 1) * bs]
                x = augment(to_model_range(x_all[idx]), g, settings.crop, settings.flip)
                for group in opt.param_groups:
                    group["lr"] = settings.lr * _lr_factor(step, total, settings.warmup)
                with _autocast(device, settings.cpu_bf16):
                    loss = F.cross_entropy(model(x).float(), y_all[idx], label_smoothing=settings.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if step % every == 0 or step == total:
                    value = loss.item()
                    loss_ema = value if math.isnan(loss_ema) else 0.9 * loss_ema + 0.1 * value
                    bar.update(step - bar.n)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss_ema:.3f}")
                    if progress:
                        progress(step / total)
            epoch += 1
    bar.close()
    model.eval()
    return {"steps": total, "batch_size": bs, "epochs": round(total * bs / n if shuffles > 1 else total / per_epoch, 2),
            "final_loss": loss_ema,
            "seconds": round(time.perf_counter() - t0, 2)}


@torch.no_grad()
def _batched(fn, images: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch_size):
        x = to_model_range(images[i:i + batch_size].to(device))
        with _autocast(device):
            out.append(fn(x).float().cpu())
    return torch.cat(out)


def predict(model: nn.Module, images: torch.Tensor, device: str | torch.device = "cpu",
            batch_size: int = 500) -> torch.Tensor:
    """images: [N, 3, H, W] uint8 -> predicted class [N] int64 (model in eval mode)."""
    model.to(device).eval()
    return _batched(model, images, torch.device(device), batch_size).argmax(1)


def extract_features(model: nn.Module, images: torch.Tensor, device: str | torch.device = "cpu",
                     batch_size: int = 500) -> torch.Tensor:
    """images: [N, 3, H, W] uint8 -> penultimate-layer features [N, D] float32."""
    model.to(device).eval()
    return _batched(model.features, images, torch.device(device), batch_size)


def confusion_matrix(true: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[K, K] int64 counts; row = true class, column = predicted class."""
    return torch.bincount(true * num_classes + pred, minlength=num_classes * num_classes).view(num_classes, num_classes)
