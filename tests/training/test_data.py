"""training.data: the three source layouts, the decode cache, subsets, errors and augmentations."""
from __future__ import annotations

import io
import os
import tarfile
import time

import pytest
import torch

from tests.fixtures import encode, make_images, solid_color, write_cifar_batches, write_image_folder, write_tar
from training import data as data_mod
from training.data import DatasetError, LabelledImages, load_dataset, random_flip, to_model_range

from .conftest import TEST_PER_CLASS, THREE_CLASSES, TRAIN_PER_CLASS

SORTED = tuple(sorted(THREE_CLASSES))  # ("apple", "mango", "zebra")


def _check(ds: LabelledImages, per_class: int, offset: int = 0, tol: int = 0, class_names=SORTED):
    n = per_class * len(class_names)
    assert isinstance(ds, LabelledImages)
    assert ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
    assert ds.class_names == class_names
    # Every image carries the colour its (class, index) was written with.
    got = {(int(y), tuple(int(v) for v in img.float().mean((1, 2)).round())) for img, y in zip(ds.images, ds.labels)}
    want = {(c, solid_color(c, offset + i)) for c in range(len(class_names)) for i in range(per_class)}
    if tol == 0:
        assert got == want
    else:
        for (y, col), (wy, wcol) in zip(sorted(got), sorted(want)):
            assert y == wy and max(abs(a - b) for a, b in zip(col, wcol)) <= tol


def test_tar_train_and_test_splits(tar3):
    train = load_dataset(tar3, "train")
    test = load_dataset(tar3, "test")
    # Labels follow alphabetical class folders: 4 x apple, 4 x mango, 4 x zebra.
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    _check(train, TRAIN_PER_CLASS, tol=3)  # JPEG: solid colours survive to within a few levels
    _check(test, TEST_PER_CLASS, offset=TRAIN_PER_CLASS, tol=3)
    assert train.source == str(tar3)


def test_cifar_batches_train_and_test_splits(cifar_batches3, tmp_path):
    train = load_dataset(cifar_batches3, "train")
    test = load_dataset(cifar_batches3, "test")
    _check(train, TRAIN_PER_CLASS)  # lossless
    _check(test, TEST_PER_CLASS, offset=TRAIN_PER_CLASS)
    # The parent of cifar-10-batches-py is accepted too.
    parent = load_dataset(cifar_batches3.parent, "train")
    assert torch.equal(parent.images, train.images) and torch.equal(parent.labels, train.labels)


def test_cifar_batches_label_names_come_from_meta(tmp_path):
    # The label order is the meta file's, not alphabetical.
    names = ("zebra", "apple", "mango")
    imgs = make_images(names, 2)
    folder = write_cifar_batches(tmp_path / "b", imgs, imgs, class_names=names)
    ds = load_dataset(folder, "test")
    assert ds.class_names == names
    assert sorted(ds.labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_cifar_batches_resized_to_image_size(cifar_batches3):
    ds = load_dataset(cifar_batches3, "train", image_size=16)
    assert ds.images.shape == (12, 3, 16, 16) and ds.images.dtype == torch.uint8


def test_image_folder(image_folder3):
    ds = load_dataset(image_folder3)
    assert ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    _check(ds, TRAIN_PER_CLASS)


def test_a_flat_tree_has_no_test_split(image_folder3):
    """A <root>/<class>/ tree is training data only: its "test" split used to be the training images."""
    assert len(load_dataset(image_folder3, "train")) == 12
    with pytest.raises(DatasetError, match="(?s)no images found for split 'test'.*training data only"):
        load_dataset(image_folder3, "test")


def test_image_folder_with_split_folders(tmp_path, three_class_train, three_class_test):
    root = tmp_path / "split"
    write_image_folder(root / "train", three_class_train)
    write_image_folder(root / "test", three_class_test)
    _check(load_dataset(root, "train"), TRAIN_PER_CLASS)
    _check(load_dataset(root, "test"), TEST_PER_CLASS, offset=TRAIN_PER_CLASS)


def test_image_folder_resizes_to_image_size(tmp_path):
    root = write_image_folder(tmp_path / "big", make_images(("a", "b"), 2, size=48))
    ds = load_dataset(root, image_size=32)
    assert ds.images.shape == (4, 3, 32, 32)


@pytest.mark.parametrize("fixture", ["tar3", "cifar_batches3", "image_folder3"])
def test_second_load_hits_the_cache(fixture, request, monkeypatch, data_cache):
    path = request.getfixturevalue(fixture)
    first = load_dataset(path)
    assert list(data_cache.glob("data-*.pt")), "no cache file written"

    def boom(*a, **k):
        raise AssertionError("decoded again instead of reading the cache")

    for name in ("_decode", "_from_tar", "_from_cifar_batches", "_from_image_folder"):
        monkeypatch.setattr(data_mod, name, boom)
    (cached,) = data_cache.glob("data-*.pt")
    os.utime(cached, (1e9, 1e9))
    second = load_dataset(path)
    assert time.time() - cached.stat().st_mtime < 60  # a hit renews its last use (the service's cache pruning)
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)
    assert first.class_names == second.class_names
    # A different split / size is a different cache entry (and so would decode).
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset(path, image_size=16)


