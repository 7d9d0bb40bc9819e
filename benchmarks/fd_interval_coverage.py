"""How often do the paired-bootstrap intervals of a Frechet-distance difference hold what they should?

``training.features_metrics.paired_bootstrap`` gives a 95% interval for FD(a) - FD(b) and FD(a) / FD(b) - 1 of
two paired sets of generated images (image i of both from the same seed), the brackets of the sampler tables
(``benchmarks/sampler_quality.py``).  A resample holds repeated images, which biases its distances upward,
so the plain percentile interval sits off the estimate; ``paired_bootstrap`` moves it by the resamples'
own bias.  This script draws many paired sets from two known Gaussian "generators" (a shared latent per
image plus each generator's own noise and shift, like two samplers from the same seeds) against a standard
normal "real" set, and counts how often each kind of interval holds

- the expected estimate at this many images (the mean of the estimates over the draws): what an interval
  of a difference "at N images" should hold 95% of the time;
- the value with many images (from 400,000 per generator): what the difference "really" is;
- its own estimate.

It also checks that ``paired_bootstrap`` returns the moved interval.  Only numbers; it times nothing:

    python benchmarks/fd_interval_coverage.py --features 128 --images 100 --draws 100   # the sampler tables' case
    python benchmarks/fd_interval_coverage.py --features 128 --images 1000 --draws 40   # 1,000-image rows
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.features_metrics import _fd_of_sets, _sqrt_psd, frechet_distance_infinity, paired_bootstrap  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=128, help="feature dimension (the project CNN's: 128)")
    p.add_argument("--images", type=int, default=100, help="paired images per set")
    p.add_argument("--draws", type=int, default=100, help="simulated pairs of sets")
    p.add_argument("--boot", type=int, default=300, help="bootstrap resamples per draw")
    p.add_argument("--shift", type=float, nargs=2, default=(0.25, 0.20), metavar=("A", "B"),
                   help="each generator's mean shift per feature from the real set's 0")
    p.add_argument("--scale", type=float, nargs=2, default=(1.15, 1.10), metavar=("A", "B"),
                   help="each generator's scale of the shared latent")
    p.add_argument("--noise", type=float, default=0.5, help="each generator's own noise (sd) per image")
    p.add_argument("--fd-infinity", action="store_true",
                   help="also the relative difference of FD_inf (training.features_metrics.frechet_distance_infinity) "
                        "of each draw, against the value with many images (needs --images >= 6 x --features)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.features < 1 or a.images < 2 or a.draws < 2 or a.boot < 2:
        p.error("need --features >= 1, --images >= 2, --draws >= 2 and --boot >= 2")
    if a.fd_infinity and a.images < 6 * a.features:  # else found only after the large draws
        p.error(f"--fd-infinity needs --images >= 6 x --features ({6 * a.features}), got {a.images}")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    d = a.features
    g = torch.Generator().manual_seed(a.seed)
    mu_r, s_r = torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)
    root = _sqrt_psd(s_r)

    def fd(f: torch.Tensor) -> torch.Tensor:
        """f: [B, n, D] -> [B] distances to the real N(0, I)."""
        return _fd_of_sets(mu_r, s_r, root, f)

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(m, d, generator=g, dtype=torch.float64)  # what the paired images share (the seed)
        a_ = z * a.scale[0] + a.noise * torch.randn(m, d, generator=g, dtype=torch.float64) + a.shift[0]
        b_ = z * a.scale[1] + a.noise * torch.randn(m, d, generator=g, dtype=torch.float64) + a.shift[1]
        return a_, b_

    many = 400_000
    big_a, big_b = draw(many)
    truth = {"difference": float(fd(big_a[None]) - fd(big_b[None])),
             "relative": float(fd(big_a[None]) / fd(big_b[None]) - 1)}
    del big_a, big_b
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    kinds = ("percentile", "moved")
    estimates = {m: [] for m in truth}
    intervals = {(m, k): [] for m in truth for k in kinds}
    checked = False
    fd_inf: list[float] = []
    for i in range(a.draws):
        fa, fb = draw(a.images)
        idx = torch.randint(a.images, (a.boot, a.images), generator=g)
        x, y = _fd_of_sets(mu_r, s_r, root, fa, idx), _fd_of_sets(mu_r, s_r, root, fb, idx)
        a0, b0 = float(fd(fa[None])), float(fd(fb[None]))
        for m, est, v in (("difference", a0 - b0, x - y), ("relative", a0 / b0 - 1, x / y - 1)):
            lo, hi = torch.quantile(v, q).tolist()
            shift = est - float(v.mean())
            estimates[m].append(est)
            intervals[(m, "percentile")].append((lo, hi))
            intervals[(m, "moved")].append((lo + shift, hi + shift))
        if a.fd_infinity:
            inf_a = frechet_distance_infinity(fa, (mu_r, s_r), seed=a.seed + i)
            inf_b = frechet_distance_infinity(fb, (mu_r, s_r), seed=a.seed + i)
            fd_inf.append(inf_a / inf_b - 1)
        if not checked:  # the library's intervals are the moved ones: the same resamples give the same numbers
            ones = torch.ones(a.images, dtype=torch.bool)
            out = paired_bootstrap(fa, ones, fb, ones, (mu_r, s_r), n_boot=a.boot, seed=a.seed)
            same = torch.randint(a.images, (a.boot, a.images), generator=torch.Generator().manual_seed(a.seed))
            v = _fd_of_sets(mu_r, s_r, root, fa, same) / _fd_of_sets(mu_r, s_r, root, fb, same) - 1
            lo, hi = torch.quantile(v, q).tolist()
            est = a0 / b0 - 1
            want = [est, lo + est - float(v.mean()), hi + est - float(v.mean())]
            assert all(abs(u - w) <= 1e-9 * max(1.0, abs(w)) for u, w in zip(out["frechet_distance_relative"], want)), \
                (out["frechet_distance_relative"], want)
            checked = True
        print(f"draw {i + 1}/{a.draws}", end="\r", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    rows = []
    print(f"{a.features} features, {a.images} paired images, {a.draws} draws x {a.boot} resamples, 95% intervals")
    print(f"{'measure':<11} {'interval':<11} {'holds E[est]':>12} {'holds the value with many images':>33} "
          f"{'holds its estimate':>19} {'mean width':>11}")
    for m in truth:
        ests = estimates[m]
        mean_est = sum(ests) / len(ests)
        for k in kinds:
            iv = intervals[(m, k)]
            row = {"measure": m, "interval": k,
                   "holds_expected_estimate": sum(lo <= mean_est <= hi for lo, hi in iv) / len(iv),
                   "holds_value_with_many_images": sum(lo <= truth[m] <= hi for lo, hi in iv) / len(iv),
                   "holds_its_estimate": sum(lo <= e <= hi for (lo, hi), e in zip(iv, ests)) / len(iv),
                   "mean_width": sum(hi - lo for lo, hi in iv) / len(iv)}
            rows.append(row)
            print(f"{m:<11} {k:<11} {row['holds_expected_estimate']:>12.2f} "
                  f"{row['holds_value_with_many_images']:>33.2f} "
                  f"{row['holds_its_estimate']:>19.2f} {row['mean_width']:>11.4f}")
        sd = (sum((e - mean_est) ** 2 for e in ests) / (len(ests) - 1)) ** 0.5
        print(f"{m:<11} expected estimate at {a.images} images {mean_est:+.4f} (sd {sd:.4f}); "
              f"with {many:,} images {truth[m]:+.4f}")
    out = {"settings": vars(a), "truth": truth, "rows": rows}
    if fd_inf:
        m = sum(fd_inf) / len(fd_inf)
        sd = (sum((e - m) ** 2 for e in fd_inf) / (len(fd_inf) - 1)) ** 0.5
        print(f"relative   FD_inf (extrapolated to infinitely many images): {m:+.4f} (sd {sd:.4f}); "
              f"with {many:,} images {truth['relative']:+.4f}")
        out["fd_infinity_relative"] = {"mean": m, "sd": sd}
    return out


if __name__ == "__main__":
    main()
