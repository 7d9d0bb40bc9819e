"""Generator quality against sampler and step count (issue 5): which sampler setting should the
service use by default?  Answer: "the fastest setting within a few percent of the 1000-step quality".

For every setting of the grid (default: DDPM ancestral at 1000 steps, the report's method; DDIM
at 50 and 100; DPM-Solver++ at 10, 15 and 20, deterministic (dpmpp) and stochastic (dpmpp_sde, the
service default); each unguided, guidance 1.0, guided at every step at 4, and guided only inside
a noise interval as the service default is, ``--interval-guidances W@LO:HI``) it measures the
checkpoint's images through ``training.generator_metrics.measure_generator`` (the same metrics as
``dreamdata metrics``), with the same image seeds for every setting, so the differences come from
the sampler.  A row: model calls per image (steps, twice that when guided),
sampling seconds per image, Frechet distance in the project classifier's feature space, class
fidelity, recall, coverage, and the FD relative to the reference row of the same guidance: DDPM
at 1000 steps when it is in the grid, else the slowest setting (most model calls) of the grid at
that guidance, which the output says.  Beside each difference from the reference: a 95% interval from
a paired bootstrap over the images (--bootstrap resamples), so that a difference the sample size
cannot resolve reads as one.  With at least 6 images per feature dimension (768 in the CNN's 128) every
row also gets FD_inf, its FD extrapolated to infinitely many generated images (the reference stays the test split)
(``training.features_metrics.frechet_distance_infinity``), printed against its reference's below the table:
a plain FD at a few hundred or thousand images shrinks relative differences (benchmarks/fd_interval_coverage.py).  The ``real_train`` row is the floor: real training images, same count.

A setting guided only where LO < sigma_t <= HI (diffusion.spec: guidance interval) makes two model calls
at those steps and one at the others, so it costs fewer calls than the same setting guided at every step.
Its rows are held against the reference of the classic guidance --reference-guidance (default: the last of
--guidances that guides, 4): the interval, and its own scale W, are one more way to reach that quality.

Every row's steps are evenly spaced in time (``spacing=time``, ``GRID_SPACING``), as the grid has always been
measured.  The service default spaces its steps evenly in logSNR since 2026-12-04 (``DEFAULT_SETTINGS``), so a
row here at its sampler, steps, guidance and interval is marked "as the service default but time-spaced";
``benchmarks/step_spacing.py`` measures the two spacings side by side.

The choice rule, per guidance value: among the settings whose FD is at most --tolerance (default
5%) above the reference's, and whose class fidelity is at most --tolerance x 100 percentage
points (absolute, so 5 points at the default) below the reference's, the one with the fewest
model calls per image (ties: lower FD).  The reference itself always passes, so there is always
an answer.  Fewest model calls, not measured seconds, is "fastest": the cost of a step is one
model call (two with guidance) whatever the sampler, and the seconds of a busy machine are noisy.

The feature classifier and every setting's images are cached (``training.synthetic_cache``,
under --cache-dir), so a rerun, or a run after an interrupted one, samples only what is missing;
running the grid in parts (e.g. --skip-ddpm first) costs nothing extra.  Settings run cheapest
first; progress and log lines go to stderr, the table to stdout.

The real measurement (shipped checkpoint, 100 images per class = 1,000 per setting):

    python benchmarks/sampler_quality.py --data ../shared/data/cifar10-jpeg.tar.gz --threads 2 \\
        --n-per-class 100 --out out/sampler_quality.json

Its cost on the 2-core development CPU, from the 100-per-class run recorded in benchmarks/README.md
(one model call on one image takes about 17 ms, ~20-24 ms per image-call when guided):

    feature classifier (cnn, 10 epochs), trained once and cached         ~10 min
    DDIM 50/100 + the two DPM-Solver++ at 10/15/20, unguided (285 calls) ~1.3 h
    the same, guided (570 calls/image)                                   ~3.5 h
    DDPM 1000, unguided                                                  ~4.6 h
    DDPM 1000, guided                                                    ~13 h
    total                                                                ~22 h (--skip-ddpm: ~5 h)

so run it in parts (--skip-ddpm first: DDIM-100 is then the reference; the other rows come from the
cache later), or at --n-per-class 10 (about 2 h 15 min, what benchmarks/README.md records).
The seconds per image are those of the run that sampled the images (batch --batch-size): on a
machine that is busy with something else they are only indicative.  A smaller grid, guided only:

    python benchmarks/sampler_quality.py --data DATA --settings ddim:50,dpmpp:10,dpmpp:20 --guidances 4
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from diffusion.checkpoint import load_for_sampling, read_config
from diffusion.samplers import step_sigmas
from diffusion.schedules import NoiseSchedule
from diffusion.spec import (DEFAULT_SETTINGS, SAMPLERS, GuidanceInterval, SamplerSettings, parse_guidance_interval,
                            requested_precision)
from training.data import default_cache_dir
from training.generate import default_checkpoint
from training.features_metrics import frechet_distance_infinity, paired_bootstrap
from training.generator_metrics import MetricsSettings, measure_generator
from training.metrics_cli import add_feature_args
from training.sample_cli import pick_device
from training.synthetic_cache import cache_path, image_specs, load_pngs, missing, sampling_time

log = logging.getLogger("sampler_quality")

DEFAULT_GRID = "ddpm:1000,ddim:50,ddim:100,dpmpp:10,dpmpp:15,dpmpp:20,dpmpp_sde:10,dpmpp_sde:15,dpmpp_sde:20"
REPORT_STEPS = 1000  # the report's method: DDPM ancestral sampling over all 1000 timesteps
# Where every row's steps fall: evenly in time, as the grid has always been measured (the service default is
# logsnr-spaced since 2026-12-04; benchmarks/step_spacing.py compares the two)
GRID_SPACING = "time"


def model_calls(steps: int, guidance: float, interval: GuidanceInterval | None = None,
                schedule: NoiseSchedule | None = None) -> int:
    """Model calls per image (see ``SamplerSettings.model_calls``); the sampler does not matter.  With a
    guidance interval, which steps are guided depends on the schedule's noise levels."""
    s = SamplerSettings("ddim", steps, guidance, guidance_interval=interval, spacing=GRID_SPACING)
    return s.model_calls(step_sigmas(schedule, steps, GRID_SPACING) if interval is not None and schedule is not None
                         else None)