def test_cache_dir_argument_and_image_folder_change_invalidates(image_folder3, tmp_path):
    cache = tmp_path / "explicit-cache"
    assert len(load_dataset(image_folder3, cache_dir=cache)) == 12
    assert len(list(cache.glob("data-*.pt"))) == 1
    # Adding an image inside a class folder (the root's mtime does not change) must not serve stale data.
    extra = make_images(("apple",), 1, offset=9)
    (image_folder3 / "apple" / "9999.png").write_bytes(encode(extra["apple"][0], "PNG"))
    assert len(load_dataset(image_folder3, cache_dir=cache)) == 13


def test_a_tar_rewritten_to_the_same_size_and_mtime_is_decoded_again(tmp_path, three_class_train):
    """Re-packed with the classes swapped (same bytes in all, same size) and given the old mtime back, as
    ``cp -p`` or ``rsync -t`` would: the old decode must not be served."""
    import os

    cache = tmp_path / "cache"
    tar = write_tar(tmp_path / "d.tar", three_class_train)
    first = load_dataset(tar, cache_dir=cache)
    st = os.stat(tar)
    swapped = {"apple": three_class_train["zebra"], "mango": three_class_train["mango"],
               "zebra": three_class_train["apple"]}
    tmp = write_tar(tmp_path / "d2.tar", swapped)
    assert os.stat(tmp).st_size == st.st_size
    os.replace(tmp, tar)
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = load_dataset(tar, cache_dir=cache)
    assert not torch.equal(first.images, second.images)
    assert torch.equal(second.images, data_mod._from_tar(tar, "train", 32).images)


@pytest.mark.parametrize("fixture", ["tar3", "image_folder3"])
def test_a_check_that_raises_stops_a_decode(fixture, request, monkeypatch, tmp_path):
    """A worker that shuts down stops an evaluation's first decode of its data (a minute for CIFAR-10) too."""
    monkeypatch.setattr(data_mod, "CHECK_EVERY", 2)
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        load_dataset(request.getfixturevalue(fixture), cache_dir=tmp_path / "cache", check=check)
    assert not list((tmp_path / "cache").glob("*.pt"))  # nothing half decoded is cached
    assert len(load_dataset(request.getfixturevalue(fixture), cache_dir=tmp_path / "cache", check=lambda: None)) > 4


