"""The synthetic-set cache: per-class seeds, so a set grows instead of being sampled again."""
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusion.samplers import SamplerSettings
from tests.fixtures import assert_same_up_to_rounding
from training.synthetic_cache import CLASS_SEED_STRIDE, cache_path, filling, image_specs, missing, synthetic_images

SETTINGS = SamplerSettings("ddim", 2, 1.0)


def test_image_specs_seed_rule_and_order():
    specs = image_specs(3, 2, base_seed=7)
    # j-major for sampling (an interrupted run leaves a complete smaller set), index class-major for loading
    assert [(s.class_index, s.seed - 7) for s in specs] == [
        (0, 0), (1, CLASS_SEED_STRIDE), (0, 1), (1, CLASS_SEED_STRIDE + 1), (0, 2), (1, CLASS_SEED_STRIDE + 2)]
    assert sorted(s.index for s in specs) == list(range(6))
    assert {s.index: s.class_index for s in specs} == {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
    assert len({s.file for s in specs}) == 6
    # the first k of a class are the same images whatever the set's size
    small = {(s.class_index, s.seed, s.file) for s in image_specs(2, 2, 7)}
    assert small <= {(s.class_index, s.seed, s.file) for s in specs}
    with pytest.raises(ValueError, match="at most"):
        image_specs(CLASS_SEED_STRIDE + 1, 2, 0)


def test_a_set_grows_and_a_smaller_one_is_its_start(tiny_checkpoint, cache_dir, sampling_calls):
    small, info = synthetic_images(tiny_checkpoint, 2, SETTINGS, cache_dir=cache_dir, batch_size=7)
    assert info["reused"] is False and info["sampled"] == 20 and len(sampling_calls) == 1
    assert small.labels.tolist() == [c for c in range(10) for _ in range(2)]  # class-major
    assert small.images.shape == (20, 3, 32, 32) and small.images.dtype == torch.uint8
    folder = info["cache_dir"]

    fractions = []
    big, info = synthetic_images(tiny_checkpoint, 3, SETTINGS, cache_dir=cache_dir, batch_size=7,
                                 progress=fractions.append)
    assert info["cache_dir"] == folder and info["sampled"] == 10  # only image j=2 of every class
    assert sorted(sampling_calls[1]) == [c * CLASS_SEED_STRIDE + 2 for c in range(10)]
    assert fractions[0] == pytest.approx((20 + 7 / 2) / 30, abs=1e-4) and fractions[-1] == 1.0  # 20 on disk
    assert fractions == sorted(fractions)  # a written batch is not reported ahead of the next one
    assert torch.equal(big.images.view(10, 3, 3, 32, 32)[:, :2], small.images.view(10, 2, 3, 32, 32))
    assert json.loads((Path(folder) / "timing.json").read_text())["images"] == 30

    os.utime(folder, (1e9, 1e9))
    again, info = synthetic_images(tiny_checkpoint, 1, SETTINGS, cache_dir=cache_dir)
    assert info["reused"] is True and info["sampled"] == 0 and len(sampling_calls) == 2
    assert time.time() - os.stat(folder).st_mtime < 60  # a reuse renews its last use (cache pruning reads it)
    assert torch.equal(again.images, small.images[::2])

    # a PNG records its seed, so any image can be reproduced on its own
    with Image.open(Path(folder) / "images" / "4" / "000001.png") as im:
        assert int(im.text["seed"]) == 4 * CLASS_SEED_STRIDE + 1 and im.text["class_index"] == "4"


def test_an_unreadable_image_in_an_entry_is_sampled_again(tiny_checkpoint, cache_dir, sampling_calls):
    """A PNG that a disk lost half of (or a hand emptied) would fail every later use of the entry."""
    first, info = synthetic_images(tiny_checkpoint, 2, SETTINGS, cache_dir=cache_dir)
    folder = Path(info["cache_dir"])
    (folder / "images" / "3" / "000001.png").write_bytes(b"")
    cut = folder / "images" / "7" / "000000.png"
    cut.write_bytes(cut.read_bytes()[:40])
    again, info = synthetic_images(tiny_checkpoint, 2, SETTINGS, cache_dir=cache_dir)
    assert sorted(sampling_calls[-1]) == [3 * CLASS_SEED_STRIDE + 1, 7 * CLASS_SEED_STRIDE]
    assert info["sampled"] == 2 and torch.equal(again.images, first.images)
    # found damaged after sampling the rest of a bigger set: the info counts both passes
    (folder / "images" / "5" / "000000.png").write_bytes(b"")
    bigger, info = synthetic_images(tiny_checkpoint, 3, SETTINGS, cache_dir=cache_dir)
    assert info["sampled"] == 11 and info["reused"] is False and len(bigger.labels) == 30


def test_a_negative_zero_guidance_is_the_same_setting():
    assert SamplerSettings("ddim", 5, -0.0) == SamplerSettings("ddim", 5, 0.0)
    assert str(SamplerSettings("ddim", 5, -0.0).guidance) == "0.0"


def test_an_interrupted_fill_keeps_its_images_and_images_do_not_depend_on_the_batch(
        tiny_checkpoint, cache_dir, sampling_calls):
    full, info = synthetic_images(tiny_checkpoint, 2, SETTINGS, cache_dir=cache_dir, batch_size=20)
    folder = Path(info["cache_dir"])
    lost = sorted(folder.glob("images/*/*.png"))[::3]
    for png in lost:
        png.unlink()
    assert missing(folder, 2, 10, 0) == len(lost)
    refilled, info = synthetic_images(tiny_checkpoint, 2, SETTINGS, cache_dir=cache_dir, batch_size=3)
    assert info["sampled"] == len(lost) and len(sampling_calls[-1]) == len(lost)
    assert missing(folder, 2, 10, 0) == 0
    # sampled again in other batches (of 3, not 20), the images are the same up to float rounding
    assert_same_up_to_rounding(refilled.images, full.images)


def test_two_writers_of_one_entry_sample_each_image_once(tiny_checkpoint, cache_dir):
    """Two jobs of a threads-pool worker (or the CLI and the service) filling one entry: the second waits for
    the first's lock, then finds the images on disk, instead of sampling the whole set again beside it."""
    from diffusion.samplers import sample

    seeds: list[int] = []
    start = threading.Barrier(2)
    results: list = [None, None]

    def counting(*args, **kwargs):
        seeds.extend(args[3])
        return sample(*args, **kwargs)

    def fill(i: int) -> None:
        start.wait()
        results[i] = synthetic_images(tiny_checkpoint, 2, SETTINGS, cache_dir=cache_dir, batch_size=5,
                                      sample_fn=counting)

    threads = [threading.Thread(target=fill, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in results), "a writer failed (see the captured log)"
    assert sorted(seeds) == sorted(s.seed for s in image_specs(2, 10, 0))  # every image once, by one writer
    assert sorted(info["sampled"] for _, info in results) == [0, 20]
    assert torch.equal(results[0][0].images, results[1][0].images)
    assert json.loads((Path(results[0][1]["cache_dir"]) / "timing.json").read_text())["images"] == 20


def test_a_writer_waiting_for_the_lock_stops_when_its_check_raises(tiny_checkpoint, cache_dir, sampling_calls):
    class Canceled(Exception):
        pass

    _, info = synthetic_images(tiny_checkpoint, 1, SETTINGS, cache_dir=cache_dir)
    folder = Path(info["cache_dir"])
    checks = []

    def cancel_on_the_second_look() -> None:
        checks.append(time.monotonic())
        if len(checks) == 2:
            raise Canceled

    with filling(folder):  # another writer holds the entry
        with pytest.raises(Canceled):
            synthetic_images(tiny_checkpoint, 2, SETTINGS, cache_dir=cache_dir, check=cancel_on_the_second_look)
    assert len(sampling_calls) == 1 and missing(folder, 2, 10, 0) == 10  # it sampled nothing
    _, info = synthetic_images(tiny_checkpoint, 2, SETTINGS, cache_dir=cache_dir)  # the lock is free again
    assert info["sampled"] == 10


def test_a_writer_waiting_for_the_lock_stops_waiting_once_its_images_are_on_disk(tiny_checkpoint, cache_dir):
    """A job that needs the first 1 per class of a set another job is filling to 5,000 waits only for those."""
    import shutil

    first, info = synthetic_images(tiny_checkpoint, 1, SETTINGS, cache_dir=cache_dir)
    folder = Path(info["cache_dir"])
    shutil.move(folder / "images", cache_dir / "aside")
    fractions, result = [], []
    with filling(folder):  # the other writer, still sampling
        waiter = threading.Thread(target=lambda: result.append(synthetic_images(
            tiny_checkpoint, 1, SETTINGS, cache_dir=cache_dir, progress=fractions.append)))
        waiter.start()
        wait_for_it = time.monotonic() + 30
        while not fractions and time.monotonic() < wait_for_it:  # it waits, reporting what is on disk
            time.sleep(0.05)
        assert fractions == [0.0] * len(fractions) and fractions
        shutil.move(cache_dir / "aside", folder / "images")  # the other writer's batch lands
        waiter.join(30)
        assert not waiter.is_alive()  # done while the other writer still holds the lock
    (images, info), = result
    assert info["sampled"] == 0 and info["reused"] is True and torch.equal(images.images, first.images)
    assert fractions[-1] == 1.0


def test_a_stopped_fill_has_recorded_the_time_of_the_batches_it_wrote(tiny_checkpoint, cache_dir):
    class Stop(Exception):
        pass

    def stop_after_the_first_batch(fraction: float) -> None:
        if any(cache_dir.rglob("*.png")):  # called again once the first batch (7 of 20) is written
            raise Stop

    with pytest.raises(Stop):
        synthetic_images(tiny_checkpoint, 2, SETTINGS, cache_dir=cache_dir, batch_size=7,
                         progress=stop_after_the_first_batch)
    (folder,) = {png.parent.parent.parent for png in cache_dir.rglob("*.png")}  # <entry>/images/<class>/<j>.png
    assert len(list(folder.glob("images/*/*.png"))) == 7
    timing = json.loads((folder / "timing.json").read_text())
    assert timing["images"] == 7 and timing["seconds"] > 0
    _, info = synthetic_images(tiny_checkpoint, 2, SETTINGS, cache_dir=cache_dir, batch_size=7)
    assert info["sampled"] == 13 and json.loads((folder / "timing.json").read_text())["images"] == 20


def test_the_precision_keys_the_cache_and_a_loaded_checkpoint_brings_its_own(tiny_checkpoint, cache_dir, sampling_calls):
    from diffusion.checkpoint import load_for_sampling

    fp32, info32 = synthetic_images(tiny_checkpoint, 1, SETTINGS, cache_dir=cache_dir, precision="fp32")
    bf16, info16 = synthetic_images(tiny_checkpoint, 1, SETTINGS, cache_dir=cache_dir, precision="bf16")
    assert (info32["precision"], info16["precision"]) == ("fp32", "bf16")
    assert info16["cache_dir"] != info32["cache_dir"] and info16["cache_dir"].split("-")[-2] == "bf16"
    assert len(sampling_calls) == 2 and not torch.equal(fp32.images, bf16.images)
    # a loaded checkpoint's precision wins over the argument
    _, info = synthetic_images(load_for_sampling(tiny_checkpoint, precision="bf16"), 1, SETTINGS,
                               cache_dir=cache_dir, precision="fp32")
    assert info["cache_dir"] == info16["cache_dir"] and info["reused"] is True


def test_the_same_weights_under_another_schedule_are_another_entry(tmp_path):
    """config.json's schedule changes every image, and the checkpoint's sha256 covers the weights only."""
    from diffusion.schedules import ScheduleConfig
    from training.generate import _common_meta

    args = (tmp_path, "ab" * 32, SamplerSettings("dpmpp_sde", 20, 4.0), 0, 10, False)
    default = cache_path(*args)
    assert cache_path(*args, ScheduleConfig()) == default  # the entries made before the schedule was keyed
    others = {cache_path(*args, ScheduleConfig("cosine")), cache_path(*args, ScheduleConfig(timesteps=500))}
    assert len(others | {default}) == 3
    # and the PNGs' metadata, by which generate_to_dir remakes images an earlier call made otherwise
    settings = SamplerSettings("dpmpp", 5, 1.0)
    assert _common_meta(settings, False, ScheduleConfig()) == _common_meta(settings, False)
    assert _common_meta(settings, False, ScheduleConfig("cosine"))["schedule"] == "cosine-1000"


def test_a_checkpoint_copied_with_another_schedule_samples_its_own_set(tiny_checkpoint, cache_dir, tmp_path):
    """The same weights file, config.json edited to the cosine schedule: a set of its own, not the linear one's."""
    import shutil

    cosine = tmp_path / "cosine"
    shutil.copytree(tiny_checkpoint, cosine)
    cfg = json.loads((cosine / "config.json").read_text())
    (cosine / "config.json").write_text(json.dumps(dict(cfg, schedule={"name": "cosine", "timesteps": 1000})))
    linear, a = synthetic_images(tiny_checkpoint, 1, SETTINGS, cache_dir=cache_dir)
    other, b = synthetic_images(cosine, 1, SETTINGS, cache_dir=cache_dir)
    assert a["checkpoint_sha256"] == b["checkpoint_sha256"] and a["cache_dir"] != b["cache_dir"]
    assert b["sampled"] == 10 and not torch.equal(linear.images, other.images)


def test_the_guidance_interval_keys_guided_entries_only(tmp_path):
    classic = cache_path(tmp_path, "ab" * 32, SamplerSettings("dpmpp_sde", 20, 4.0), 0, 10)
    narrow = cache_path(tmp_path, "ab" * 32, SamplerSettings("dpmpp_sde", 20, 4.0, guidance_interval=(0.28, 4)), 0, 10)
    assert classic != narrow and "-g4-i0.28,4-seed0-" in narrow.name and "-i" not in classic.name.split("-g4")[1]
    # unguided: no step makes the second call, so the interval changes no image and no key
    for w in (0.0, 1.0):
        assert (cache_path(tmp_path, "ab" * 32, SamplerSettings("ddim", 5, w, guidance_interval=(0.28, 4)), 0, 10)
                == cache_path(tmp_path, "ab" * 32, SamplerSettings("ddim", 5, w), 0, 10))


def test_the_spacing_keys_logsnr_entries_only():
    """Time-spaced entries keep the names they had before the spacing was a setting (pinned: computed by the code
    of 2026-12-02), so a synthetic set sampled for hours is not sampled again; logSNR ones are entries of their own."""
    from dataclasses import replace

    from diffusion.spec import DEFAULT_SETTINGS

    old_default = SamplerSettings("dpmpp_sde", 20, 6.0, 0.0, (0.28, 4.0))  # the default until 2026-12-04
    timed = cache_path(Path("/c"), "ab" * 32, old_default, 0, 10, True)
    assert timed.name == "abababababab-dpmpp_sde-s20-g6-i0.28,4-seed0-bf16-5048112f4e"
    assert cache_path(Path("/c"), "ab" * 32, SamplerSettings("ddim", 50, 1.0), 3, 10).name == \
        "abababababab-ddim-s50-g1-seed3-51247b974d"
    logsnr = cache_path(Path("/c"), "ab" * 32, replace(old_default, spacing="logsnr"), 0, 10, True)
    assert logsnr != timed and logsnr.name.startswith("abababababab-dpmpp_sde-s20-g6-i0.28,4-logsnr-seed0-bf16-")
    # the default now: its own entries, named for its guidance and spacing
    default = cache_path(Path("/c"), "ab" * 32, DEFAULT_SETTINGS, 0, 10, True)
    assert default.name.startswith("abababababab-dpmpp_sde-s20-g8-i0.28,4-logsnr-seed0-bf16-")