def guidance_label(guidance: float, interval: GuidanceInterval | None) -> str:
    """``4`` (guided at every step) or ``6@0.28:2.9`` (guided only where 0.28 < sigma_t <= 2.9)."""
    return f"{guidance:g}" if interval is None else f"{guidance:g}@{interval[0]:g}:{interval[1]:g}"


CLASSIC_GUIDANCE = 4.0  # the guidance of the classic (every-step) rows of the default grid
DEFAULT_GUIDANCES = f"1.0,{CLASSIC_GUIDANCE:g}"
# the service default's guidance and interval, when it guides inside one: held against the classic rows' reference
# (on the grid's time-spaced steps, GRID_SPACING, not the default's own spacing)
DEFAULT_INTERVAL_GUIDANCES = ("" if DEFAULT_SETTINGS.guidance_interval is None else
                              guidance_label(DEFAULT_SETTINGS.guidance, DEFAULT_SETTINGS.guidance_interval))


FD_INF_MIN_RATIO = 6  # FD_inf for a row only with at least this many images per feature dimension


@dataclass
class Row:
    sampler: str
    steps: int
    guidance: float
    frechet_distance: float
    class_fidelity: float             # overall share classified as the requested class
    recall: float = float("nan")
    coverage: float = float("nan")
    precision: float = float("nan")
    density: float = float("nan")
    images: int = 0
    seconds_per_image: float | None = None
    timing: str = ""                  # where seconds_per_image comes from
    cache_dir: str = ""
    dtype: str = "fp32"               # of the model calls: fp32 or bf16 (autocast); diffusion.precision
    vs_reference: dict | None = None  # paired bootstrap intervals of this row minus the reference (compare)
    guidance_interval: GuidanceInterval | None = None  # guided only where lo < sigma_t <= hi; None: every step
    interval_calls: int | None = None  # model calls per image with the interval (they depend on the schedule)
    fd_infinity: float | None = None  # FD extrapolated to infinitely many generated images; None below 6 x features images
    spacing: str = GRID_SPACING       # where the steps fall (every row of the grid: time)

    @property
    def calls(self) -> int:
        return self.interval_calls if self.guidance_interval is not None else model_calls(self.steps, self.guidance)

    @property
    def guidance_label(self) -> str:
        return guidance_label(self.guidance, self.guidance_interval)

    @property
    def name(self) -> str:
        return f"{self.sampler}-{self.steps}" + ("-bf16" if self.dtype == "bf16" else "")

    @property
    def key(self) -> tuple:
        return self.sampler, self.steps, self.guidance, self.guidance_interval, self.dtype

    @property
    def is_report_method(self) -> bool:
        return self.sampler == "ddpm" and self.steps == REPORT_STEPS

    def to_dict(self) -> dict:
        return dict(asdict(self), model_calls_per_image=self.calls)


