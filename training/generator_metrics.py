"""How good is a checkpoint's output?  Generated images vs real test images in a classifier's feature space.

    from training.generator_metrics import MetricsSettings, measure_generator
    result = measure_generator(MetricsSettings(data="../shared/data/cifar10-jpeg.tar.gz", n_per_class=100))

Feature space: the penultimate layer of the project's own classifier trained on the real
training split (Inception weights cannot be downloaded here).  That classifier is trained once
per (data set, architecture, width, epochs, seed) and cached as::

    CACHE/feature-classifier/<kind>-w<width>-e<epochs>-seed<seed>-<data fingerprint>/
        classifier.safetensors    weights (state dict, BatchNorm statistics included)
        classifier.json           kind, width, classes, training recipe, real test accuracy

Two rows are measured against the real test split, with the same number of images per class:
``generated`` (the checkpoint's images, sampled through the synthetic cache of
``training.synthetic_cache``, shared with ``dreamdata evaluate``) and ``real_train`` (real
training images: the floor a perfect generator would reach at this sample size).  Frechet
distances use the whole test split as reference; the k-NN measures use ``n_per_class`` test
images per class, so both sides have the same size up to the test split's images of a class (1,000 in
CIFAR-10): beyond that the reference is smaller than the generated set, as the ``knn`` note says.  With
``inception_weights`` the Frechet distance is also computed on Inception v3 pool3 features (test
statistics cached per weights file).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffusion.checkpoint import Checkpoint, file_sha256
from diffusion.samplers import SamplerName, SamplerSettings
from diffusion.spec import DEFAULT_SETTINGS, GuidanceInterval, check_seed

from .classifiers import (DEFAULT_WIDTH, ClassifierKind, build_classifier, default_train_settings, extract_features,
                          predict, train_classifier)
from .data import LabelledImages, default_cache_dir, load_dataset
from .features_metrics import (class_fidelity, density_coverage, feature_stats, frechet_distance_from_stats,
                               inception_features, load_inception, precision_recall)
from .generate import default_checkpoint
from .sample_cli import pick_device
from .synthetic_cache import ProgressFn, align_classes, synthetic_images

log = logging.getLogger(__name__)


def real_data_classifier(train: LabelledImages, *, kind: ClassifierKind = "cnn", width: int | None = None,
                         epochs: int = 10, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                         device: str | torch.device = "cpu", test: LabelledImages | None = None,
                         show_bar: bool = True) -> tuple[torch.nn.Module, dict]:
    """A classifier trained on all of ``train``, from the cache or trained into it; returns (model, info)."""
    width = width or DEFAULT_WIDTH[kind]
    fp = train.fingerprint()
    folder = Path(cache_dir or default_cache_dir()) / "feature-classifier" / f"{kind}-w{width}-e{epochs}-seed{seed}-{fp}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_classifier(kind, len(train.class_names), width)
    if (folder / "classifier.json").exists():
        model.load_state_dict(load_file(str(folder / "classifier.safetensors")))
        info = json.loads((folder / "classifier.json").read_text())
        log.info("reusing feature classifier %s", folder)
        return model.to(device).eval(), dict(info, path=str(folder), reused=True)
    log.info("training the feature classifier (%s, width %d, %d epochs) on %d images", kind, width, epochs, len(train))
    tset = default_train_settings(kind, epochs)
    run = train_classifier(model, train.images, train.labels, tset, device=device, seed=seed,
                           desc="feature classifier", show_bar=show_bar)
    info = {"kind": kind, "width": width, "epochs": epochs, "seed": seed, "class_names": list(train.class_names),
            "data_fingerprint": fp, "data_source": train.source, "train_images": len(train),
            "train_settings": tset.to_dict(), "train_seconds": run["seconds"], "test_accuracy": None}
    if test is not None:
        info["test_accuracy"] = (predict(model, test.images, device) == test.labels).double().mean().item()
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp_w, tmp_j = folder / f"classifier.safetensors.{os.getpid()}.tmp", folder / f"classifier.json.{os.getpid()}.tmp"
    save_file(state, str(tmp_w))
    tmp_w.replace(folder / "classifier.safetensors")
    tmp_j.write_text(json.dumps(info, indent=1) + "\n")
    tmp_j.replace(folder / "classifier.json")  # last: its presence marks the entry complete
    return model.eval(), dict(info, path=str(folder), reused=False)


def per_class(ds: LabelledImages, n: int, seed: int) -> LabelledImages:
    """Up to ``n`` random images of every class."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(len(ds.class_names)):
        idx = (ds.labels == c).nonzero().flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    keep = torch.cat(keep).sort().values
    return LabelledImages(ds.images[keep], ds.labels[keep], ds.class_names, ds.source)


