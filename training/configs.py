"""Named training configs.  ``--config`` takes one of these names or a JSON file of the same fields."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from diffusion.samplers import SamplerSettings
from diffusion.schedules import ScheduleConfig, make_betas
from diffusion.unet import UNET_CONFIGS, UNetConfig


CHECKPOINT_DTYPES = ("float32", "float16", "bfloat16")
GRID_SAMPLER = "dpmpp"  # the sampler of the sample grids that training writes (sample_steps steps, unguided)

# Numeric fields: (integer only?, allowed range in words, test; every test is false for NaN). None, the default of
# max_minutes and num_threads, means "not set" there and stays allowed.
_LIMITS: dict[str, tuple[bool, str, Callable[[float], bool]]] = {
    "batch_size": (True, ">= 1", lambda v: v >= 1),
    "lr": (False, "> 0", lambda v: v > 0),
    "weight_decay": (False, ">= 0", lambda v: v >= 0),
    "warmup_steps": (True, ">= 0", lambda v: v >= 0),
    "grad_clip": (False, "> 0", lambda v: v > 0),
    "ema_decay": (False, "in [0, 1)", lambda v: 0 <= v < 1),
    "p_uncond": (False, "in [0, 1]", lambda v: 0 <= v <= 1),
    "max_steps": (True, ">= 1", lambda v: v >= 1),
    "max_minutes": (False, "> 0 (or null: no limit)", lambda v: v > 0),
    "log_every": (True, ">= 1", lambda v: v >= 1),
    "sample_every": (True, ">= 0 (0: never)", lambda v: v >= 0),
    "checkpoint_every": (True, ">= 0 (0: at the end only)", lambda v: v >= 0),
    "sample_steps": (True, ">= 1", lambda v: v >= 1),
    "num_threads": (True, ">= 1 (or null: torch's default)", lambda v: v >= 1),
    "seed": (True, "", lambda v: True),
}
_OPTIONAL = ("max_minutes", "num_threads")
_FLAGS = ("bf16", "channels_last", "compile")


def _check_fields(cfg: "TrainConfig") -> None:
    """ValueError naming the first field whose value is of the wrong type or out of its range."""
    for name, (integer, allowed, ok) in _LIMITS.items():
        value = getattr(cfg, name)
        if value is None and name in _OPTIONAL:
            continue
        number = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not number or not ok(value):
            kind = "an integer" if integer else "a number"
            raise ValueError(f"training config: {name} must be {kind}{' ' + allowed if allowed else ''}, "
                             f"got {value!r}")
    for name in _FLAGS:
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"training config: {name} must be true or false, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.unet, UNetConfig):
        raise ValueError(f"training config: unet must be a UNet config name or an object of its fields, "
                         f"got {cfg.unet!r}")


def _schedule(value: object) -> ScheduleConfig:
    """A config's schedule: a name (``"cosine"``, 1000 timesteps) or ``{"name", "timesteps"}``; checked now, so a
    bad one is a ValueError before training starts."""
    try:
        if isinstance(value, str):
            value = ScheduleConfig(value)
        elif isinstance(value, dict):
            value = ScheduleConfig(**value)
        if not isinstance(value, ScheduleConfig):
            raise TypeError(f"expected a name or {{'name', 'timesteps'}}, got {value!r}")
        make_betas(value.name, value.timesteps)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad schedule in training config: {e}") from None
    return value


@dataclass(frozen=True)
class TrainConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch_size: int = 128          # global batch (split across DDP ranks)
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 1000       # linear LR warm-up
    grad_clip: float = 1.0
    ema_decay: float = 0.9999      # upper bound; warm-up min(decay, (1+s)/(10+s)) keeps short runs sane
    p_uncond: float = 0.1          # label -> null class probability (classifier-free guidance)
    max_steps: int = 800_000
    max_minutes: float | None = None  # stop after this much training wall time (resumable)
    log_every: int = 50
    sample_every: int = 2000       # EMA sample grid (PNG); 0 = never
    checkpoint_every: int = 1000   # training state + EMA checkpoint
    sample_steps: int = 20         # DPM-Solver++ steps for the periodic grids
    bf16: bool = True              # autocast to bfloat16 on CPU and CUDA
    channels_last: bool = True
    compile: bool = False
    num_threads: int | None = None # torch intra-op threads on CPU (None = torch default)
    seed: int = 0
    checkpoint_dtype: str = "float32"  # EMA weights in checkpoint/: float32, or float16 or bfloat16 (half the size)

    def __post_init__(self):
        # checked now (dataclasses.replace runs this too, so command-line overrides are checked as well): a bad
        # value would otherwise surface only later, e.g. log_every 0 after the data is decoded, or a bad
        # checkpoint_dtype at the first checkpoint write, thousands of steps in
        _check_fields(self)
        if self.checkpoint_dtype not in CHECKPOINT_DTYPES:
            raise ValueError(f"checkpoint_dtype must be one of {', '.join(CHECKPOINT_DTYPES)}, "
                             f"got {self.checkpoint_dtype!r}")
        if self.sample_every:  # the sample grids' sampler, checked now rather than at the first grid
            try:
                SamplerSettings(GRID_SAMPLER, self.sample_steps, 1.0).validate(self.schedule.timesteps)
            except ValueError as e:
                raise ValueError(f"training config: sample_steps: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        if isinstance(d.get("unet"), str):
            if d["unet"] not in UNET_CONFIGS:
                raise ValueError(f"unknown UNet config {d['unet']!r}; expected one of {', '.join(UNET_CONFIGS)}")
            d["unet"] = UNET_CONFIGS[d["unet"]]
        elif isinstance(d.get("unet"), dict):
            d["unet"] = UNetConfig.from_dict(d["unet"])
        if "schedule" in d:
            d["schedule"] = _schedule(d["schedule"])
        return cls(**d)


CONFIGS: dict[str, TrainConfig] = {
    # The shipped default: trained on a 2-core CPU; <= 8M parameters (at most 32 MB of weights in fp32; its
    # checkpoint stores them in float16, half that).
    # fp32 NCHW: measured fastest for training this UNet on the 2-core CPU (img/s, median of 3:
    # fp32 NCHW 20.1, fp32 channels_last 17.6, bf16 NCHW 13.1, bf16 channels_last 12.1;
    # benchmarks/training_throughput.py).  Its first 500 steps ran with channels_last.
    "cifar10-cpu": TrainConfig(unet=UNET_CONFIGS["cpu-small"], batch_size=64, lr=3e-4, warmup_steps=100,
                               ema_decay=0.9995, sample_every=1000, checkpoint_every=100, bf16=False,
                               channels_last=False, checkpoint_dtype="float16"),
    # Ho et al. 2020 CIFAR-10 (35.7M parameters), for GPUs.
    "cifar10-ddpm": TrainConfig(unet=UNET_CONFIGS["ddpm-cifar10"], batch_size=128, lr=2e-4, warmup_steps=5000,
                                ema_decay=0.9999, max_steps=800_000, sample_every=10_000, checkpoint_every=5000),
    # The shipped model's size trained on a GPU (benchmarks/gpu_session.py): same UNet, so a checkpoint of it
    # is a drop-in replacement with the same CPU sampling speed; a large batch, bf16 autocast, compiled.
    # Not yet run on a GPU: the learning rate is chosen between sqrt scaling from cifar10-cpu (8.5e-4 at 512)
    # and DDPM's 2e-4 at 128, not measured.
    "cifar10-gpu": TrainConfig(unet=UNET_CONFIGS["cpu-small"], batch_size=512, lr=6e-4, warmup_steps=500,
                               ema_decay=0.9995, log_every=100, sample_every=0, checkpoint_every=1000,
                               bf16=True, channels_last=True, compile=True, checkpoint_dtype="float16"),
    # The other CPU candidate measured against cifar10-cpu at equal wall-clock.
    "cifar10-cpu-tiny": TrainConfig(unet=UNET_CONFIGS["cpu-tiny"], batch_size=64, lr=3e-4, warmup_steps=100,
                                    ema_decay=0.9995, sample_every=1000, checkpoint_every=250, bf16=False),
    # For tests and smoke runs: seconds on a CPU.
    "tiny": TrainConfig(unet=UNetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                        attn_resolutions=(16,), dropout=0.0),
                        schedule=ScheduleConfig("linear", 1000), batch_size=8, warmup_steps=2,
                        max_steps=4, log_every=1, sample_every=0, checkpoint_every=2, sample_steps=2,
                        ema_decay=0.999),
}


def resolve_config(name_or_file: str, **overrides) -> TrainConfig:
    """A named config, or a JSON file of TrainConfig fields (``unet`` may be a UNet config name)."""
    if name_or_file in CONFIGS:
        cfg = CONFIGS[name_or_file]
    else:
        p = Path(name_or_file)
        if not p.is_file():
            raise ValueError(f"unknown config {name_or_file!r}: not one of {', '.join(CONFIGS)} and not a JSON file")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {p}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        if not isinstance(d, dict):
            raise ValueError(f"config file {p}: expected a JSON object of training config fields, "
                             f"got {type(d).__name__}")
        cfg = TrainConfig.from_dict(d)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(cfg, **overrides) if overrides else cfg
