"""Issue 5: DPM-Solver++ with its steps evenly spaced in logSNR against the same evenly spaced in time.

Until 2026-12-04 the service's samplers spaced their steps evenly in the timestep index (``spacing=time``); this
script's measurements made ``spacing=logsnr`` the default then (docs/results.md "Steps evenly spaced in logSNR").
Lu et al. (2022) recommend steps evenly spaced in logSNR, lambda_t = log(alpha_t / sigma_t), for pixel-space
models at low resolution: on the shipped linear schedule the time spacing leaves one large jump in lambda at
the end (sigma 0.19 -> 0.01 at 20 steps), the logSNR spacing puts more steps at low noise.  This script measures
what that does to the generator measures, on the same seeds, against the time-spaced row:

    python benchmarks/step_spacing.py --data ../shared/data/cifar10-jpeg.tar.gz --n-per-class 100 \\
        --steps 20,10 --threads 2 --precision bf16

Each row: ``dpmpp_sde`` (or ``--sampler``) at K steps, the service's default guidance and interval, image j of
class c with seed c x 1,000,000 + j, sampled through the synthetic cache (so a row that ``dreamdata evaluate`` or
``metrics`` already sampled, or an earlier run of this script, is read back); the logSNR rows are the service's
``spacing=logsnr`` setting (``diffusion.samplers.step_timesteps``).
FD and class fidelity are measured in the features of the CNN trained on the real training split
(``training.generator_metrics``), against all real test images; intervals are the paired bootstrap of
``training.features_metrics.paired_bootstrap`` against the time-spaced row of the same steps.  The guidance
interval is in sigma, so the logSNR rows guide at other steps (and usually fewer) than the time-spaced ones:
the "calls" column says how many model calls an image took.  ``--guidance`` (repeatable) adds both spacings'
rows at other guidance settings.  Every row also gets precision, recall, density and coverage (k = 5 neighbours,
against ``--n-per-class`` real test images per class, as ``dreamdata metrics``), and, from 6 images per feature
up (768 in the feature CNN's 128: ``--n-per-class`` 77 or more), FD_inf: the FD extrapolated to infinitely many
generated images (``training.features_metrics.frechet_distance_infinity``), whose relative differences do not
shrink with few images as the plain FD's do (``benchmarks/fd_interval_coverage.py``).  ``--seed S`` samples
another seed set (image j of class c: seed S + c x 1,000,000 + j) to check a finding on images it was not
picked on.

``--reference-steps 1000`` adds the report's method as the reference: DDPM ancestral at 1000 steps with the first
guidance setting, on the same seeds, through the same cache, and pairs every row against it too ("vs ref").
It costs about 50 times a 20-step row (1,445 model calls per image at the service's guidance), so fill its cache
entry first where the run may be cut short (``--compile`` helps on a CPU; a stopped run keeps the images it wrote):

    python benchmarks/step_spacing.py --data ../shared/data/cifar10-jpeg.tar.gz --n-per-class 100 --steps 20 \
        --guidance 6@0.28:4 --guidance 8@0.28:4 --reference-steps 1000 --threads 2 --precision bf16 --compile
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.checkpoint import load_for_sampling  # noqa: E402
from diffusion.precision import compile_for_sampling  # noqa: E402
from diffusion.samplers import SamplerSettings, model_calls, step_timesteps  # noqa: E402
from diffusion.spec import DEFAULT_SETTINGS  # noqa: E402
from training.classifiers import extract_features  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.features_metrics import (density_coverage, feature_stats, frechet_distance_from_stats,  # noqa: E402
                                       frechet_distance_infinity, paired_bootstrap, precision_recall)
from training.generate import default_checkpoint  # noqa: E402
from training.generator_metrics import per_class, real_data_classifier  # noqa: E402
from training.synthetic_cache import image_specs, synthetic_images  # noqa: E402

# FD_inf's fit needs its smallest subset (half the images) to hold 3 images per feature
FD_INF_IMAGES_PER_FEATURE = 6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="labelled data set with train/ and test/ (training.data)")
    p.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    p.add_argument("--n-per-class", type=int, default=100, help="images per class and row (default 100)")
    p.add_argument("--steps", default="20,10", help="step counts, each with both spacings (default 20,10)")
    p.add_argument("--sampler", default="dpmpp_sde", choices=("dpmpp", "dpmpp_sde", "ddim", "ddpm"))
    p.add_argument("--guidance", action="append", default=None, metavar="W@LO:HI",
                   help="guidance of a pair of rows (time- and logSNR-spaced): W only where LO < sigma <= HI; "
                        "repeatable (default: the service's)")
    p.add_argument("--logsnr-guidance", default=None, metavar="W@LO:HI",
                   help="guidance of the logSNR rows, with one --guidance: W only where LO < sigma <= HI (default: "
                        "the time-spaced rows'); the logSNR steps meet the sigma interval at other, fewer, steps")
    p.add_argument("--reference-steps", type=int, default=0,
                   help="add DDPM ancestral at this many steps (1000: the report's method) with the first guidance "
                        "setting, and pair every row against it (default 0: none)")
    p.add_argument("--compile", action="store_true",
                   help="sample on torch.compile (diffusion.precision.compile_for_sampling; same cache entries)")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0,
                   help="seed base: image j of class c gets seed S + c x 1,000,000 + j in every row (default 0)")
    p.add_argument("--feature-epochs", type=int, default=10, help="the feature CNN's epochs (default 10, cached)")
    p.add_argument("--feature-width", type=int, default=None, help="the feature CNN's width (default: its default)")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples (default 1000)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=None, help="default: $DREAMDATA_CACHE or ~/.cache/dreamdata")
    p.add_argument("--out", default=None, help="also write the rows as JSON to this file")
    a = p.parse_args(argv)
    a.cache_dir = Path(a.cache_dir) if a.cache_dir else None

    def guidance(flag: str, text: str) -> tuple[float, tuple[float, float]]:
        try:
            w, _, rest = text.partition("@")
            lo, _, hi = rest.partition(":")
            g = (float(w), (float(lo), float(hi)))
            SamplerSettings("dpmpp_sde", 20, g[0], 0.0, g[1]).validate()
            return g
        except ValueError as e:
            p.error(f"{flag}: expected W@LO:HI such as 8@0.28:4 ({e})")

    d = DEFAULT_SETTINGS
    a.guidance = ([guidance("--guidance", g) for g in a.guidance] if a.guidance
                  else [(d.guidance, d.guidance_interval)])
    if a.logsnr_guidance is not None:
        if len(a.guidance) > 1:
            p.error("--logsnr-guidance goes with one --guidance at most")
        a.logsnr_guidance = guidance("--logsnr-guidance", a.logsnr_guidance)
    try:
        a.steps = sorted({int(s) for s in a.steps.split(",") if s.strip()}, reverse=True)
    except ValueError:
        p.error(f"--steps: expected comma-separated integers, got {a.steps!r}")
    if not a.steps or min(a.steps) < 2 or a.n_per_class < 2 or a.batch_size < 1 or a.bootstrap < 2:
        p.error("need --steps >= 2, --n-per-class >= 2, --batch-size >= 1 and --bootstrap >= 2")
    if a.reference_steps and a.reference_steps < 2:
        p.error(f"--reference-steps: need at least 2 (or 0 for none), got {a.reference_steps}")
    return a


def _vs(v: dict | None) -> tuple[str, str]:
    """'FD rel [lo, hi]' and 'fidelity pp [lo, hi]' cells of a paired comparison (blank without one)."""
    if not v:
        return "", ""
    fd, fid = v["frechet_distance_relative"], v["class_fidelity"]
    return (f"{fd[0]:+.1%} [{fd[1]:+.1%}, {fd[2]:+.1%}]",
            f"{100 * fid[0]:+.1f} [{100 * fid[1]:+.1f}, {100 * fid[2]:+.1f}]pp")


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    ckpt_dir = a.checkpoint or default_checkpoint()
    train, test = load_dataset(a.data, "train", cache_dir=a.cache_dir), load_dataset(a.data, "test", cache_dir=a.cache_dir)
    clf, info = real_data_classifier(train, kind="cnn", width=a.feature_width, epochs=a.feature_epochs,
                                     cache_dir=a.cache_dir, device="cpu", test=test)
    test_stats = feature_stats(extract_features(clf, test.images, "cpu"))
    # the k-NN measures' real set, as dreamdata metrics picks it (training.generator_metrics, seed 0)
    knn_real = extract_features(clf, per_class(test, a.n_per_class, seed=1).images, "cpu")
    ckpt = load_for_sampling(ckpt_dir, precision=a.precision)
    if a.compile:
        ckpt = replace(ckpt, model=compile_for_sampling(ckpt.model))
    # in index order (class-major), as synthetic_images returns its sets: image i of one row pairs with image i of
    # the other
    specs = sorted(image_specs(a.n_per_class, len(ckpt.class_names), a.seed), key=lambda s: s.index)
    labels = torch.tensor([s.class_index for s in specs])

    def measure(settings: SamplerSettings, steps: int, label: str) -> tuple[dict, dict]:
        """One row through the service's sampling and the synthetic cache; and its features for pairing."""
        t0 = time.perf_counter()
        synth, sinfo = synthetic_images(ckpt, a.n_per_class, settings, base_seed=a.seed, cache_dir=a.cache_dir,
                                        precision=a.precision, batch_size=a.batch_size)
        if not torch.equal(synth.labels, labels):
            raise RuntimeError("the synthetic set's images are not in this script's order")
        images, source = synth.images, "cache" if sinfo.get("reused") else "sampled"
        seconds = time.perf_counter() - t0
        calls = model_calls(settings, ckpt.schedule)
        feats = extract_features(clf, images, "cpu")
        with torch.no_grad():
            ok = clf.head(feats).argmax(1) == labels
        row = {"sampler": settings.sampler, "steps": steps, "spacing": settings.spacing, "calls": calls,
               "guidance": settings.guidance, "guidance_interval": settings.guidance_interval,
               "timesteps": step_timesteps(ckpt.schedule, steps, settings.spacing), "images": len(images),
               "source": source, "seconds": round(seconds, 1),
               "frechet_distance": frechet_distance_from_stats(*feature_stats(feats), *test_stats),
               "frechet_distance_infinity": (frechet_distance_infinity(feats, test_stats)
                                             if len(feats) >= FD_INF_IMAGES_PER_FEATURE * feats.shape[1] else None),
               "class_fidelity": ok.float().mean().item(),
               **precision_recall(knn_real, feats), **density_coverage(knn_real, feats)}
        print(f"{label}: {row['images']} images, {calls} calls per image, {source} in {seconds:.0f} s",
              file=sys.stderr, flush=True)
        return row, {"feats": feats, "ok": ok}

    def vs(x: dict, y: dict) -> dict:
        return paired_bootstrap(x["feats"], x["ok"], y["feats"], y["ok"], test_stats, n_boot=a.bootstrap)

    def inf_vs(row: dict, base: dict) -> float | None:
        """FD_inf of ``row`` relative to ``base``'s (a point estimate), where both have one."""
        x, y = row["frechet_distance_infinity"], base["frechet_distance_infinity"]
        return x / y - 1 if x is not None and y is not None and y > 0 else None

    d = DEFAULT_SETTINGS
    reference = None
    rows = []
    if a.reference_steps:
        w, interval = a.guidance[0]
        settings = SamplerSettings("ddpm", a.reference_steps, w, d.eta, interval)
        row, reference = measure(settings, a.reference_steps, f"ddpm-{a.reference_steps} reference")
        row["reference"] = True
        rows.append(row)
        reference_row = row
    for steps in a.steps:
        for w, interval in a.guidance:
            timed = timed_row = None
            for spacing in ("time", "logsnr"):
                if spacing == "logsnr" and a.logsnr_guidance is not None:
                    w, interval = a.logsnr_guidance
                settings = SamplerSettings(a.sampler, steps, w, d.eta, interval, spacing)
                row, got = measure(settings, steps, f"{a.sampler}-{steps} {spacing} guidance {w:g}")
                if timed is None:
                    timed, timed_row = got, row
                else:
                    row["vs_time"] = vs(got, timed)
                    row["fd_infinity_vs_time"] = inf_vs(row, timed_row)
                if reference is not None:
                    row["vs_reference"] = vs(got, reference)
                    row["fd_infinity_vs_reference"] = inf_vs(row, reference_row)
                rows.append(row)

    print(f"checkpoint {ckpt_dir} ({ckpt.sha256[:12]}), {a.precision}{', compiled' if a.compile else ''}; "
          f"{a.n_per_class} images per class and row, seed base {a.seed}; feature CNN test accuracy "
          f"{info.get('test_accuracy', float('nan')):.3f}")
    has_inf = any(r["frechet_distance_infinity"] is not None for r in rows)
    cols = [("sampler", 10), ("steps", 5), ("spacing", 7), ("guidance", 12), ("calls", 5), ("FD", 7),
            *([("FD_inf", 7)] if has_inf else []),
            ("fidelity", 8), ("recall", 6), ("coverage", 8), ("FD vs time", 26), ("fidelity vs time", 24),
            *([("FD_inf vs time", 14)] if has_inf else [])]
    if reference is not None:
        cols += [("FD vs ref", 26), ("fidelity vs ref", 24), *([("FD_inf vs ref", 13)] if has_inf else [])]

    def pct(x: float | None) -> str:
        return "" if x is None else f"{x:+.1%}"
    print(" ".join(f"{name:>{width}}" if k else f"{name:<{width}}" for k, (name, width) in enumerate(cols)))
    for r in rows:
        inf = r["frechet_distance_infinity"]
        cells = [r["sampler"], r["steps"], r["spacing"],
                 f"{r['guidance']:g}@{r['guidance_interval'][0]:g}:{r['guidance_interval'][1]:g}", r["calls"],
                 f"{r['frechet_distance']:.3f}", *([f"{inf:.3f}" if inf is not None else ""] if has_inf else []),
                 f"{r['class_fidelity']:.3f}", f"{r['recall']:.3f}",
                 f"{r['coverage']:.3f}", *_vs(r.get("vs_time")),
                 *([pct(r.get("fd_infinity_vs_time"))] if has_inf else [])]
        if reference is not None:
            cells += (["reference", "", *([""] if has_inf else [])] if r.get("reference")
                      else [*_vs(r.get("vs_reference")), *([pct(r.get("fd_infinity_vs_reference"))] if has_inf else [])])
        print(" ".join(f"{str(c):>{w}}" if k else f"{str(c):<{w}}" for k, (c, (_, w)) in enumerate(zip(cells, cols))))
    print("vs time: the logSNR row minus the time-spaced row of the same steps and guidance; vs ref: the row minus "
          "the reference; paired bootstrap over the images, 95% intervals. recall, coverage: k = 5 neighbours "
          f"against {a.n_per_class} real test images per class"
          + ("; FD_inf: extrapolated to infinitely many generated images, its differences point estimates"
             if has_inf else ""))
    result = {"rows": rows, "feature_classifier": info, "checkpoint": str(ckpt_dir), "precision": a.precision,
              "compiled": a.compile}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1, default=float))
    return result

if __name__ == "__main__":
    main()
