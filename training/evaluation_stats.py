"""Statistics for comparing classifier runs over seeds, without scipy.

- ``mean_std``: mean and sample standard deviation (ddof = 1).
- ``paired_delta``: the paired difference treated - baseline over seeds with a Student-t confidence
  interval, mean +- t_{(1+level)/2, n-1} * sd / sqrt(n).
- ``t_quantile``: Student-t quantiles from the regularised incomplete beta function (Numerical
  Recipes 6.4 continued fraction), inverted by bisection; agrees with tables to 1e-4.
"""
from __future__ import annotations

import math
from typing import Sequence


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom: 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 for t > 0."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (bisection on ``t_cdf``); t_quantile(0.975, 4) = 2.776."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1; None for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def paired_delta(baseline: Sequence[float], treated: Sequence[float], level: float = 0.95) -> dict:
    """Paired difference treated - baseline over seeds, with a t-interval: mean +- t_{(1+level)/2, n-1} sd / sqrt(n).

    With one seed the spread is unknown: ``std``, ``ci95`` and ``t_crit`` are None.
    """
    if len(baseline) != len(treated) or not baseline:
        raise ValueError("need one baseline and one treated value per seed")
    d = [t - b for b, t in zip(baseline, treated)]
    mean, sd = mean_std(d)
    out = {"mean": mean, "std": sd, "per_seed": d, "n": len(d), "ci95": None, "t_crit": None,
           "significant": None}
    if sd is not None:
        t = t_quantile((1 + level) / 2, len(d) - 1)
        half = t * sd / math.sqrt(len(d))
        out.update(ci95=[mean - half, mean + half], t_crit=t, significant=bool(mean - half > 0 or mean + half < 0))
    return out