def test_unwritable_cache_does_not_stop_loading(image_folder3, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    ds = load_dataset(image_folder3, cache_dir=blocker / "cache")
    assert len(ds) == 12


def test_subset_is_class_balanced():
    labels = torch.arange(4).repeat_interleave(torch.tensor([10, 20, 30, 40]))
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    ds = LabelledImages(images, labels, ("a", "b", "c", "d"), "mem")
    sub = ds.subset(0.5, seed=1)
    assert torch.bincount(sub.labels, minlength=4).tolist() == [5, 10, 15, 20]
    # Images still carry their own labels, and are a subset of the originals.
    assert torch.equal(labels[sub.images[:, 0, 0, 0].long()], sub.labels)
    assert sub.class_names == ds.class_names
    # Deterministic per seed, different across seeds.
    assert torch.equal(ds.subset(0.5, seed=1).images, sub.images)
    assert not torch.equal(ds.subset(0.5, seed=2).images, sub.images)
    # Every class keeps at least one image; fraction 1 is the whole set.
    assert torch.bincount(ds.subset(0.01).labels, minlength=4).tolist() == [1, 1, 1, 1]
    assert ds.subset(1.0) is ds
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            ds.subset(bad)


# --------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(DatasetError, match="not found") as e:
        load_dataset(tmp_path / "nope.tar.gz")
    assert "expected one of" in str(e.value) and "tar.gz" in str(e.value)


def test_file_that_is_not_a_tar(tmp_path):
    p = tmp_path / "notes.tar.gz"
    p.write_bytes(b"this is not an archive at all" * 10)
    with pytest.raises(DatasetError, match="cannot open as a tar archive") as e:
        load_dataset(p)
    assert "expected one of" in str(e.value)


def test_tar_without_images(tmp_path):
    p = tmp_path / "empty.tar.gz"
    with tarfile.open(p, "w:gz") as tf:
        data = b"hello"
        info = tarfile.TarInfo("cifar10/train/cat/readme.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DatasetError, match="no images found for split 'train'") as e:
        load_dataset(p)
    assert "expected one of" in str(e.value)


def test_tar_without_the_requested_split(tmp_path, three_class_train):
    p = write_tar(tmp_path / "trainonly.tar", three_class_train)
    assert len(load_dataset(p, "train")) == 12
    with pytest.raises(DatasetError, match="no images found for split 'test'"):
        load_dataset(p, "test")


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        load_dataset(tmp_path / "empty")


def test_a_file_that_is_not_an_image_is_named(tmp_path):
    """macOS's ._x.jpg companions, or a truncated download: the error names the file, not a BytesIO object."""
    root = write_image_folder(tmp_path / "two", make_images(("cat", "dog"), 2))
    (root / "dog" / "._0001.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    with pytest.raises(DatasetError, match=r"dog/\._0001\.png: not a readable image"):
        load_dataset(root)


def test_directory_with_one_class(tmp_path):
    root = write_image_folder(tmp_path / "one", make_images(("cat",), 3))
    with pytest.raises(DatasetError, match=r"found 1 class folder\(s\); need at least 2"):
        load_dataset(root)


def test_mixed_sizes_without_image_size(tmp_path):
    root = write_image_folder(tmp_path / "mixed", make_images(("a",), 2, size=32))
    write_image_folder(root, make_images(("b",), 2, size=24))
    with pytest.raises(DatasetError, match="different sizes.*pass image_size"):
        load_dataset(root, image_size=None)
    assert load_dataset(root, image_size=32).images.shape == (4, 3, 32, 32)


def test_cifar_batches_with_a_missing_batch(cifar_batches3):
    (cifar_batches3 / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="missing data_batch_3"):
        load_dataset(cifar_batches3, "train")


def test_bad_split(image_folder3):
    with pytest.raises(ValueError, match="split must be"):
        load_dataset(image_folder3, "validation")


# --------------------------------------------------------------------------- augmentations


def test_random_flip_flips_some_and_preserves_content():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    y = random_flip(x, g)
    assert y.shape == x.shape and y.dtype == x.dtype
    same = [torch.equal(a, b) for a, b in zip(x, y)]
    flipped = [torch.equal(a.flip(-1), b) for a, b in zip(x, y)]
    assert all(s or f for s, f in zip(same, flipped))  # each image is itself or its mirror
    assert 10 < sum(flipped) < 54 and 10 < sum(same) < 54  # about half of each
    # Same generator state -> same flips; input untouched.
    assert torch.equal(random_flip(x, torch.Generator().manual_seed(0)), y)


def test_to_model_range():
    x = torch.tensor([0, 255, 127, 128], dtype=torch.uint8)
    y = to_model_range(x)
    assert y.dtype == torch.float32
    assert y[0].item() == -1.0 and y[1].item() == 1.0
    assert abs(y[2].item()) < 0.01 and abs(y[3].item()) < 0.01
    assert float(to_model_range(torch.arange(256, dtype=torch.uint8)).diff().min()) > 0
