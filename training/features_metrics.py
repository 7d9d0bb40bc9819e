"""Measures of a generator in a feature space: Frechet distance, precision/recall, density/coverage,
class fidelity; and pool3 features of a user-supplied Inception v3.

All functions take features ``[N, D]`` (any float dtype; computed in float64 for the Frechet
distance, float32 for the k-NN measures) and return plain Python floats.

- Frechet distance (Heusel et al. 2017, FID without the Inception prescription):
  ``d^2 = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r^1/2 S_g S_r^1/2)^1/2)``.
- Precision / recall (Kynkaanniemi et al. 2019): the real manifold is the union of balls around
  each real feature with radius = distance to its k-th nearest real neighbour; precision is the
  share of generated features inside it, recall the share of real features inside the generated
  manifold (built the same way).
- Density / coverage (Naeem et al. 2020): density = (1 / kM) sum_j #{i : Y_j in B(X_i, r_k(X_i))};
  coverage = share of real X_i whose ball holds at least one generated Y_j.
- Class fidelity: the share of generated images that a real-data classifier assigns to the
  class they were generated for, overall and per class.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import to_model_range

CHUNK = 2048  # rows per block of pairwise distances (memory ~ CHUNK x N floats)


# --- Frechet distance -------------------------------------------------------------------------

def feature_stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f: [N, D] -> (mu [D], Sigma [D, D]) in float64; Sigma is the unbiased covariance."""
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need [N >= 2, D] features, got shape {tuple(f.shape)}")
    f = f.double()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a positive semi-definite matrix (eigenvalues clipped at 0)."""
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def _frechet_to(mu1: torch.Tensor, s1: torch.Tensor, sqrt_s1: torch.Tensor, mu2: torch.Tensor,
                s2: torch.Tensor) -> torch.Tensor:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1^1/2 S2 S1^1/2)^1/2), clipped at 0, for one (mu1, S1)
    with its square root given, against mu2 [..., D], S2 [..., D, D] (batched over the leading dims)."""
    cross = torch.linalg.eigvalsh(sqrt_s1 @ s2 @ sqrt_s1).clamp(min=0).sqrt().sum(-1)  # Tr((S1 S2)^1/2)
    tr2 = s2.diagonal(dim1=-2, dim2=-1).sum(-1)
    return ((mu1 - mu2).pow(2).sum(-1) + s1.trace() + tr2 - 2 * cross).clamp(min=0)


def frechet_distance_from_stats(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1^1/2 S2 S1^1/2)^1/2)  (float64)."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    return float(_frechet_to(mu1, s1, _sqrt_psd(s1), mu2, s2))


