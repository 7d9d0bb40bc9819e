"""training.generate's output folder across attempts: images made otherwise are made again, and writers
of the same file do not trip over each other's temporary files."""
from __future__ import annotations

import threading

import numpy as np
import torch
from PIL import Image

from diffusion.checkpoint import load_for_sampling, save_checkpoint
from diffusion.schedules import ScheduleConfig
from diffusion.spec import SamplerSettings
from training import generate
from training.generate import generate_to_dir

from diffusion_testlib import make_tiny_unet

CLASSES = ("a", "b", "c")  # the tiny UNet has 3 classes


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def test_an_attempt_in_another_precision_or_checkpoint_is_made_again(tmp_path):
    """A job's first attempt ran in bf16 (or on another checkpoint) and crashed; the attempt that finishes it
    runs in fp32: the old images are made again, so the manifest's precision is true of every image."""
    ckdir = save_checkpoint(tmp_path / "ckpt", make_tiny_unet(), ScheduleConfig("linear", 1000), CLASSES, {})
    fp32, bf16 = (load_for_sampling(ckdir, precision=p) for p in ("fp32", "bf16"))
    out = tmp_path / "job"
    generate_to_dir(bf16, [(1, 3)], out, base_seed=5)
    (out / "images" / "00002.png").unlink()  # the crash: the last image was not written
    sampled = []

    def recording(model, schedule, labels, seeds, **kw):
        sampled.extend(seeds)
        return generate.sample(model, schedule, labels, seeds, **kw)

    manifest = generate_to_dir(fp32, [(1, 3)], out, base_seed=5, sample_fn=recording)
    assert sorted(sampled) == [5, 6, 7]  # every image again, not only the missing one
    assert manifest["precision"] == "fp32"
    reference = generate_to_dir(fp32, [(1, 3)], tmp_path / "reference", base_seed=5)
    for im in reference["images"]:
        with Image.open(out / im["file"]) as got:
            assert got.text["precision"] == "fp32"
        assert np.array_equal(_pixels(out / im["file"]), _pixels(tmp_path / "reference" / im["file"]))

    # the same settings: nothing is made again
    sampled.clear()
    generate_to_dir(fp32, [(1, 3)], out, base_seed=5, sample_fn=recording)
    assert sampled == []

    # another checkpoint (the worker was given new weights between attempts): made again
    other = load_for_sampling(save_checkpoint(tmp_path / "other", make_tiny_unet(seed=1),
                                              ScheduleConfig("linear", 1000), CLASSES, {}), precision="fp32")
    generate_to_dir(other, [(1, 3)], out, base_seed=5, sample_fn=recording)
    assert sorted(sampled) == [5, 6, 7]
    with Image.open(out / "images" / "00000.png") as got:
        assert got.text["checkpoint_sha256"] == other.sha256 != fp32.sha256


def test_ddim_eta_is_recorded_and_an_image_of_another_eta_is_made_again(tmp_path):
    """eta changes a DDIM image: it is in the PNG metadata and the manifest (where not 0), and an earlier
    attempt with another eta, either way round, is made again rather than kept under the new settings."""
    ckpt = load_for_sampling(save_checkpoint(tmp_path / "ckpt", make_tiny_unet(), ScheduleConfig("linear", 1000),
                                             CLASSES, {}), precision="fp32")
    noisy, plain = SamplerSettings("ddim", 4, eta=1.0), SamplerSettings("ddim", 4)
    out, sampled = tmp_path / "job", []

    def recording(model, schedule, labels, seeds, **kw):
        sampled.extend(seeds)
        return generate.sample(model, schedule, labels, seeds, **kw)

    manifest = generate_to_dir(ckpt, [(0, 2)], out, settings=noisy, base_seed=0)
    assert [im["eta"] for im in manifest["images"]] == [1.0, 1.0]
    with Image.open(out / "images" / "00000.png") as im:
        assert im.text["eta"] == "1.0"
    manifest = generate_to_dir(ckpt, [(0, 2)], out, settings=plain, base_seed=0, sample_fn=recording)
    assert sorted(sampled) == [0, 1] and all("eta" not in im for im in manifest["images"])
    with Image.open(out / "images" / "00000.png") as im:
        assert "eta" not in im.text
    sampled.clear()
    generate_to_dir(ckpt, [(0, 2)], out, settings=noisy, base_seed=0, sample_fn=recording)
    assert sorted(sampled) == [0, 1]


