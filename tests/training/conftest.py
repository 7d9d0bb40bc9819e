"""Fixtures for the training tests: tiny data sets in all three layouts ``training.data`` reads.

Nothing here reads ``../shared/data``; every data set is written into a temporary folder.
"""
from __future__ import annotations

import os

import pytest

from tests.fixtures import (CIFAR10_CLASSES, make_images, write_cifar_batches, write_image_folder,
                            write_tar)

# Created in this (non-alphabetical) order; loaders must number them alphabetically.
THREE_CLASSES = ("zebra", "apple", "mango")
TRAIN_PER_CLASS = 4
TEST_PER_CLASS = 2


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
    """Every test gets its own decode cache (never ~/.cache/dreamdata)."""
    d = tmp_path / "dreamdata-cache"
    monkeypatch.setenv("DREAMDATA_CACHE", str(d))
    return d


@pytest.fixture
def three_class_train():
    return make_images(THREE_CLASSES, TRAIN_PER_CLASS)


@pytest.fixture
def three_class_test():
    return make_images(THREE_CLASSES, TEST_PER_CLASS, offset=TRAIN_PER_CLASS)


@pytest.fixture
def tar3(tmp_path, three_class_train, three_class_test):
    """``cifar10/{train,test}/<class>/NNNN.jpg`` in a .tar.gz (3 classes, 4 train + 2 test each)."""
    return write_tar(tmp_path / "cifar10-jpeg.tar.gz", three_class_train, three_class_test)


@pytest.fixture
def cifar_batches3(tmp_path, three_class_train, three_class_test):
    """torchvision's ``cifar-10-batches-py`` folder (3 classes, label order = sorted names)."""
    return write_cifar_batches(tmp_path / "cifar-10-batches-py", three_class_train, three_class_test)


@pytest.fixture
def image_folder3(tmp_path, three_class_train):
    """A plain ImageFolder ``<root>/<class>/NNNN.png`` (3 classes, 4 images each)."""
    return write_image_folder(tmp_path / "imagefolder", three_class_train)


@pytest.fixture(scope="session")
def data10(tmp_path_factory):
    """A 10-class ImageFolder (CIFAR-10 class names, 2 PNGs each) matching the ``tiny`` config's UNet."""
    return write_image_folder(tmp_path_factory.mktemp("data10"), make_images(CIFAR10_CLASSES, 2))


@pytest.fixture
def subprocess_env(data_cache):
    """Environment for child Python processes: this checkout importable, one thread each, the test's cache."""
    from pathlib import Path
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["DREAMDATA_CACHE"] = str(data_cache)
    return env