def _fd_of_sets(mu_r: torch.Tensor, s_r: torch.Tensor, sqrt_s_r: torch.Tensor, f: torch.Tensor,
                idx: torch.Tensor | None = None) -> torch.Tensor:
    """Frechet distances to (mu_r, s_r) of several sets of n features: ``f`` [B, n, D] float64 -> [B]; or, with
    ``idx`` [B, n] (row indices), of the sets ``f[idx]`` of ``f`` [N, D], gathered a few at a time (~16 MB)."""
    if idx is not None:
        step = max(1, 2_000_000 // (idx.shape[1] * f.shape[1]))
        return torch.cat([_fd_of_sets(mu_r, s_r, sqrt_s_r, f[idx[i:i + step]]) for i in range(0, len(idx), step)])
    mu = f.mean(1)
    c = f - mu[:, None]
    return _frechet_to(mu_r, s_r, sqrt_s_r, mu, c.transpose(1, 2) @ c / (f.shape[1] - 1))


def frechet_distance_infinity(feats: torch.Tensor, ref_stats: tuple[torch.Tensor, torch.Tensor], *,
                              fractions: Sequence[float] = (0.5, 0.625, 0.75, 0.875, 1.0), reps: int = 20,
                              seed: int = 0) -> float:
    """The Frechet distance of ``feats`` [N, D] to ``ref_stats`` extrapolated to infinitely many generated
    images (Chong & Forsyth 2020, "FID_inf"): the mean distance of ``reps`` random subsets (without repeats) at
    each ``fractions`` x N images, fitted as a + b / size by least squares; returns a.

    A set's Frechet distance is biased upward by about b / N, so at few images a relative difference between
    two generators shrinks (``benchmarks/fd_interval_coverage.py``).  The fit holds once the smallest subset
    has several times as many images as features: in that script's simulation (128 features, two generators
    52.2% apart with many images, ``--images 1000 --fd-infinity``) it read +53.0% (sd 2.2%) from 1,000 images
    where the plain distance read +36.1%; a throwaway run of ten draws at 300 images read +78.8%.  So the
    smallest subset must hold at least 3 D images (N >= 6 D at the default fractions: 768 in 128 features).
    """
    n, d = feats.shape
    sizes = sorted({int(round(f * n)) for f in fractions})
    if len(sizes) < 2 or sizes[0] < 2 or sizes[-1] > n or reps < 1:
        raise ValueError(f"need at least two subset sizes in 2..{n} and reps >= 1, got {sizes}, {reps}")
    if sizes[0] < 3 * d:
        raise ValueError(f"FD_inf needs the smallest subset ({sizes[0]} images) to hold at least 3x the {d} features")
    mu_r, s_r = (t.double() for t in ref_stats)
    r = _sqrt_psd(s_r)
    g = torch.Generator().manual_seed(seed)
    f = feats.double()
    means = []
    for m in sizes:
        idx = torch.stack([torch.randperm(n, generator=g)[:m] for _ in range(reps)])
        means.append(_fd_of_sets(mu_r, s_r, r, f, idx).mean())
    x = torch.tensor([[1.0, 1.0 / m] for m in sizes], dtype=torch.float64)
    return float(torch.linalg.lstsq(x, torch.stack(means)[:, None]).solution[0, 0])


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D], [M, D]."""
    return frechet_distance_from_stats(*feature_stats(real), *feature_stats(fake))


def paired_bootstrap(feats_a: torch.Tensor, correct_a: torch.Tensor, feats_b: torch.Tensor,
                     correct_b: torch.Tensor, ref_stats: tuple[torch.Tensor, torch.Tensor], *,
                     n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile intervals for the differences a - b of two generated sets whose image i is made from
    the same seed and class in both (two sampler settings, say): Frechet distance to ``ref_stats``
    (absolute, and relative to b's), and class fidelity (``correct_*``: [N] bools, image i classified
    as requested).  Each resample draws the same image indices for both sets, so what the images share
    cancels and the interval is that of the difference, which is narrower than either set's own.
    At small N the Frechet distance is biased upward; both sets carry the same bias, not the same noise.
    Returns ``[estimate, low, high]`` per difference (class fidelity as a fraction).

    Class fidelity gets a percentile interval.  The Frechet differences get percentile intervals moved by
    the resampling's own bias (the estimate minus the resamples' mean): a resample holds repeated images,
    which biases both of its distances upward: that shifts their difference (upward, in the simulation
    below) and pulls their ratio toward 0, so plain percentile intervals sat off their estimates.  In a
    simulation (Gaussian features, 128 of them, 100 paired images; ``benchmarks/fd_interval_coverage.py``) the
    plain interval of the ratio held the expected estimate in 36% of draws and the moved one in 92%.  Either
    way the interval is that of the difference *at N images*: at N near the feature count the distances' own bias shrinks a relative
    difference far below its value with many images (the same simulation: +10% at 100 images where it is
    +52%), so a small difference at small N is weak evidence of a small one.
    """
    n = len(feats_a)
    if not (len(feats_b) == len(correct_a) == len(correct_b) == n) or n < 2:
        raise ValueError(f"need two paired sets of the same size >= 2, got {len(feats_a)}, {len(feats_b)}, "
                         f"{len(correct_a)}, {len(correct_b)}")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    mu_r, s_r = (t.double() for t in ref_stats)
    r = _sqrt_psd(s_r)  # one square root of the reference for all resamples

    fa, fb = feats_a.double(), feats_b.double()
    ca, cb = correct_a.double(), correct_b.double()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_boot, n), generator=g)
    x, y = _fd_of_sets(mu_r, s_r, r, fa, idx), _fd_of_sets(mu_r, s_r, r, fb, idx)
    d_fd, d_rel = x - y, torch.where(y > 0, x / y - 1, float("nan"))
    d_fid = ca[idx].mean(1) - cb[idx].mean(1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)

    def interval(v: torch.Tensor, estimate: float | None = None) -> list[float]:
        """Percentile interval of the resamples ``v``; with ``estimate``, moved by estimate - mean(v)."""
        lo, hi = torch.quantile(v, q).tolist()
        shift = 0.0 if estimate is None else estimate - float(v.mean())
        return [lo + shift, hi + shift]

    a0, b0 = float(_fd_of_sets(mu_r, s_r, r, fa[None])), float(_fd_of_sets(mu_r, s_r, r, fb[None]))
    rel0 = a0 / b0 - 1 if b0 > 0 else float("nan")
    return {"frechet_distance": [a0 - b0, *interval(d_fd, a0 - b0)],
            "frechet_distance_relative": [rel0, *interval(d_rel, rel0)],
            "class_fidelity": [float(ca.mean() - cb.mean()), *interval(d_fid)],
            "n_boot": n_boot, "level": level, "images": n}