@dataclass(frozen=True)
class MetricsSettings:
    data: str                                   # data set path (training.data.load_dataset)
    checkpoint: str | None = None               # None: $DREAMDATA_CHECKPOINT or the shipped one
    n_per_class: int = 100                      # generated (and reference) images per class
    sampler: SamplerName = DEFAULT_SETTINGS.sampler
    steps: int = DEFAULT_SETTINGS.steps
    guidance: float = DEFAULT_SETTINGS.guidance
    eta: float = 0.0
    guidance_interval: GuidanceInterval | None = DEFAULT_SETTINGS.guidance_interval  # None: every step
    spacing: str = DEFAULT_SETTINGS.spacing     # where the steps fall: time or logsnr
    seed: int = 0                               # image j of class c: sampler seed seed + c * 1e6 + j
    batch_size: int | None = None               # images per sampling batch (None: 50 on a CPU, 256 on a GPU)
    k: int = 5                                  # neighbours for precision/recall and density/coverage
    feature_classifier: ClassifierKind = "cnn"
    feature_width: int | None = None
    feature_epochs: int = 10
    inception_weights: str | None = None        # local torchvision inception_v3 state dict
    device: str = "auto"
    cache_dir: str | None = None
    precision: str | None = None                # of the sampling calls: auto, fp32, bf16 (None: $DREAMDATA_PRECISION)

    def validate(self) -> None:
        """ValueError (FileNotFoundError for a missing weights file) naming what is wrong: before the feature
        classifier trains or any image is sampled."""
        if self.n_per_class < 2:
            raise ValueError(f"n_per_class must be at least 2, got {self.n_per_class}")
        if self.k < 1:  # the upper bound (below the images of all classes) is checked where they are counted
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.feature_width is not None and self.feature_width < 2:
            raise ValueError(f"feature_width must be at least 2, got {self.feature_width}")
        if self.feature_epochs < 1:
            raise ValueError(f"feature_epochs must be at least 1, got {self.feature_epochs}")
        if self.inception_weights and not Path(self.inception_weights).is_file():
            raise FileNotFoundError(f"inception weights not found: {self.inception_weights}")
        check_seed("seed", self.seed)
        self.sampler_settings.validate()

    @property
    def sampler_settings(self) -> SamplerSettings:
        return SamplerSettings(self.sampler, self.steps, self.guidance, self.eta, self.guidance_interval, self.spacing)


def _row(feats: torch.Tensor, fidelity_pred: torch.Tensor, fidelity_labels: torch.Tensor, ref_stats,
         ref_knn: torch.Tensor, k: int, names) -> dict:
    return {"images": len(feats),
            "frechet_distance": frechet_distance_from_stats(*feature_stats(feats), *ref_stats),
            **precision_recall(ref_knn, feats, k), **density_coverage(ref_knn, feats, k),
            "class_fidelity": class_fidelity(fidelity_pred, fidelity_labels, names)}


