"""Exploratory (issue 5): DPM-Solver++ with its steps evenly spaced in logSNR instead of in time.

By default the service's samplers space their steps evenly in the timestep index (``spacing=time``).
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
the "calls" column says how many model calls an image took.
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
from diffusion.samplers import SamplerSettings, model_calls, step_timesteps  # noqa: E402
from diffusion.spec import DEFAULT_SETTINGS  # noqa: E402
from training.classifiers import extract_features  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.features_metrics import feature_stats, frechet_distance_from_stats, paired_bootstrap  # noqa: E402
from training.generate import default_checkpoint  # noqa: E402
from training.generator_metrics import real_data_classifier  # noqa: E402
from training.synthetic_cache import image_specs, synthetic_images  # noqa: E402

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="labelled data set with train/ and test/ (training.data)")
    p.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    p.add_argument("--n-per-class", type=int, default=100, help="images per class and row (default 100)")
    p.add_argument("--steps", default="20,10", help="step counts, each with both spacings (default 20,10)")
    p.add_argument("--sampler", default="dpmpp_sde", choices=("dpmpp", "dpmpp_sde", "ddim", "ddpm"))
    p.add_argument("--logsnr-guidance", default=None, metavar="W@LO:HI",
                   help="guidance of the logSNR rows: W only where LO < sigma <= HI (default: the service's, as the "
                        "time-spaced rows); the logSNR steps meet the sigma interval at other, fewer, steps")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--feature-epochs", type=int, default=10, help="the feature CNN's epochs (default 10, cached)")
    p.add_argument("--feature-width", type=int, default=None, help="the feature CNN's width (default: its default)")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples (default 1000)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=None, help="default: $DREAMDATA_CACHE or ~/.cache/dreamdata")
    p.add_argument("--out", default=None, help="also write the rows as JSON to this file")
    a = p.parse_args(argv)
    a.cache_dir = Path(a.cache_dir) if a.cache_dir else None
    if a.logsnr_guidance is not None:
        try:
            w, _, rest = a.logsnr_guidance.partition("@")
            lo, _, hi = rest.partition(":")
            a.logsnr_guidance = (float(w), (float(lo), float(hi)))
            SamplerSettings("dpmpp_sde", 20, a.logsnr_guidance[0], 0.0, a.logsnr_guidance[1]).validate()
        except ValueError as e:
            p.error(f"--logsnr-guidance: expected W@LO:HI such as 8@0.28:4 ({e})")
    try:
        a.steps = sorted({int(s) for s in a.steps.split(",") if s.strip()}, reverse=True)
    except ValueError:
        p.error(f"--steps: expected comma-separated integers, got {a.steps!r}")
    if not a.steps or min(a.steps) < 2 or a.n_per_class < 2 or a.batch_size < 1 or a.bootstrap < 2:
        p.error("need --steps >= 2, --n-per-class >= 2, --batch-size >= 1 and --bootstrap >= 2")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    ckpt_dir = a.checkpoint or default_checkpoint()
    train, test = load_dataset(a.data, "train", cache_dir=a.cache_dir), load_dataset(a.data, "test", cache_dir=a.cache_dir)
    clf, info = real_data_classifier(train, kind="cnn", width=a.feature_width, epochs=a.feature_epochs,
                                     cache_dir=a.cache_dir, device="cpu", test=test)
    test_stats = feature_stats(extract_features(clf, test.images, "cpu"))
    ckpt = load_for_sampling(ckpt_dir, precision=a.precision)
    # in index order (class-major), as synthetic_images returns its sets: image i of one row pairs with image i of
    # the other
    specs = sorted(image_specs(a.n_per_class, len(ckpt.class_names), 0), key=lambda s: s.index)
    labels = torch.tensor([s.class_index for s in specs])

    def measure(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = extract_features(clf, images, "cpu")
        with torch.no_grad():
            pred = clf.head(f).argmax(1)
        return f, pred == labels

    d = DEFAULT_SETTINGS
    rows = []
    for steps in a.steps:
        settings = SamplerSettings(a.sampler, steps, d.guidance, d.eta, d.guidance_interval)
        timed = {}
        for spacing in ("time", "logsnr"):
            if spacing == "logsnr" and a.logsnr_guidance is not None:
                settings = SamplerSettings(a.sampler, steps, a.logsnr_guidance[0], d.eta, a.logsnr_guidance[1])
            settings = replace(settings, spacing=spacing)
            ts = step_timesteps(ckpt.schedule, steps, spacing)
            calls = model_calls(settings, ckpt.schedule)
            t0 = time.perf_counter()
            # the service's own sampling, through the synthetic cache
            synth, sinfo = synthetic_images(ckpt, a.n_per_class, settings, cache_dir=a.cache_dir,
                                            precision=a.precision, batch_size=a.batch_size)
            if not torch.equal(synth.labels, labels):
                raise RuntimeError("the synthetic set's images are not in this script's order")
            images, source = synth.images, "cache" if sinfo.get("reused") else "sampled"
            seconds = time.perf_counter() - t0
            feats, ok = measure(images)
            row = {"sampler": settings.sampler, "steps": steps, "spacing": spacing, "calls": calls,
                   "guidance": settings.guidance, "guidance_interval": settings.guidance_interval,
                   "timesteps": ts, "images": len(images), "source": source, "seconds": round(seconds, 1),
                   "frechet_distance": frechet_distance_from_stats(*feature_stats(feats), *test_stats),
                   "class_fidelity": ok.float().mean().item()}
            if spacing == "time":
                timed = {"feats": feats, "ok": ok}
            else:
                row["vs_time"] = paired_bootstrap(feats, ok, timed["feats"], timed["ok"], test_stats,
                                                  n_boot=a.bootstrap)
            rows.append(row)
            print(f"{row['sampler']}-{steps} {spacing}: {row['images']} images, {calls} calls per image, "
                  f"{source} in {seconds:.0f} s", file=sys.stderr, flush=True)

    print(f"checkpoint {ckpt_dir} ({ckpt.sha256[:12]}), {a.precision}; {a.n_per_class} images per class and row; "
          f"feature CNN test accuracy "
          f"{info.get('test_accuracy', float('nan')):.3f}")
    print(f"{'sampler':<10} {'steps':>5} {'spacing':>7} {'guidance':>12} {'calls':>5} {'FD':>8} {'vs time':>8} {'95% interval':>18} "
          f"{'fidelity':>8} {'vs time':>8} {'95% interval':>16}")
    for r in rows:
        v = r.get("vs_time")
        rel = (f"{v['frechet_distance_relative'][0]:+.1%}", f"[{v['frechet_distance_relative'][1]:+.1%}, "
               f"{v['frechet_distance_relative'][2]:+.1%}]") if v else ("", "")
        fid = (f"{100 * v['class_fidelity'][0]:+.1f}pp", f"[{100 * v['class_fidelity'][1]:+.1f}, "
               f"{100 * v['class_fidelity'][2]:+.1f}]pp") if v else ("", "")
        glabel = f"{r['guidance']:g}@{r['guidance_interval'][0]:g}:{r['guidance_interval'][1]:g}"
        print(f"{r['sampler']:<10} {r['steps']:>5} {r['spacing']:>7} {glabel:>12} {r['calls']:>5} "
              f"{r['frechet_distance']:>8.3f} "
              f"{rel[0]:>8} {rel[1]:>18} {r['class_fidelity']:>8.3f} {fid[0]:>8} {fid[1]:>16}")
    print("vs time: the logSNR row minus the time-spaced row of the same steps, paired bootstrap over the images")
    result = {"rows": rows, "feature_classifier": info, "checkpoint": str(ckpt_dir), "precision": a.precision}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1, default=float))
    return result


if __name__ == "__main__":
    main()
