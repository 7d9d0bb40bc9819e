"""Labelled image data sets, decoded once into a cached uint8 tensor.

Accepted sources (all give ``images: [N, 3, H, W] uint8`` and ``labels: [N] int64``):

- a ``.tar.gz`` / ``.tar`` holding an ImageFolder tree, e.g. ``cifar10/{train,test}/<class>/*.jpg``
  (``../shared/data/cifar10-jpeg.tar.gz``);
- torchvision's ``cifar-10-batches-py`` folder (or its parent);
- any ImageFolder directory ``<root>/<class>/*.{png,jpg,...}`` (or ``<root>/{train,test}/<class>/...``).

Decoding is cached as ``.npz``-free raw tensors (``torch.save`` of plain tensors, loaded with
``weights_only=True``) under ``~/.cache/dreamdata`` keyed by the source path, size and mtime.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

Check = Callable[[], None]  # called now and then during long work; raises to stop it
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DatasetError(ValueError):
    """The data set is missing or is not in a layout we understand."""


@dataclass
class LabelledImages:
    images: torch.Tensor           # [N, 3, H, W] uint8
    labels: torch.Tensor           # [N] int64
    class_names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, fraction: float, seed: int = 0) -> "LabelledImages":
        """A class-balanced random subset holding ``fraction`` of each class."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if fraction == 1:
            return self
        g = torch.Generator().manual_seed(seed)
        keep = []
        for c in range(len(self.class_names)):
            idx = (self.labels == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            keep.append(idx[: max(1, round(len(idx) * fraction))])
        keep = torch.cat(keep).sort().values
        return LabelledImages(self.images[keep], self.labels[keep], self.class_names, self.source)

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the pixels, labels and class names: the set's content, wherever it lies."""
        h = hashlib.sha256()
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        h.update("|".join(self.class_names).encode())
        return h.hexdigest()[:16]


EXPECTED = (
    "expected one of: a .tar.gz of an ImageFolder tree (e.g. cifar10/train/<class>/*.jpg), "
    "torchvision's cifar-10-batches-py folder, or an ImageFolder directory <root>/<class>/*.png"
)


def _decode(data: bytes, size: int | None) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _stack(arrays: list[np.ndarray], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DatasetError(f"images have different sizes {sorted(shapes)[:4]}; pass image_size to resize them")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64)


def _split_members(names: list[str], split: str) -> dict[str, list[str]]:
    """Map class name -> member paths for an ImageFolder tree inside a list of paths.

    Looks for ``.../<split>/<class>/<file>`` first, then ``<root>/<class>/<file>``.
    """
    by_class: dict[str, list[str]] = {}
    for n in names:
        if not n.lower().endswith(IMAGE_EXTS):
            continue
        parts = Path(n).parts
        if len(parts) >= 3 and parts[-3] == split:
            by_class.setdefault(parts[-2], []).append(n)
    if by_class:
        return by_class
    if any(len(Path(n).parts) >= 3 and Path(n).parts[-3] in ("train", "test") for n in names):
        return {}  # split folders exist but not this one
    if split == "test":
        return {}  # a flat <root>/<class>/ tree is training data only: never test on the images trained on
    for n in names:
        if n.lower().endswith(IMAGE_EXTS) and len(Path(n).parts) >= 2:
            by_class.setdefault(Path(n).parts[-2], []).append(n)
    return by_class


CHECK_EVERY = 1000  # images read or decoded between two calls of a loader's ``check``


def _no_check() -> None:
    pass


def _from_tar(path: Path, split: str, image_size: int | None, check: Check = _no_check) -> LabelledImages:
    """Read an ImageFolder tree from a tar(.gz) in one sequential pass (no seeking in gzip)."""
    try:
        tf = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError) as e:
        raise DatasetError(f"{path}: cannot open as a tar archive ({e}); {EXPECTED}") from e
    blobs: dict[str, bytes] = {}
    with tf:
        for m in tf:
            if m.isfile() and m.name.lower().endswith(IMAGE_EXTS):
                blobs[m.name] = tf.extractfile(m).read()
                if len(blobs) % CHECK_EVERY == 0:
                    check()
    return _decode_tree(path, list(blobs), blobs.__getitem__, split, image_size, check)


def _from_cifar_batches(folder: Path, split: str, image_size: int | None = None) -> LabelledImages:
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for f in files:
        p = folder / f
        if not p.exists():
            raise DatasetError(f"{folder}: missing {f}; {EXPECTED}")
        with open(p, "rb") as fh:
            # torchvision's CIFAR batches are pickles of plain numpy arrays; this is the
            # documented format of that data set (not a checkpoint).
            d = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.extend(int(v) for v in d[b"labels"])
    names = CIFAR10_CLASSES
    meta = folder / "batches.meta"
    if meta.exists():
        with open(meta, "rb") as fh:
            names = tuple(n.decode() for n in pickle.load(fh, encoding="bytes")[b"label_names"])
    x = np.concatenate(xs)
    if image_size is not None and image_size != 32:  # resize like the other sources do
        x = np.stack([np.asarray(Image.fromarray(a.transpose(1, 2, 0)).resize((image_size, image_size), Image.BICUBIC))
                      for a in x]).transpose(0, 3, 1, 2)
    return LabelledImages(torch.from_numpy(np.ascontiguousarray(x)), torch.tensor(ys, dtype=torch.int64), names,
                          str(folder))