def measure_generator(s: MetricsSettings, show_bars: bool = True, checkpoint: Checkpoint | None = None,
                      progress: ProgressFn | None = None, keep_features: bool = False) -> dict:
    """Rows ``generated`` and ``real_train`` (module docstring) plus the feature classifier's details.

    ``keep_features`` adds ``per_image`` (tensors, not JSON): the generated images' ``features`` [N, D],
    ``correct`` [N] (classified as requested) and the real test images' ``test_stats`` (mu, Sigma), for
    paired comparisons of two settings (:func:`training.features_metrics.paired_bootstrap`).

    ``progress`` is called with the fraction of the generated images sampled (0..1), as in
    :func:`training.synthetic_cache.synthetic_images` (once with 1.0 when they come from the cache).
    """
    s.validate()
    t0 = time.perf_counter()
    device = pick_device(s.device)
    cache_dir = Path(s.cache_dir) if s.cache_dir else default_cache_dir()
    train = load_dataset(s.data, "train", cache_dir=cache_dir)
    test = load_dataset(s.data, "test", cache_dir=cache_dir)
    names = tuple(train.class_names)
    clf, clf_info = real_data_classifier(train, kind=s.feature_classifier, width=s.feature_width,
                                         epochs=s.feature_epochs, cache_dir=cache_dir, device=device, test=test,
                                         show_bar=show_bars)
    gen, gen_info = synthetic_images(checkpoint or s.checkpoint or default_checkpoint(), s.n_per_class,
                                     s.sampler_settings,
                                     base_seed=s.seed, cache_dir=cache_dir, device=device, precision=s.precision,
                                     batch_size=s.batch_size, progress=progress)
    gen = align_classes(gen, names)
    ref_train = per_class(train, s.n_per_class, seed=s.seed)
    ref_test = per_class(test, s.n_per_class, seed=s.seed + 1)

    def feats(images: torch.Tensor) -> torch.Tensor:
        return extract_features(clf, images, device)

    test_feats, gen_feats, train_feats = feats(test.images), feats(gen.images), feats(ref_train.images)
    test_stats = feature_stats(test_feats)
    knn_ref = feats(ref_test.images)
    with torch.no_grad():
        gen_pred = clf.head(gen_feats.to(device)).argmax(1).cpu()
    rows = {
        "generated": _row(gen_feats, gen_pred, gen.labels, test_stats, knn_ref, s.k, names),
        # the classifier has seen the training images: the real row's fidelity is its test accuracy
        "real_train": _row(train_feats, predict(clf, ref_test.images, device), ref_test.labels, test_stats, knn_ref,
                           s.k, names),
    }
    if s.inception_weights:
        inception = load_inception(s.inception_weights, device)
        wsha = file_sha256(Path(s.inception_weights))[:16]
        stats_file = cache_dir / "inception-stats" / f"{test.fingerprint()}-{wsha}.pt"
        if stats_file.exists():
            d = torch.load(stats_file, weights_only=True)
            inc_stats = (d["mu"], d["sigma"])
        else:
            inc_stats = feature_stats(inception_features(inception, test.images, device))
            stats_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"mu": inc_stats[0], "sigma": inc_stats[1]}, stats_file)
        for name, ds in (("generated", gen), ("real_train", ref_train)):
            f = inception_features(inception, ds.images, device)
            rows[name]["frechet_distance_inception"] = frechet_distance_from_stats(*feature_stats(f), *inc_stats)
    notes = {
        "feature_space": f"penultimate layer ({test_feats.shape[1]}-d) of the {clf_info['kind']} trained on the "
                         "real training split (test accuracy in feature_classifier.test_accuracy)",
        "frechet_distance": "against all real test images; biased upward at small sample sizes: compare with "
                            "the real_train row of the same size",
        "knn": f"precision/recall/density/coverage with k={s.k} against {len(ref_test)} real test images"
               + (f", fewer than the {len(gen)} generated ones (the test split has no more): precision and recall "
                  "of unequal sets are not comparable with those of equal ones" if len(ref_test) < len(gen) else ""),
        "real_train.class_fidelity": "the classifier's accuracy on the real test images of the k-NN reference",
    }
    if s.inception_weights:
        notes["frechet_distance_inception"] = ("torchvision Inception v3 pool3 (2048-d, 299x299 bilinear), "
                                               "not the TF-FID graph: close to, not equal to, published FIDs")
    out = {
        "rows": rows,
        "feature_classifier": clf_info,
        "synthetic": dict(gen_info, images=len(gen)),
        "settings": dict(asdict(s), checkpoint=str(s.checkpoint or default_checkpoint()), device=str(device)),
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if keep_features:
        out["per_image"] = {"features": gen_feats, "correct": gen_pred == gen.labels, "test_stats": test_stats}
    return out
