"""Reusable builders of tiny labelled image data sets, in every layout ``training.data`` reads.

Plain functions (no pytest) so any test folder can use them::

    from tests.fixtures import make_images, write_image_folder, write_tar, write_cifar_batches

Images are solid colours (exact under JPEG to within a few levels), so content checks are easy:
image ``i`` of class index ``c`` has colour ``solid_color(c, i)``.
"""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# Images of the same seeds sampled in other batches (or by a compiled model) may differ by float rounding: a
# value rounds to the neighbouring 8-bit level now and then, not everywhere.
ROUNDING_SHARE = 0.01


def assert_same_up_to_rounding(got, want, what: str = "images") -> None:
    """``got`` and ``want`` (uint8 arrays or tensors of one shape) differ by at most one level per value, in at
    most ``ROUNDING_SHARE`` of the values: a systematic shift (a floor for a round, an extra cast) fails."""
    a, b = np.asarray(got).astype(np.int64), np.asarray(want).astype(np.int64)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} and {b.shape}"
    diff = np.abs(a - b)
    assert diff.max(initial=0) <= 1, f"{what}: values differ by up to {diff.max()} levels"
    share = float((diff > 0).mean()) if diff.size else 0.0
    assert share <= ROUNDING_SHARE, f"{what}: {share:.2%} of the values differ (rounding touches at most {ROUNDING_SHARE:.0%})"


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def solid_color(class_index: int, image_index: int) -> tuple[int, int, int]:
    """A colour that encodes (class, image): R = class, G = image, B fixed."""
    return (10 + 20 * class_index) % 256, (10 + 15 * image_index) % 256, 128


def make_images(class_names, per_class: int, size: int = 32, offset: int = 0) -> dict[str, list[np.ndarray]]:
    """``{class: [HxWx3 uint8, ...]}``; the class index is the position in ``sorted(class_names)``.

    ``offset`` shifts the image index (use it to make test images differ from train images).
    """
    order = sorted(class_names)
    out = {}
    for name in class_names:
        c = order.index(name)
        out[name] = [np.full((size, size, 3), solid_color(c, offset + i), dtype=np.uint8) for i in range(per_class)]
    return out


def encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    kw = {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _fmt(ext: str) -> str:
    return {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}[ext.lower()]


def write_image_folder(root, images: dict[str, list[np.ndarray]], ext: str = ".png") -> Path:
    """``<root>/<class>/NNNN<ext>``."""
    root = Path(root)
    for name, arrays in images.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(arrays):
            (root / name / f"{i:04d}{ext}").write_bytes(encode(a, _fmt(ext)))
    return root


def write_tar(path, train: dict[str, list[np.ndarray]], test: dict[str, list[np.ndarray]] | None = None,
              prefix: str = "cifar10", ext: str = ".jpg") -> Path:
    """A tar(.gz) holding ``<prefix>/train/<class>/NNNN<ext>`` (and ``<prefix>/test/...``)."""
    path = Path(path)
    mode = "w:gz" if path.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as tf:
        for split, images in (("train", train), ("test", test or {})):
            for name, arrays in images.items():
                for i, a in enumerate(arrays):
                    data = encode(a, _fmt(ext))
                    info = tarfile.TarInfo(f"{prefix}/{split}/{name}/{i:04d}{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return path


def _flatten(images: dict[str, list[np.ndarray]], class_names) -> tuple[np.ndarray, list[int]]:
    xs, ys = [], []
    for name, arrays in images.items():
        for a in arrays:
            xs.append(a.transpose(2, 0, 1).reshape(-1))  # CIFAR rows: 1024 R, 1024 G, 1024 B
            ys.append(list(class_names).index(name))
    return np.stack(xs).astype(np.uint8), ys


def write_cifar_batches(folder, train: dict[str, list[np.ndarray]], test: dict[str, list[np.ndarray]],
                        class_names=None) -> Path:
    """torchvision's ``cifar-10-batches-py`` layout: data_batch_1..5, test_batch, batches.meta.

    ``class_names`` gives the label order (default: ``sorted(train)``); images must be 32x32.
    The train images are dealt round-robin over the five batches.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    class_names = list(class_names or sorted(train))
    x, y = _flatten(train, class_names)
    for b in range(5):
        d = {b"batch_label": f"training batch {b + 1} of 5".encode(), b"data": x[b::5], b"labels": y[b::5],
             b"filenames": [f"{i}.png".encode() for i in range(len(y))][b::5]}
        with open(folder / f"data_batch_{b + 1}", "wb") as f:
            pickle.dump(d, f)
    xt, yt = _flatten(test, class_names)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"data": xt, b"labels": yt}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in class_names], b"num_cases_per_batch": len(y) // 5}, f)
    return folder