def test_an_image_of_the_same_weights_under_another_schedule_is_made_again(tmp_path):
    """The checkpoint's sha256 covers the weights only, and only a schedule other than linear-1000 is written in
    the metadata: an image made under the cosine schedule is made again by a linear call, and the other way."""
    model = make_tiny_unet()
    linear, cosine = (load_for_sampling(save_checkpoint(tmp_path / name, model, schedule, CLASSES, {}),
                                        precision="fp32")
                      for name, schedule in (("linear", ScheduleConfig()), ("cosine", ScheduleConfig("cosine"))))
    assert linear.sha256 == cosine.sha256
    settings, out, sampled = SamplerSettings("ddim", 3), tmp_path / "job", []

    def recording(model, schedule, labels, seeds, **kw):
        sampled.extend(seeds)
        return generate.sample(model, schedule, labels, seeds, **kw)

    for ckpt in (cosine, linear, cosine):
        sampled.clear()
        generate_to_dir(ckpt, [(0, 2)], out, settings=settings, base_seed=0, sample_fn=recording)
        assert sorted(sampled) == [0, 1]
    with Image.open(out / "images" / "00000.png") as im:
        assert im.text["schedule"] == "cosine-1000"
    sampled.clear()
    generate_to_dir(cosine, [(0, 2)], out, settings=settings, base_seed=0, sample_fn=recording)
    assert sampled == []


def test_an_unreadable_image_is_made_again(tmp_path):
    ckpt = load_for_sampling(save_checkpoint(tmp_path / "ckpt", make_tiny_unet(), ScheduleConfig("linear", 1000),
                                             CLASSES, {}), precision="fp32")
    out = tmp_path / "job"
    generate_to_dir(ckpt, [(0, 2)], out, base_seed=0)
    good = _pixels(out / "images" / "00001.png")
    (out / "images" / "00001.png").write_bytes(b"not a png")
    generate_to_dir(ckpt, [(0, 2)], out, base_seed=0)
    assert np.array_equal(_pixels(out / "images" / "00001.png"), good)


def test_writers_of_the_same_file_each_use_their_own_temporary_file(tmp_path):
    """Two jobs filling one synthetic-set cache entry write the same PNGs; with one shared temporary name,
    one writer's rename took the other's file away (FileNotFoundError)."""
    path = tmp_path / "00000.png"
    img = torch.zeros(3, 8, 8, dtype=torch.uint8)
    names, errors = set(), []
    start = threading.Barrier(4)  # all four write at once, each alive until all have named their file

    def write(k: int) -> None:
        names.add(generate.tmp_path(path))
        start.wait()
        try:
            for _ in range(30):
                generate._write_png(path, img + k, {"seed": k})
        except Exception as e:  # pragma: no cover - the failure this test guards against
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(names) == 4
    assert _pixels(path).shape == (8, 8, 3) and not list(tmp_path.glob("*.tmp"))


def test_every_key_written_only_off_its_default_is_read_back():
    """A metadata key that _common_meta adds only for a non-default value must be in OPTIONAL_META, or an image
    made with it would be kept by a call at the default (as the schedule once was)."""
    full = generate._common_meta(SamplerSettings("ddim", 4, eta=1.0, spacing="logsnr"), False, ScheduleConfig("cosine"))
    plain = generate._common_meta(SamplerSettings("ddim", 4), False, ScheduleConfig())
    assert set(full) - set(plain) == set(generate.OPTIONAL_META)