def _from_image_folder(root: Path, split: str, image_size: int | None,
                       check: Check = _no_check) -> LabelledImages:
    names = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    return _decode_tree(root, names, lambda n: (root / n).read_bytes(), split, image_size, check)


def _decode_tree(source: Path, names: list[str], read, split: str, image_size: int | None,
                 check: Check = _no_check) -> LabelledImages:
    """Decode the ImageFolder tree among ``names`` (``read(name) -> bytes``); classes in sorted order."""
    by_class = _split_members(names, split)
    if not by_class:
        flat = split == "test" and _split_members(names, "train")
        raise DatasetError(f"{source}: no images found for split {split!r}"
                           + (" (a <root>/<class>/ tree without train/ and test/ folders is training data only: "
                              "a test split needs <root>/test/<class>/)" if flat else "") + f"; {EXPECTED}")
    classes = tuple(sorted(by_class))
    arrays, labels = [], []
    for ci, c in enumerate(classes):
        for n in sorted(by_class[c]):
            try:
                arrays.append(_decode(read(n), image_size))
            except (OSError, ValueError) as e:  # PIL names no file (it reads bytes): say which one
                raise DatasetError(f"{source}: {n}: not a readable image ({e})") from None
            labels.append(ci)
            if len(labels) % CHECK_EVERY == 0:
                check()
    x, y = _stack(arrays, labels)
    return LabelledImages(x, y, classes, str(source))


def _cache_key(path: Path, split: str, image_size: int | None) -> str:
    st = path.stat()
    # nanosecond mtime, inode and ctime too: a tar re-packed to the same size within the same second, or copied
    # with its old mtime (cp -p, rsync -t), must not be served from the old decode (ctime cannot be set back)
    raw = (f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}|{split}|{image_size}"
           f"|v2")
    if path.is_dir():
        # A directory's own mtime does not change when files inside its sub-folders are added,
        # removed or rewritten: fingerprint every file, or a stale cache would be served.
        listing = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                         for p in path.rglob("*") if p.is_file())
        raw += "|" + hashlib.sha256(repr(listing).encode()).hexdigest()
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def tmp_path(path: Path) -> Path:
    """Where to write ``path`` before renaming it into place: a name of this process and thread only, so two
    writers of the same file (DDP ranks decoding one data set, two jobs filling one synthetic-set cache entry)
    never share a temporary file."""
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def touch(path: Path) -> None:
    """Set ``path``'s modification time to now, if it can (a read-only cache stays as it is)."""
    try:
        os.utime(path)
    except OSError:
        pass


def default_cache_dir() -> Path:
    return Path(os.environ.get("DREAMDATA_CACHE", Path.home() / ".cache" / "dreamdata"))


def load_dataset(path: str | os.PathLike, split: str = "train", image_size: int | None = 32,
                 cache_dir: Path | None = None, check: Check | None = None) -> LabelledImages:
    """Load a labelled image set (see module docstring); decode once, then read the cache.

    ``check`` is called every ``CHECK_EVERY`` images while a set is read and decoded (a minute or so for
    CIFAR-10's JPEGs), and may raise to stop: a worker's job stops there too when its worker shuts down."""
    check = check or _no_check
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"data set not found: {path}; {EXPECTED}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cache_dir = cache_dir or default_cache_dir()
    cache = cache_dir / f"data-{_cache_key(path, split, image_size)}.pt"
    if cache.exists():
        touch(cache)  # its last use, for the service's cache pruning (worker.jobs.prune_cache), before the read
        try:
            d = torch.load(cache, weights_only=True)
        except FileNotFoundError:  # pruned between the two: decode again
            d = None
        if d is not None:
            return LabelledImages(d["images"], d["labels"], tuple(d["class_names"]), str(path))

    if path.is_file():
        ds = _from_tar(path, split, image_size, check)
    elif (path / "data_batch_1").exists() or (path / "test_batch").exists():
        ds = _from_cifar_batches(path, split, image_size)
    elif (path / "cifar-10-batches-py").is_dir():
        ds = _from_cifar_batches(path / "cifar-10-batches-py", split, image_size)
    else:
        ds = _from_image_folder(path, split, image_size, check)
    if len(ds.class_names) < 2:
        raise DatasetError(f"{path}: found {len(ds.class_names)} class folder(s); need at least 2; {EXPECTED}")
    log.info("decoded %d images in %d classes from %s", len(ds), len(ds.class_names), path)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path(cache)  # DDP ranks, and jobs of one threads-pool worker, decode and write concurrently
        torch.save({"images": ds.images, "labels": ds.labels, "class_names": list(ds.class_names)}, tmp)
        tmp.replace(cache)
    except OSError as e:  # a read-only home must not stop training
        log.warning("could not write data cache %s: %s", cache, e)
    return ds


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random horizontal flip per image. x: [N, C, H, W]."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return x.float() / 127.5 - 1.0
