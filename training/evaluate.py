"""The augmentation experiment: does adding synthetic images to real training data help a classifier?

    from training.evaluate import EvaluationSettings, run_evaluation
    report = run_evaluation(EvaluationSettings(data="../shared/data/cifar10-jpeg.tar.gz", classifier="cnn",
                                               synthetic_per_class=500, real_fraction=0.1, epochs=10,
                                               seeds=(0, 1, 2)), out_dir="out/eval",
                            progress=lambda fraction, message: ...)

Three arms, each trained once per seed and tested on the real test split:

- ``real``            a class-balanced ``real_fraction`` of the real training set (the baseline);
- ``real+synthetic``  the same real images plus ``synthetic_per_class`` synthetic images per class;
- ``synthetic``       the synthetic images only: the Classification Accuracy Score (CAS) of
                      Ravuri & Vinyals 2019.

Seed s picks the real subset (``LabelledImages.subset(f, seed=s)``) and the classifier's
initial weights, shuffling and augmentation, identically in every arm, so ``real`` and
``real+synthetic`` are paired per seed.  The synthetic set is one set shared by all seeds
(image j of class c has sampler seed ``synthetic_seed + c * 1,000,000 + j``, so a smaller
set is the start of a larger one: ``training.synthetic_cache``); the confidence interval
therefore covers the real-subset and training randomness, not the draw of synthetic images.

``budget`` fixes what the arms share.  ``steps`` (the default): every arm takes the optimizer
steps that the ``real`` arm takes in ``epochs`` epochs, so all arms get the same compute and
``real+synthetic`` sees each image less often.  ``epochs``: every arm makes ``epochs`` passes
over its own set, so a bigger arm also trains longer; a short-trained classifier then gains from
the extra steps alone (measured: ResNet-9 on 10% of CIFAR-10 gained 3.1 points from 100
synthetic images per class at equal epochs, and lost 0.7 against a real-only run of the same
number of steps), which is why equal steps is the default.

Writes ``report.json``, ``report.md`` and PNG plots into ``out_dir`` (see ``evaluate_report``).

Resuming: every finished training run (one arm, one seed) is saved at once as
``out_dir/runs/<arm>-seed<s>.json`` with a key of everything that decides its result (the settings,
the data set's content, the checkpoint's and the synthetic set's identity, the classifier's width and
training settings, the device type; the real arm's key leaves out what only the synthetic set depends
on, so an experiment that changes k or the sampler in the same ``out_dir`` reuses its real runs). A run
of the same experiment into the same ``out_dir``, after a crash, a kill or a worker redelivery, reuses
the runs whose key matches and trains only the rest; ``resume=False`` (CLI ``--restart``) trains
everything again. Runs are seeded end to end, so on one machine a resumed report equals an
uninterrupted one; runs finished on another machine keep that machine's numbers (each saved run
records its host).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Literal, Sequence, get_args

import torch

from diffusion.checkpoint import Checkpoint, read_config
from diffusion.precision import cpu_has_bf16
from diffusion.samplers import SamplerName, SamplerSettings, sample
from diffusion.spec import DEFAULT_SETTINGS, GuidanceInterval, check_seed, effective_interval, requested_precision

from .classifiers import (CLASSIFIERS, ClassifierKind, build_classifier, confusion_matrix, count_parameters,
                          TrainSettings, default_train_settings, predict, train_classifier)
from .data import LabelledImages, load_dataset
from .evaluate_report import write_outputs
from .evaluation_stats import mean_std, paired_delta
from .generate import default_checkpoint
from .sample_cli import pick_device
from .synthetic_cache import align_classes, check_classes, synthetic_images

log = logging.getLogger(__name__)

ARMS: tuple[str, ...] = ("real", "real+synthetic", "synthetic")
Budget = Literal["steps", "epochs"]
BUDGETS: tuple[str, ...] = get_args(Budget)
CLASSIFIER_PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
ProgressFn = Callable[[float, str], None]  # (fraction done 0..1, message); may raise to cancel the run
RUNS_DIR = "runs"  # under out_dir: one JSON per finished training run (arm, seed), for resuming
# Settings that do not change a training run's result, or that enter its key in another form
# (checkpoint and cache_dir: the checkpoint's sha256 and the synthetic set's folder name).
# (classifier_precision: the training settings' cpu_bf16.)
_NOT_IN_RUN_KEY = ("data", "checkpoint", "cache_dir", "device", "precision", "sample_batch_size", "seeds",
                   "classifier_precision")
# what only the synthetic images depend on: not in the real arm's key (since 2026-12-02), so an experiment that
# changes k or the sampler in the same folder reuses its real runs
_SYNTHETIC_ONLY = ("synthetic_per_class", "sampler", "steps", "guidance", "eta", "guidance_interval", "spacing",
                   "synthetic_seed", "checkpoint_sha256", "synthetic_set")


@dataclass(frozen=True)
class EvaluationSettings:
    data: str                                   # data set path (anything training.data.load_dataset reads)
    checkpoint: str | None = None               # checkpoint dir; None: $DREAMDATA_CHECKPOINT or the shipped one
    classifier: ClassifierKind = "cnn"
    width: int | None = None                    # classifier width; None: classifiers.DEFAULT_WIDTH
    synthetic_per_class: int = 500              # k
    real_fraction: float = 0.1                  # f, class-balanced
    epochs: int = 10
    budget: Budget = "steps"                    # what every arm shares: "steps" (the real arm's) or "epochs"
    seeds: tuple[int, ...] = (0, 1, 2)
    sampler: SamplerName = DEFAULT_SETTINGS.sampler
    steps: int = DEFAULT_SETTINGS.steps
    guidance: float = DEFAULT_SETTINGS.guidance
    eta: float = 0.0
    guidance_interval: GuidanceInterval | None = DEFAULT_SETTINGS.guidance_interval  # None: every step
    spacing: str = DEFAULT_SETTINGS.spacing     # where the sampler's steps fall: time or logsnr
    synthetic_seed: int = 0                     # image j of class c: seed synthetic_seed + c * 1e6 + j
    sample_batch_size: int | None = None        # None: diffusion.precision.sampling_batch (50 on a CPU, 256 on a GPU)
    train_batch_size: int | None = None         # None: the classifier's default
    device: str = "auto"                        # auto, cpu, cuda, cuda:1 ...
    cache_dir: str | None = None                # None: training.data.default_cache_dir()
    precision: str | None = None                # of the sampling calls: auto, fp32, bf16 (None: $DREAMDATA_PRECISION)
    classifier_precision: str = "fp32"          # classifier training on a CPU: fp32 or bf16 autocast (CUDA: bf16)

    def __post_init__(self):
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        for name in ("guidance", "eta", "real_fraction"):  # 6 and 6.0 are one setting, with one saved-run key
            v = getattr(self, name)
            if isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(self, name, float(v))
        # a JSON list -> a tuple; none when unguided
        object.__setattr__(self, "guidance_interval", effective_interval(self.guidance, self.guidance_interval))

    @classmethod
    def from_dict(cls, d: dict) -> "EvaluationSettings":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown evaluation settings: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        return d

    @property
    def sampler_settings(self) -> SamplerSettings:
        return SamplerSettings(self.sampler, self.steps, self.guidance, self.eta, self.guidance_interval, self.spacing)

    def validate(self) -> None:
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {self.classifier!r}; expected one of {', '.join(CLASSIFIERS)}")
        if self.synthetic_per_class < 1:
            raise ValueError(f"synthetic_per_class must be at least 1, got {self.synthetic_per_class}")
        if not 0 < self.real_fraction <= 1:
            raise ValueError(f"real_fraction must be in (0, 1], got {self.real_fraction}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        for name in ("sample_batch_size", "train_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.width is not None and self.width < 2:  # build_classifier's rule, known before any sampling
            raise ValueError(f"width must be at least 2, got {self.width}")
        if self.precision is not None:
            requested_precision(self.precision)
        if self.classifier_precision not in CLASSIFIER_PRECISIONS:
            raise ValueError(f"classifier_precision must be one of {', '.join(CLASSIFIER_PRECISIONS)}, "
                             f"got {self.classifier_precision!r}")
        # the sampler, its steps and guidance ranges, eta, the guidance interval: before the data loads
        self.sampler_settings.validate()
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget {self.budget!r}; expected one of {', '.join(BUDGETS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {list(self.seeds)}")
        for s in self.seeds:
            check_seed("seeds", s)
        check_seed("synthetic_seed", self.synthetic_seed)


def _arm_size(arm: str, real: LabelledImages, synth: LabelledImages) -> int:
    """Training images of ``arm`` (what ``_arm_data`` would return, without concatenating them)."""
    return {"real": len(real), "synthetic": len(synth)}.get(arm, len(real) + len(synth))


def _arm_data(arm: str, real: LabelledImages, synth: LabelledImages) -> tuple[torch.Tensor, torch.Tensor]:
    if arm == "real":
        return real.images, real.labels
    if arm == "synthetic":
        return synth.images, synth.labels
    return torch.cat([real.images, synth.images]), torch.cat([real.labels, synth.labels])


def run_key(settings: EvaluationSettings, *, data_fingerprint: str, width: int, checkpoint_sha256: str,
            synthetic_set: str, train_settings: dict, device: torch.device, arm: str, seed: int,
            legacy: bool = False) -> str:
    """A digest of everything that decides the result of training ``arm`` with ``seed`` (module docstring).

    The data set counts by its content (``data_fingerprint``: train and test split), not its path, so a set
    rebuilt at the same path trains again and one moved elsewhere does not; ``width`` is the classifier's
    actual width (the setting may be None, the default). The real arm's key leaves out the synthetic set's
    settings; ``legacy``: the key as it was before, with them (of runs saved until 2026-12-02)."""
    parts = {k: v for k, v in settings.to_dict().items() if k not in _NOT_IN_RUN_KEY}
    if parts.get("spacing") == "time":  # runs saved before the spacing was a setting (all time-spaced) keep their keys
        del parts["spacing"]
    parts.update(data_fingerprint=data_fingerprint, width=width, checkpoint_sha256=checkpoint_sha256,
                 synthetic_set=synthetic_set, train_settings=train_settings, device_type=device.type, arm=arm,
                 seed=seed)
    if arm == "real" and not legacy:
        parts = {k: v for k, v in parts.items() if k not in _SYNTHETIC_ONLY}
        parts["key_form"] = 2
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _run_file(out: Path, arm: str, seed: int) -> Path:
    return out / RUNS_DIR / f"{arm.replace('+', '_')}-seed{seed}.json"


def load_run(out: Path, arm: str, seed: int, key: str, synthetic_fingerprint: str | None = None,
             legacy_key: str | None = None) -> dict | None:
    """The saved result of a finished training run with this key, or None (none saved, unreadable, other key).
    A run saved under ``legacy_key`` (the same run, keyed the old way) is taken and saved again under ``key``.

    The key names the synthetic set by its cache entry; ``synthetic_fingerprint`` (its content) also tells a set
    sampled again into that entry (pruned, then re-sampled on another kind of machine: other rounding) from the
    one the run trained on. Runs saved before fingerprints were (2026-12-02) are taken on their key alone."""
    f = _run_file(out, arm, seed)
    try:
        run = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(run, dict) and legacy_key is not None and run.get("key") == legacy_key:
        run["key"] = key
        try:
            save_run(out, arm, seed, run)
            log.info("%s: saved under the real arm's new key (without the synthetic settings)", f)
        except OSError as e:  # a read-only folder: the run is good all the same
            log.warning("%s: could not save it under its new key (%s); using it", f, e)
    if not isinstance(run, dict) or run.get("key") != key:
        log.info("%s was saved by other settings; training %s seed %d again", f, arm, seed)
        return None
    saved_fp = run.get("synthetic_fingerprint")
    if synthetic_fingerprint is not None and saved_fp is not None and saved_fp != synthetic_fingerprint:
        log.info("%s was trained on another sampling of the synthetic set; training %s seed %d again", f, arm, seed)
        return None
    return run


def save_run(out: Path, arm: str, seed: int, run: dict) -> None:
    """Write one finished run atomically (a crash leaves the old file or the new one, never half)."""
    f = _run_file(out, arm, seed)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(run) + "\n")
    tmp.replace(f)


def summarize(class_names: Sequence[str], per_seed: dict[str, list[dict]]) -> dict:
    """Per-arm results from ``{arm: [{"accuracy", "confusion"}, ...one per seed]}``."""
    arms = {}
    for arm, runs in per_seed.items():
        accs = [r["accuracy"] for r in runs]
        cm = torch.stack([torch.as_tensor(r["confusion"]) for r in runs]).sum(0)
        mean, sd = mean_std(accs)
        per_class = (cm.diag().double() / cm.sum(1).clamp(min=1).double()).tolist()
        arms[arm] = {"accuracy_mean": mean, "accuracy_std": sd, "accuracies": accs,
                     "per_class_accuracy": dict(zip(class_names, per_class)),
                     "confusion_matrix": cm.tolist(),
                     "confusion_matrix_per_seed": [torch.as_tensor(r["confusion"]).tolist() for r in runs],
                     "train_images": runs[0]["train_images"], "train_steps": runs[0].get("steps"),
                     "train_seconds": [r["seconds"] for r in runs]}
    return arms


def _classifier_cpu_bf16(classifier_precision: str, device: torch.device) -> bool:
    """``TrainSettings.cpu_bf16`` for ``--classifier-precision``: on a CPU as asked, except one that torch says
    has no bf16 instructions (bf16 emulated, many times slower: fp32, with a warning, as ``dreamdata train``
    does); never on CUDA, which trains under bf16 autocast anyway (so its runs keep one key)."""
    if classifier_precision != "bf16" or device.type != "cpu":
        return False
    if cpu_has_bf16() is False:
        log.warning("this CPU has no bf16 instructions (bf16 autocast would be emulated, many times slower): "
                    "training the classifier in fp32 (--classifier-precision asks for bf16)")
        return False
    return True


def _key_settings(tset: TrainSettings, n_images: int) -> dict:
    """The training settings that decide a run's result, for its saved-run key.  Under a step budget an arm with
    fewer images than a batch is trained on full batches of repeated shuffles since 2026-12-01 (smaller batches
    before): its key says so, and a run saved the old way is trained again."""
    d = tset.to_dict()
    if tset.steps is not None and n_images < tset.batch_size:
        d["small_set_batches"] = "full, from repeated shuffles"
    return d


def run_evaluation(settings: EvaluationSettings, out_dir: str | os.PathLike, *,
                   progress: ProgressFn | None = None,   # (fraction, message); raise from it to cancel
                   checkpoint: Checkpoint | None = None, # an already loaded checkpoint (the worker's)
                   sample_fn: Callable = sample,         # the worker may pass its batching sampler
                   check: Callable[[], None] | None = None,  # raises to stop (decoding data, synthetic_images' waits)
                   show_bars: bool = True,               # tqdm bars on stderr (off in the worker)
                   resume: bool = True,                  # reuse the finished runs saved in out_dir/runs
                   ) -> dict:
    """Run the three-arm experiment (module docstring), write the outputs to ``out_dir``, return the report."""
    settings.validate()
    t_start = time.perf_counter()
    out = Path(out_dir)
    if not resume:
        shutil.rmtree(out / RUNS_DIR, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(settings.device)
    report_progress = progress or (lambda f, m: None)
    report_progress(0.0, "loading data")
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else None
    train = load_dataset(settings.data, "train", cache_dir=cache_dir, check=check)
    test = load_dataset(settings.data, "test", cache_dir=cache_dir, check=check)
    if tuple(train.class_names) != tuple(test.class_names):
        raise ValueError(f"train classes {list(train.class_names)} differ from test classes {list(test.class_names)}")
    names = tuple(train.class_names)
    data_fingerprint = f"{train.fingerprint()}-{test.fingerprint()}"
    # the checkpoint's classes, from its config.json: a mismatch is found now, not after hours of sampling
    model_names = (checkpoint.class_names if checkpoint is not None
                   else read_config(settings.checkpoint or default_checkpoint())["class_names"])
    check_classes(model_names, names)

    gen_share = 0.25
    synth, synth_info = synthetic_images(
        checkpoint if checkpoint is not None else (settings.checkpoint or default_checkpoint()),
        settings.synthetic_per_class, settings.sampler_settings, base_seed=settings.synthetic_seed,
        cache_dir=cache_dir, device=device, precision=settings.precision, batch_size=settings.sample_batch_size,
        sample_fn=sample_fn, check=check,
        progress=lambda f: report_progress(gen_share * f, f"sampling synthetic images ({f:.0%})"))
    synth = align_classes(synth, names)
    synth_fp = synth.fingerprint()  # the set's content (the run key names its cache entry): saved with each run
    base = gen_share  # also for a cached set: it reported its share done (progress(1.0)), and progress never goes back

    reals = {s: train.subset(settings.real_fraction, seed=s) for s in settings.seeds}
    overrides = {"batch_size": settings.train_batch_size} if settings.train_batch_size else {}
    overrides["cpu_bf16"] = _classifier_cpu_bf16(settings.classifier_precision, device)
    tset = default_train_settings(settings.classifier, settings.epochs, **overrides)
    if settings.budget == "steps":  # every arm: the real arm's steps (full batches per epoch x epochs)
        n_real = len(reals[settings.seeds[0]])
        tset = replace(tset, steps=max(1, n_real // min(tset.batch_size, n_real)) * settings.epochs)
    # Training cost ~ images seen (x epochs, or steps x batch): share the remaining progress range out by that.
    jobs = [(s, arm) for s in settings.seeds for arm in ARMS]
    sizes = [tset.steps if tset.steps else _arm_size(arm, reals[s], synth) for s, arm in jobs]
    total_cost, done_cost = float(sum(sizes)), 0.0
    per_seed: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    reused: list[str] = []
    params = None
    for (seed, arm), size in zip(jobs, sizes):
        n_images = _arm_size(arm, reals[seed], synth)
        msg = f"training {settings.classifier} on {arm} ({n_images} images), seed {seed}"

        def on_train(f: float, _done=done_cost, _size=size, _msg=msg) -> None:
            report_progress(base + (1 - base) * (_done + f * _size) / total_cost, _msg)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_classifier(settings.classifier, len(names), settings.width)
        params = count_parameters(model)
        key_parts = dict(data_fingerprint=data_fingerprint, width=model.width,
                         checkpoint_sha256=synth_info["checkpoint_sha256"],
                         synthetic_set=Path(synth_info["cache_dir"]).name,
                         train_settings=_key_settings(tset, n_images), device=device, arm=arm, seed=seed)
        key = run_key(settings, **key_parts)
        uses_synth = arm != "real"  # the real arm does not depend on the synthetic images
        legacy_key = None if uses_synth else run_key(settings, **key_parts, legacy=True)
        run = load_run(out, arm, seed, key, synth_fp if uses_synth else None, legacy_key) if resume else None
        saved = run is not None
        if saved:
            reused.append(f"{arm} seed {seed}")
            report_progress(base + (1 - base) * (done_cost + size) / total_cost, f"{msg}: reused the saved run")
        else:
            report_progress(base + (1 - base) * done_cost / total_cost, msg)
            x, y = _arm_data(arm, reals[seed], synth)  # a copy of the images: only for a run that trains
            info = train_classifier(model, x, y, tset, device=device, seed=seed, progress=on_train,
                                    desc=f"{arm} seed {seed}", show_bar=show_bars)
            pred = predict(model, test.images, device)
            run = {"key": key, "arm": arm, "seed": seed,
                   "accuracy": (pred == test.labels).double().mean().item(),
                   "confusion": confusion_matrix(test.labels, pred, len(names)).tolist(),
                   "train_images": n_images, "steps": info["steps"], "seconds": info["seconds"],
                   "host": platform.node(), "finished_at": time.time()}
            if uses_synth:
                run["synthetic_fingerprint"] = synth_fp
            save_run(out, arm, seed, run)
        per_seed[arm].append(run)
        done_cost += size
        log.info("%s seed %d: test accuracy %.4f%s", arm, seed, run["accuracy"], " (saved run)" if saved else "")

    arms = summarize(names, per_seed)
    delta = paired_delta(arms["real"]["accuracies"], arms["real+synthetic"]["accuracies"])
    delta["per_class"] = {c: arms["real+synthetic"]["per_class_accuracy"][c] - arms["real"]["per_class_accuracy"][c]
                          for c in names}
    report = {
        "arms": arms,
        "delta": delta,
        "class_names": list(names),
        "settings": dict(settings.to_dict(), device=str(device),
                         checkpoint=str(checkpoint.path if checkpoint is not None
                                         else settings.checkpoint or default_checkpoint())),
        "classifier": {"kind": settings.classifier, "width": model.width, "parameters": params,
                       "train_settings": tset.to_dict()},
        "data": {"source": train.source, "train_images": len(train), "test_images": len(test),
                 "real_train_images_per_seed": len(reals[settings.seeds[0]])},
        "synthetic": dict(synth_info, images=len(synth)),
        "runs": {"saved_in": RUNS_DIR, "reused": reused},
        "notes": {
            "confusion_matrix": "rows = true class, columns = predicted class; counts summed over seeds "
                                "(confusion_matrix_per_seed has one matrix per seed)",
            "per_class_accuracy": "from the summed confusion matrix (recall per true class)",
            "accuracy_std": "sample standard deviation over seeds (ddof=1); null with one seed",
            "delta": "real+synthetic minus real, paired by seed; ci95 = mean +- t(0.975, n-1) * sd / sqrt(n); "
                     "null with one seed",
            "synthetic": "one synthetic set shared by all seeds: the interval does not cover the draw of synthetic images",
            "runs": "each finished training run is saved in runs/; 'reused' lists those taken from an earlier run "
                    "in this folder: of the same experiment, interrupted, or, for the real arm, of one with other "
                    "synthetic settings (their train_seconds are from that run)",
            "train_steps": "optimizer steps per run (batches of train_settings.batch_size; the last partial batch "
                           "of an epoch is dropped); budget 'steps' gives every arm the real arm's steps, in full "
                           "batches also where an arm has fewer images than one batch",
        },
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    write_outputs(report, out)  # adds report["files"]
    report_progress(1.0, "done")
    return report