@dataclass
class Choice:
    guidance: float                   # of the reference (interval rows join the group of --reference-guidance)
    reference: Row
    chosen: Row
    passing: list[Row]                # every row within tolerance of the reference (the reference included)
    rows: list[Row]                   # every row at this guidance

    @property
    def reference_is_ddpm1000(self) -> bool:
        return self.reference.is_report_method


def reference_row(rows: list[Row]) -> Row:
    """DDPM-1000 if among ``rows`` (one guidance value), else the slowest: most model calls, first listed on
    ties; fp32 before bf16 either way (the reference is the exact arithmetic)."""
    rows = sorted(rows, key=lambda r: r.dtype != "fp32")  # stable: fp32 rows first, order kept otherwise
    return next((r for r in rows if r.is_report_method), None) or max(rows, key=lambda r: r.calls)


def within_tolerance(row: Row, ref: Row, tolerance: float) -> bool:
    """FD at most ``tolerance`` (relative) above the reference's; class fidelity at most ``tolerance``
    (absolute, as a fraction: 0.05 = 5 percentage points) below it."""
    return (row.frechet_distance <= ref.frechet_distance * (1 + tolerance)
            and row.class_fidelity >= ref.class_fidelity - tolerance)


def group_of(row: Row, reference_guidance: float | None) -> float:
    """The guidance whose reference a row is held against: its own, or for a row guided only inside an
    interval, ``reference_guidance`` (the interval is then one more way to reach that guidance's quality)."""
    if row.guidance_interval is None or reference_guidance is None:
        return row.guidance
    return reference_guidance


def choose(rows: list[Row], tolerance: float, reference_guidance: float | None = None) -> list[Choice]:
    """The choice rule (module docstring), once per guidance value, in the order the values first appear;
    rows with a guidance interval are held against ``reference_guidance``'s reference (see group_of)."""
    choices = []
    for g in dict.fromkeys(group_of(r, reference_guidance) for r in rows):
        group = [r for r in rows if group_of(r, reference_guidance) == g]
        classic = [r for r in group if r.guidance_interval is None and r.guidance == g]
        ref = reference_row(classic or group)
        passing = [r for r in group if r is ref or within_tolerance(r, ref, tolerance)]
        chosen = min(passing, key=lambda r: (r.calls, r.frechet_distance))
        choices.append(Choice(g, ref, chosen, passing, group))
    return choices


def compare(choices: list[Choice], per_image: dict, n_boot: int, seed: int = 0) -> None:
    """Sets ``vs_reference`` on every non-reference row: 95% intervals of its FD (absolute and relative)
    and class fidelity minus the reference's, by a paired bootstrap over the images (image i has the
    same seed and class in every setting).  ``per_image``: ``Row.key`` -> measure_generator's ``per_image``."""
    for c in choices:
        ref = per_image[c.reference.key]
        for r in c.rows:
            if r is not c.reference:
                mine = per_image[r.key]
                r.vs_reference = paired_bootstrap(mine["features"], mine["correct"], ref["features"],
                                                  ref["correct"], ref["test_stats"], n_boot=n_boot, seed=seed)


