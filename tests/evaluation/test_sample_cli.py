"""``dreamdata sample`` end to end on a tiny checkpoint: the folder it writes, and a rerun that goes on."""
from __future__ import annotations

import json
import zipfile

from PIL import Image

from dreamdata_cli import main
from training.data import CIFAR10_CLASSES


def _sample(checkpoint, out, *extra):
    main(["sample", "--checkpoint", str(checkpoint), "--n", "2", "--sampler", "dpmpp", "--steps", "2",
          "--device", "cpu", "--precision", "fp32", "--out", str(out), *extra])


def test_sample_writes_the_documented_folder(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    _sample(tiny_checkpoint, out, "--class", "cat", "--class", "1", "--seed", "7", "--zip")
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["images"] == 4 and printed["seed"] == 7 and printed["grid"] == f"{out}/grid.png"

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"cat": 2, "automobile": 2} and manifest["base_seed"] == 7
    assert [(im["file"], im["class_name"], im["seed"]) for im in manifest["images"]] == [
        ("images/00000.png", "cat", 7), ("images/00001.png", "cat", 8),
        ("images/00002.png", "automobile", 9), ("images/00003.png", "automobile", 10)]
    for im in manifest["images"]:
        with Image.open(out / im["file"]) as png:
            assert png.size == (32, 32) and (png.text["class"], png.text["seed"]) == (im["class_name"], str(im["seed"]))
    with Image.open(out / "grid.png") as grid:  # one row per class, two images each, 2-pixel padding
        assert grid.size == (2 + 2 * 34, 2 + 2 * 34)
    with zipfile.ZipFile(out / "images.zip") as z:
        assert {n for n in z.namelist() if n.startswith("images/")} == {im["file"] for im in manifest["images"]}


def test_a_rerun_with_the_same_seed_keeps_the_images_already_made(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    # batches of one image, so the image made again meets the same kernels (other batch sizes round differently)
    _sample(tiny_checkpoint, out, "--class", "all", "--seed", "3", "--batch-size", "1")
    first = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "images").iterdir()}
    assert len(first) == 2 * len(CIFAR10_CLASSES)
    with Image.open(out / "grid.png") as grid:  # a row per class: 10 rows of 2
        assert grid.size == (2 + 2 * 34, 2 + len(CIFAR10_CLASSES) * 34)
    (out / "images" / "00005.png").unlink()  # a run stopped before this image was written
    _sample(tiny_checkpoint, out, "--class", "all", "--seed", "3", "--batch-size", "1")
    again = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "images").iterdir()}
    assert again.keys() == first.keys()
    assert all(again[n] == first[n] for n in first if n != "00005.png")  # untouched
    assert again["00005.png"][0] == first["00005.png"][0]  # made again, the same image


def test_a_seed_the_service_would_refuse_is_refused_before_the_model_loads(tmp_path, capsys):
    """torch's generators alias negative seeds and refuse 2**64 (after the model loaded); the API takes 0..2**31-1."""
    import pytest

    for seed in ("-1", str(2**31), str(2**64)):
        with pytest.raises(SystemExit) as e:
            _sample(tmp_path / "no-checkpoint", tmp_path / "out", "--seed", seed)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--seed must be in 0..2147483647, got {seed}" in err, err
    assert not (tmp_path / "out").exists()
