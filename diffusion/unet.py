"""Class-conditional UNet in the style of Ho et al. 2020 (DDPM), with a learned class embedding.

The class embedding has ``num_classes + 1`` rows: the last row is the "null" class used for
classifier-free guidance (labels are dropped to it during training).

Shapes: ``x: [N, 3, H, W]`` float, ``t: [N]`` long in [0, T), ``y: [N]`` long in [0, num_classes]
(``num_classes`` is the null class). Output: predicted noise eps, ``[N, 3, H, W]``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 128                      # channels at the first level
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)  # per-level multiplier of base_channels
    num_res_blocks: int = 2                       # residual blocks per level (down path)
    attn_resolutions: tuple[int, ...] = (16,)     # feature-map sizes that get self-attention
    dropout: float = 0.1
    num_classes: int = 10                         # real classes; one more "null" row is added

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNet config keys: {sorted(unknown)}")
        d = dict(d)
        for k in ("channel_mult", "attn_resolutions"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


# Named architectures. Names are never changed once shipped.
UNET_CONFIGS: dict[str, UNetConfig] = {
    # Ho et al. 2020 CIFAR-10 model: 35.7M parameters.
    "ddpm-cifar10": UNetConfig(),
    # Small CPU candidates (the shipped default is chosen among these by measurement).
    "cpu-small": UNetConfig(base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                            attn_resolutions=(16,), dropout=0.1),
    "cpu-tiny": UNetConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                           attn_resolutions=(16,), dropout=0.1),
}


def _groups(channels: int) -> int:
    """GroupNorm groups: 32 as in DDPM, fewer for the tiny widths used in tests.

    At least 2 channels per group: with one channel per group the norm removes any per-channel
    constant, i.e. the timestep/class embedding that ResBlock adds just before ``norm2``.
    """
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (Transformer / DDPM). t: [N] -> [N, dim] float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # [3, N, 1, HW, C], contiguous: strided q/k/v send SDPA down its slow math path on CPU
        # (the attention op alone: 1.5x slower at 16x16, 128 channels); contiguous ones get the fused kernel.
        qkv = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).permute(1, 0, 3, 2).unsqueeze(2).contiguous()
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])[:, 0]  # [N, HW, C]
        return x + self.proj(a.transpose(-1, -2).reshape(n, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _fold_upsample_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Along ``dim`` (size 3: taps at offsets -1, 0, +1), the 4 taps of the equivalent stride-2 transposed conv.

    With padding 1, output row 2i of conv3x3(nearest2x(x)) reads upsampled rows 2i-1, 2i, 2i+1, that is
    x rows i-1, i, i: taps w[0] on x[i-1] and w[1] + w[2] on x[i]; output row 2i+1 reads x rows i, i, i+1:
    w[0] + w[1] on x[i] and w[2] on x[i+1].  A transposed conv (kernel 4, stride 2, padding 1) writes input
    row i to output rows 2i-1+k for k = 0..3, so its kernel along the axis is [w2, w1+w2, w0+w1, w0].
    """
    a, b, c = w.unbind(dim)
    return torch.stack([c, b + c, a + b, a], dim)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv, computed as one stride-2 transposed conv.

    Same function and parameters (``conv``) as ``conv(interpolate(x, scale_factor=2))``, equal up to float
    rounding (in fp32, the shipped model's output moved by at most 1.2e-6).  It skips the upsampled copy and
    does 16 instead of 36 multiply-adds per input pixel and channel pair: in the shipped model at batch 100,
    bf16 autocast, 2 EPYC cores, the 16x16 -> 32x32 layer took 52 ms instead of 90 (79 conv + 11 copy; torch
    profiler), and default sampling ran 1.08x faster (``benchmarks/sampling_ab.py --unfolded``).
    The 4x4 kernel is folded from the 3x3 weights on every call (0.3 M adds for 128 channels), so training
    updates ``conv.weight`` as before and checkpoints keep their keys.  ``folded = False`` (see
    :func:`set_upsample_folding`) runs the plain interpolate-then-conv instead, the reference that tests
    and ``benchmarks/sampling_ab.py --unfolded`` compare against.
    """

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.folded = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.folded:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        w = _fold_upsample_taps(_fold_upsample_taps(self.conv.weight, 2), 3)  # [out, in, 4, 4]
        return F.conv_transpose2d(x, w.transpose(0, 1), self.conv.bias, stride=2, padding=1)


def set_upsample_folding(model: nn.Module, folded: bool) -> nn.Module:
    """Switch every :class:`Upsample` in ``model`` to the folded transposed conv or the plain reference."""
    for m in model.modules():
        if isinstance(m, Upsample):
            m.folded = folded
    return model


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ch = c.base_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(c.num_classes + 1, emb_dim)  # last row = null class
        self.conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)

        # Down path: remember every feature map's channels for the skip connections.
        self.down = nn.ModuleList()
        skip_chs = [ch]
        cur, res = ch, c.image_size
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                out = ch * mult
                blocks = [ResBlock(cur, out, emb_dim, c.dropout)]
                if res in c.attn_resolutions:
                    blocks.append(AttnBlock(out))
                self.down.append(nn.ModuleList(blocks))
                cur = out
                skip_chs.append(cur)
            if level != len(c.channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                skip_chs.append(cur)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, c.dropout), AttnBlock(cur),
                                  ResBlock(cur, cur, emb_dim, c.dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for _ in range(c.num_res_blocks + 1):
                out = ch * mult
                blocks = [ResBlock(cur + skip_chs.pop(), out, emb_dim, c.dropout)]
                if res in c.attn_resolutions:
                    blocks.append(AttnBlock(out))
                self.up.append(nn.ModuleList(blocks))
                cur = out
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(cur)]))
                res *= 2

        self.norm_out = nn.GroupNorm(_groups(cur), cur)
        self.conv_out = nn.Conv2d(cur, c.in_channels, 3, padding=1)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels).to(x.dtype)) + self.class_emb(y)
        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            for b in blocks:
                h = b(h, emb) if isinstance(b, ResBlock) else b(h)
            hs.append(h)
        for b in self.mid:
            h = b(h, emb) if isinstance(b, ResBlock) else b(h)
        for blocks in self.up:
            for b in blocks:
                if isinstance(b, ResBlock):
                    h = b(torch.cat([h, hs.pop()], dim=1), emb)
                else:
                    h = b(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