def parse_settings(text: str) -> list[tuple[str, int]]:
    """``"ddpm:1000,ddim:50"`` -> [("ddpm", 1000), ("ddim", 50)] (validated, duplicates dropped)."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        sampler, sep, steps = item.partition(":")
        if not sep or not steps.strip().isdigit():
            raise argparse.ArgumentTypeError(f"bad setting {item!r}: expected SAMPLER:STEPS, e.g. dpmpp:20")
        setting = (sampler.strip().lower(), int(steps))
        try:
            SamplerSettings(*setting).validate()
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if setting not in out:
            out.append(setting)
    if not out:
        raise argparse.ArgumentTypeError("no settings given")
    return out


def parse_guidances(text: str) -> list[float]:
    try:
        values = list(dict.fromkeys(float(g) for g in text.split(",") if g.strip()))
        for g in values:
            SamplerSettings(guidance=g).validate()
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad --guidances {text!r}: {e}") from None
    if not values:
        raise argparse.ArgumentTypeError("no guidance values given")
    return values


def parse_interval_guidances(text: str) -> list[tuple[float, GuidanceInterval]]:
    """``"6@0.28:2.9,5@0.28:4"`` -> [(6.0, (0.28, 2.9)), (5.0, (0.28, 4.0))] (validated, duplicates dropped)."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        w, sep, interval = item.partition("@")
        try:
            if not (sep and ":" in interval):
                raise ValueError("expected W@LO:HI, e.g. 6@0.28:2.9")
            s = SamplerSettings(guidance=float(w), guidance_interval=parse_guidance_interval(interval.split(":")))
            s.validate()
            if not s.guided:
                raise ValueError("guidance 0 or 1 makes one call per step: an interval changes nothing")
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"bad interval guidance {item!r}: {e}") from None
        if (s.guidance, s.guidance_interval) not in out:
            out.append((s.guidance, s.guidance_interval))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the shipped checkpoints/cifar10)")
    p.add_argument("--data", required=True, help="CIFAR-10 data set with train and test splits (training.data)")
    p.add_argument("--n-per-class", type=int, default=100, help="images per class per setting (default 100)")
    p.add_argument("--settings", type=parse_settings, default=parse_settings(DEFAULT_GRID),
                   help=f"the grid, SAMPLER:STEPS,... (default {DEFAULT_GRID}); samplers: {', '.join(SAMPLERS)}")
    p.add_argument("--guidances", type=parse_guidances, default=parse_guidances(DEFAULT_GUIDANCES),
                   help=f"guidance scales, each setting at each (default {DEFAULT_GUIDANCES}; 1.0 = no guidance)")
    p.add_argument("--interval-guidances", type=parse_interval_guidances,
                   default=parse_interval_guidances(DEFAULT_INTERVAL_GUIDANCES),
                   help="guidance W applied only where LO < sigma_t <= HI, each setting at each: W@LO:HI,... "
                        f"(default {DEFAULT_INTERVAL_GUIDANCES or 'none'}; '' for none). Their rows are held against "
                        "the reference of --reference-guidance: one more way to reach that quality")
    p.add_argument("--reference-guidance", type=float, default=None,
                   help="the classic guidance whose reference the --interval-guidances rows are held against "
                        "(default: the last of --guidances other than 0 and 1)")
    p.add_argument("--precisions", default=None,
                   help="precisions of the model calls, each setting at each: fp32, bf16, auto (default: "
                        "$DREAMDATA_PRECISION or auto, as the service decides; diffusion.precision). fp32,bf16 "
                        "gives each setting a bf16 row beside its fp32 one; every row is compared with its guidance's "
                        "reference (DDPM-1000, else the slowest setting; in fp32), so to measure what bf16 costs in "
                        "quality run one setting: --settings S:K --precisions fp32,bf16")
    p.add_argument("--skip-ddpm", action="store_true", help="leave the DDPM settings out (the slow ones)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="choice rule: FD up to this much above the reference's (relative) and class fidelity up "
                        "to this x 100 percentage points below it (absolute) (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed base: image j of class c gets seed S + c x 1,000,000 + j in every setting (default 0)")
    p.add_argument("--batch-size", type=int, default=100, help="images per sampling batch (default 100)")
    p.add_argument("--k", type=int, default=5, help="neighbours for recall and coverage (default 5)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="resamples for the paired 95%% intervals against the reference (default 1000; 0: none)")
    add_feature_args(p)
    p.add_argument("--out", default=None, help="also write every row, the floor and the choice as JSON to this file")
    p.add_argument("--figure", default=None,
                   help="also write a PNG of every row's first images (up to 4 per class, one class per column, "
                        "the same seeds in every row), titled with its FD and class fidelity")
    a = p.parse_args(argv)
    if a.skip_ddpm:
        a.settings = [s for s in a.settings if s[0] != "ddpm"]
        if not a.settings:
            p.error("--skip-ddpm leaves no settings")
    try:
        a.precisions = list(dict.fromkeys(requested_precision(x) for x in (a.precisions or "").split(",") if x.strip())
                            or [requested_precision()])
    except ValueError as e:
        p.error(f"--precisions: {e}")
    if a.reference_guidance is None:
        a.reference_guidance = next((g for g in reversed(a.guidances) if g not in (0.0, 1.0)), None)
    elif a.reference_guidance not in a.guidances:
        p.error(f"--reference-guidance {a.reference_guidance:g} is not among --guidances")
    if a.tolerance < 0:
        p.error("--tolerance must be >= 0")
    if a.bootstrap < 0:
        p.error("--bootstrap must be >= 0")
    return a


def _timing(gen_info: dict) -> tuple[float | None, str]:
    """Sampling seconds per image of this setting's images, and where the number comes from."""
    if gen_info["sampled"]:
        return gen_info["seconds"] / gen_info["sampled"], "this run"
    t = sampling_time(Path(gen_info["cache_dir"]))
    if not t.get("images"):
        return None, "cached, no timing"
    return t["seconds"] / t["images"], f"cached: the runs that sampled the entry's {t['images']} images"


def measure(a: argparse.Namespace, checkpoint: Path) -> tuple[list[Row], dict, dict]:
    """Every setting of the grid at every guidance, cheapest first; returns the rows, the last raw result and
    every setting's per-image features and fidelity (``Row.key`` -> per_image, for compare)."""
    cache_dir = Path(a.cache_dir) if a.cache_dir else default_cache_dir()
    device = pick_device(a.device)
    models = {}  # one load per distinct precision that the requested ones resolve to (auto -> fp32 or bf16)
    for p in a.precisions:
        ckpt = load_for_sampling(checkpoint, device, p)
        models.setdefault(ckpt.precision.name, ckpt)
        log.info("precision %s: %s", p, ckpt.precision.reason)
    sha, num_classes = ckpt.sha256, len(ckpt.class_names)  # the same weights whatever the precision
    schedule = ckpt.schedule
    guidances = [(g, None) for g in a.guidances] + list(a.interval_guidances)
    grid = sorted(((s, k, g, gi, d) for s, k in a.settings for g, gi in guidances for d in models),
                  key=lambda x: model_calls(x[1], x[2], x[3], schedule))
    rows, result, per_image = [], {}, {}
    for i, (sampler, steps, g, gi, dtype) in enumerate(grid, 1):
        calls = model_calls(steps, g, gi, schedule)
        label = guidance_label(g, gi)
        setting = SamplerSettings(sampler, steps, g, guidance_interval=gi, spacing=GRID_SPACING)
        folder = cache_path(cache_dir, sha, setting, a.seed, num_classes, dtype == "bf16", schedule.config)
        total = a.n_per_class * num_classes
        to_sample = missing(folder, a.n_per_class, num_classes, a.seed)
        state = ("cached" if not to_sample else f"sampling {to_sample}"
                 + (f" ({total - to_sample} on disk)" if to_sample < total else ""))
        log.info("[%d/%d] %s-%d guidance %s %s: %d model calls per image, %s", i, len(grid), sampler, steps, label,
                 dtype, calls, state)
        s = MetricsSettings(data=a.data, checkpoint=str(checkpoint), n_per_class=a.n_per_class, sampler=sampler,
                            steps=steps, guidance=g, guidance_interval=gi, spacing=GRID_SPACING, seed=a.seed,
                            batch_size=a.batch_size, k=a.k,
                            feature_classifier=a.feature_classifier, feature_width=a.feature_width,
                            feature_epochs=a.feature_epochs, device=a.device, cache_dir=a.cache_dir)
        with tqdm(total=total, desc=f"{sampler}-{steps} g{label}", unit="img", dynamic_ncols=True, leave=False,
                  file=sys.stderr, disable=not to_sample) as bar:
            def progress(fraction: float) -> None:  # in whole images (tqdm limits the redraws)
                done = int(fraction * total)
                if done > bar.n:
                    bar.update(done - bar.n)

            result = measure_generator(s, checkpoint=models[dtype], progress=progress, keep_features=True)
        gen = result["rows"]["generated"]
        spi, timing = _timing(result["synthetic"])
        rows.append(Row(sampler, steps, g, gen["frechet_distance"], gen["class_fidelity"]["overall"], gen["recall"],
                        gen["coverage"], gen["precision"], gen["density"], gen["images"], spi, timing,
                        result["synthetic"]["cache_dir"], dtype, guidance_interval=gi,
                        interval_calls=calls if gi is not None else None, spacing=GRID_SPACING))
        per_image[rows[-1].key] = result.pop("per_image")
        feats = per_image[rows[-1].key]["features"]
        if len(feats) >= FD_INF_MIN_RATIO * feats.shape[1]:  # enough images for the extrapolation to hold
            rows[-1].fd_infinity = frechet_distance_infinity(feats, per_image[rows[-1].key]["test_stats"], seed=a.seed)
        log.info("[%d/%d] %s-%d guidance %s: FD %.3f, class fidelity %.3f (%.0f s)", i, len(grid), sampler, steps,
                 label, gen["frechet_distance"], gen["class_fidelity"]["overall"], result["seconds"])
    return rows, result, per_image


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_report(rows: list[Row], choices: list[Choice], floor: dict, result: dict, checkpoint: Path,
                 a: argparse.Namespace) -> None:
    clf, syn = result["feature_classifier"], result["synthetic"]
    prov = read_config(checkpoint).get("provenance", {})
    n = rows[0].images
    print(f"checkpoint {checkpoint} (sha256 {syn['checkpoint_sha256'][:12]}, "
          f"{prov.get('steps', '?')} training steps); {a.n_per_class} images per class = {n} per setting, "
          f"image j of class c with seed {a.seed} + c x 1,000,000 + j, the same for every setting")
    print(f"feature space: penultimate layer of the {clf['kind']} (width {clf['width']}, {clf['epochs']} epochs) "
          f"trained on the real training split, test accuracy {_fmt(clf.get('test_accuracy'), '.3f')}")
    print("FD: Frechet distance to all real test images (lower is better); fidelity: share classified as the "
          "requested class; recall, coverage: k-NN against real test images (higher is better)")
    head = (f"{'sampler':<8} {'steps':>5} {'guidance':>12} {'dtype':>5} {'calls/img':>9} {'s/img':>7} {'FD':>9} "
            f"{'FD vs ref':>9} {'95% interval':>16} {'fidelity':>8} {'vs ref':>7} {'95% interval':>14} "
            f"{'recall':>6} {'coverage':>8}  note")
    print(head)
    print(f"{'real_train':<14} {'-':>12} {'':>5} {'-':>9} {'-':>7} {floor['frechet_distance']:>9.3f} {'-':>9} {'':>16} "
          f"{floor['class_fidelity']['overall']:>8.3f} {'-':>7} {'':>14} {floor['recall']:>6.3f} "
          f"{floor['coverage']:>8.3f}  floor: {floor['images']} real training images")
    d = DEFAULT_SETTINGS
    default = (d.sampler, d.steps, d.guidance, d.guidance_interval if d.guided else None)
    for c in choices:
        ref = c.reference
        for r in sorted(c.rows, key=lambda r: -r.calls):
            rel = r.frechet_distance / ref.frechet_distance - 1 if ref.frechet_distance > 0 else float("nan")
            notes = (["reference"] if r is ref else []) + (["<- chosen"] if r is c.chosen else [])
            if (r.sampler, r.steps, r.guidance, r.guidance_interval) == default:
                notes += ["service default" if r.spacing == d.spacing else
                          f"as the service default but {r.spacing}-spaced"]
            notes += ["cached timing"] if r.timing.startswith("cached") else []
            v = r.vs_reference
            fd_ci = f"[{v['frechet_distance_relative'][1]:+.1%}, {v['frechet_distance_relative'][2]:+.1%}]" if v else ""
            fid_ci = (f"[{100 * v['class_fidelity'][1]:+.1f}, {100 * v['class_fidelity'][2]:+.1f}]pp" if v else "")
            print(f"{r.sampler:<8} {r.steps:>5} {r.guidance_label:>12} {r.dtype:>5} {r.calls:>9} "
                  f"{_fmt(r.seconds_per_image, '.3f'):>7} {r.frechet_distance:>9.3f} {rel:>+9.1%} {fd_ci:>16} "
                  f"{r.class_fidelity:>8.3f} "
                  f"{100 * (r.class_fidelity - ref.class_fidelity):>+5.1f}pp {fid_ci:>14} {r.recall:>6.3f} "
                  f"{r.coverage:>8.3f}  {', '.join(notes)}".rstrip())
    print("s/img: sampling wall time per image of the run that made the images (batch "
          f"{a.batch_size}); 'cached timing': from the cache entry's timing.json")
    if any(r.guidance_interval for r in rows):
        held = (f"held against guidance {a.reference_guidance:g}'s reference (--reference-guidance)"
                if a.reference_guidance is not None else "held against the reference of their own guidance")
        print("guidance W@LO:HI: W applied only at the steps with LO < sigma_t <= HI, sigma_t = sqrt((1 - abar_t) / "
              f"abar_t); one conditional call at the others. Those rows are {held}")
    if any(r.vs_reference for r in rows):
        print(f"95% interval: of the row minus its reference, paired bootstrap over the {n} images "
              f"({a.bootstrap} resamples; image i has the same seed and class in every row). An interval that "
              "holds 0 means this many images cannot tell the two settings apart. FD intervals are percentiles "
              "over resampled sets moved onto the estimate (repeated images bias a resample's FD); at few images "
              "relative FD differences read smaller than with many (benchmarks/fd_interval_coverage.py)")
    if any(r.fd_infinity is not None for r in rows):
        print("FD_inf: FD extrapolated to infinitely many generated images, against the same real test images "
              "(training.features_metrics.frechet_distance_infinity), against its reference's; at this many images a "
              "plain FD shrinks relative differences")
        for c in choices:
            ref = c.reference
            for r in sorted(c.rows, key=lambda r: -r.calls):
                if r.fd_infinity is None or ref.fd_infinity is None:
                    continue
                rel = r.fd_infinity / ref.fd_infinity - 1 if ref.fd_infinity > 0 else float("nan")
                print(f"  {r.name:<14} guidance {r.guidance_label:>10} {r.dtype:>4}: FD_inf {r.fd_infinity:9.3f} "
                      + ("(reference)" if r is ref else f"{rel:+.1%}"))
    print()
    print(f"choice rule: per guidance (with the interval rows held to it), the setting with the fewest model "
          f"calls per image whose FD is at most {a.tolerance:.0%} above the reference's (relative) and whose "
          f"class fidelity is at most {100 * a.tolerance:g} percentage points below the reference's (absolute)")
    for c in choices:
        ref, ch = c.reference, c.chosen
        why = ("DDPM-1000, the report's method" if c.reference_is_ddpm1000 else
               "NOT DDPM-1000, which is not in the grid at this guidance: the slowest setting measured")
        if ch is ref:
            verdict = "chosen: the reference itself, nothing faster is within tolerance"
        else:
            rel = ch.frechet_distance / ref.frechet_distance - 1 if ref.frechet_distance > 0 else float("nan")
            verdict = (f"chosen {ch.name} guidance {ch.guidance_label}: {ch.calls} model calls per image vs "
                       f"{ref.calls} ({ref.calls / ch.calls:.1f}x fewer), FD {rel:+.1%}, "
                       f"fidelity {100 * (ch.class_fidelity - ref.class_fidelity):+.1f} pp")
        print(f"guidance {c.guidance:g}: reference {ref.name} ({why}); {verdict}")
    print(f"service default now (diffusion/spec.py DEFAULT_SETTINGS): {d.sampler}-{d.steps} guidance "
          f"{guidance_label(d.guidance, d.guidance_interval)}, steps {d.spacing}-spaced"
          + (f" (every row above: {GRID_SPACING}-spaced)" if d.spacing != GRID_SPACING else ""))


FIGURE_PER_CLASS = 4


def write_figure(rows: list[Row], class_names: list[str], seed: int, n_per_class: int, path: Path) -> None:
    """One panel per row (by guidance, then model calls): its first images of every class, read back from
    the row's cache entry; image j of a class has the same seed in every panel, so panels compare samplers
    and guidance scales on the same noise."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.plots import image_grid

    per = min(FIGURE_PER_CLASS, n_per_class)
    ordered = sorted(rows, key=lambda r: (r.guidance, r.guidance_interval is not None, r.calls))
    specs = image_specs(per, len(class_names), seed)  # j-major: grid row j holds image j of every class
    fig, axes = plt.subplots(len(ordered), 1, figsize=(7.5, 1.55 * per / 2 * len(ordered) + 0.6), squeeze=False)
    for ax, r in zip(axes[:, 0], ordered):
        imgs, _ = load_pngs(Path(r.cache_dir), specs)
        ax.imshow(image_grid(imgs, nrow=len(class_names)), interpolation="nearest")  # pixel blocks: a small PNG
        ax.set_title(f"{r.name}, guidance {r.guidance_label}: FD {r.frechet_distance:.1f}, "
                     f"class fidelity {r.class_fidelity:.0%}", fontsize=9)
        ax.axis("off")
    fig.suptitle("one class per column: " + ", ".join(class_names), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # the top 0.3 inch for the suptitle
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    if a.threads:
        torch.set_num_threads(a.threads)
    checkpoint = Path(a.checkpoint) if a.checkpoint else default_checkpoint()
    t0 = time.perf_counter()
    rows, result, per_image = measure(a, checkpoint)
    floor = result["rows"]["real_train"]  # the same in every call: same seed, same real images
    choices = choose(rows, a.tolerance, a.reference_guidance)
    if a.bootstrap:
        compare(choices, per_image, a.bootstrap, a.seed)
    print_report(rows, choices, floor, result, checkpoint, a)
    log.info("done in %.0f s", time.perf_counter() - t0)
    report = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": result["synthetic"]["checkpoint_sha256"],
        "settings": {k: v for k, v in vars(a).items() if k != "out"},
        "rows": [r.to_dict() for r in rows],
        "real_train": floor,
        "feature_classifier": result["feature_classifier"],
        "notes": result["notes"],
        "rule": {"tolerance": a.tolerance, "frechet_distance": "relative: FD <= reference FD x (1 + tolerance)",
                 "class_fidelity": "absolute: fidelity >= reference fidelity - tolerance (0.05 = 5 points)",
                 "fastest": "fewest model calls per image, ties by lower FD"},
        "choices": [{"guidance": c.guidance, "reference": c.reference.name,
                     "reference_is_ddpm1000": c.reference_is_ddpm1000, "chosen": c.chosen.name,
                     "chosen_guidance": c.chosen.guidance_label,
                     "chosen_model_calls_per_image": c.chosen.calls,
                     "within_tolerance": [f"{r.name} g{r.guidance_label}" for r in c.passing]} for c in choices],
    }
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    if a.figure:
        write_figure(rows, read_config(checkpoint)["class_names"], a.seed, a.n_per_class, Path(a.figure))
        log.info("wrote %s", a.figure)
    return dict(report, rows=rows, choices=choices)


if __name__ == "__main__":
    main()