# --- k-NN manifold measures -------------------------------------------------------------------

def knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """[N] distance of each row of x to its k-th nearest other row (the point itself excluded)."""
    if not 1 <= k < len(x):
        raise ValueError(f"k must be in 1..{len(x) - 1} for {len(x)} points, got {k}")
    x = x.float()
    return torch.cat([torch.cdist(x[i:i + CHUNK], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), CHUNK)])


def _ball_counts(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """[len(points)] number of balls B(centre_i, radius_i) that hold each point."""
    points, centres = points.float(), centres.float()
    return torch.cat([(torch.cdist(points[i:i + CHUNK], centres) <= radii[None]).sum(1)
                      for i in range(0, len(points), CHUNK)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN radii."""
    precision = (_ball_counts(fake, real, knn_radii(real, k)) > 0).double().mean().item()
    recall = (_ball_counts(real, fake, knn_radii(fake, k)) > 0).double().mean().item()
    return {"precision": precision, "recall": recall}


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict:
    """Density and coverage (Naeem et al. 2020); density can exceed 1, coverage is in [0, 1]."""
    radii = knn_radii(real, k)
    density = _ball_counts(fake, real, radii).double().sum().item() / (k * len(fake))
    real_f, fake_f = real.float(), fake.float()
    nearest_fake = torch.cat([torch.cdist(real_f[i:i + CHUNK], fake_f).min(1).values
                              for i in range(0, len(real_f), CHUNK)])
    coverage = (nearest_fake <= radii).double().mean().item()
    return {"density": density, "coverage": coverage}


def class_fidelity(predicted: torch.Tensor, requested: torch.Tensor, class_names: Sequence[str]) -> dict:
    """Share of images classified as the class they were generated for: overall and per class."""
    hit = (predicted == requested).double()
    per_class = {}
    for c, name in enumerate(class_names):
        mask = requested == c
        per_class[name] = hit[mask].mean().item() if mask.any() else None
    return {"overall": hit.mean().item(), "per_class": per_class}


# --- Inception v3 (weights supplied by the user) ----------------------------------------------

def load_inception(weights: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """torchvision's Inception v3 with a local state dict (``.pth``/``.pt`` or ``.safetensors``);
    the classifier replaced by identity so the output is the 2048-d pool3 feature.

    Expects torchvision's architecture (e.g. ``inception_v3_google-0cc3c7bd.pth``); the
    pytorch-fid ``pt_inception`` weights have a different layout and will not load.
    """
    from torchvision.models import inception_v3

    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: not a torchvision inception_v3 state dict ({str(e).splitlines()[0]})") from e
    model.fc = nn.Identity()
    return model.to(device).eval()


@torch.no_grad()
def inception_features(model: nn.Module, images: torch.Tensor, device: str | torch.device = "cpu",
                       batch_size: int = 100) -> torch.Tensor:
    """images: [N, 3, H, W] uint8 -> pool3 features [N, 2048] float32.

    Images are scaled to [-1, 1] and resized bilinearly to 299x299: the input the Google weights
    expect (what torchvision's ``transform_input`` produces from ImageNet-normalised input).
    """
    out = []
    for i in range(0, len(images), batch_size):
        x = to_model_range(images[i:i + batch_size].to(device))
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        out.append(model(x).float().cpu())
    return torch.cat(out)
