"""training.train: EMA, LR warm-up, the loss, end-to-end runs, exact resume, learning, the CLIs."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusion.checkpoint import load_checkpoint
from diffusion.schedules import NoiseSchedule, ScheduleConfig
from diffusion.unet import UNet
from tests.fixtures import CIFAR10_CLASSES
from training.configs import CONFIGS
from training.data import load_dataset, to_model_range
from training import train as train_module
from training.train import (TrainingDiverged, TrainingInterrupted, diffusion_loss, ema_decay_at, ema_update, lr_at,
                            train, training_autocast)

TINY = CONFIGS["tiny"]
FAST = replace(TINY, bf16=False)  # fp32 is several times faster than bf16 autocast on CPU


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _state(out):
    return torch.load(out / "state.pt", weights_only=True)


def _count_writes(monkeypatch):
    """A list that gets one entry per state.pt or checkpoint written by train()."""
    writes = []
    real_state, real_ckpt = train_module._save_state, train_module.save_checkpoint
    monkeypatch.setattr(train_module, "_save_state", lambda *a, **k: writes.append("state") or real_state(*a, **k))
    monkeypatch.setattr(train_module, "save_checkpoint",
                        lambda *a, **k: writes.append("checkpoint") or real_ckpt(*a, **k))
    return writes


# --------------------------------------------------------------------------- pieces


def test_ema_update_moves_every_parameter_toward_the_model_and_copies_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model[1].running_mean.fill_(2.0)
    before = [e.detach().clone() for e in ema.parameters()]
    ema_update(ema, model, 0.9)
    for b, e, p in zip(before, ema.parameters(), model.parameters()):
        torch.testing.assert_close(e, b + 0.1 * (p - b))
    assert (ema[1].running_mean == 2.0).all()


def test_ema_decay_warm_up():
    assert ema_decay_at(0, 0.9999) == pytest.approx(0.1)
    ds = [ema_decay_at(s, 0.9999) for s in (0, 1, 10, 100, 1000, 10_000, 100_000)]
    assert ds == sorted(ds) and len(set(ds)) == len(ds)  # strictly increasing during warm-up
    assert ema_decay_at(10**7, 0.9999) == 0.9999  # capped at the configured maximum
    assert ema_decay_at(10**7, 0.999) == 0.999
    assert 0.99 < ema_decay_at(1000, 0.9999) < 0.9999


def test_ema_update_moves_toward_the_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    ema = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).requires_grad_(False)
    model[1].running_mean.fill_(3.0)
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, model, 0.75)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.75 * b + 0.25 * p)
        assert (e - p).abs().sum() < (b - p).abs().sum() or torch.equal(b, p)
    assert torch.equal(ema[1].running_mean, model[1].running_mean)  # buffers are copied
    ema_update(ema, model, 0.0)  # decay 0: a copy
    for e, p in zip(ema.parameters(), model.parameters()):
        assert torch.equal(e, p)


def test_lr_warm_up():
    cfg = replace(TINY, lr=1e-3, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == lr_at(10_000, cfg) == pytest.approx(1e-3)
    assert lr_at(0, replace(cfg, warmup_steps=0)) == pytest.approx(1e-3)


def test_diffusion_loss_drops_labels_to_the_null_class():
    seen = []

    def model(x, t, y):
        seen.append(y.clone())
        return torch.zeros_like(x)

    sched = NoiseSchedule(ScheduleConfig("linear", 1000))
    x0 = torch.zeros(64, 3, 4, 4)
    y = torch.full((64,), 2)
    g = torch.Generator().manual_seed(0)
    loss = diffusion_loss(model, sched, x0, y, 0.0, 10, g)
    assert seen[-1].tolist() == [2] * 64
    assert loss.shape == () and 0.8 < loss.item() < 1.2  # predicting 0 for N(0, 1) noise
    diffusion_loss(model, sched, x0, y, 1.0, 10, g)
    assert seen[-1].tolist() == [10] * 64
    n = 10_000
    diffusion_loss(model, sched, torch.zeros(n, 3, 4, 4), torch.full((n,), 2), 0.3, 10, g)
    dropped = (seen[-1] == 10).float().mean().item()  # 0.3 within 3 standard errors (0.0046 each)
    assert abs(dropped - 0.3) < 0.014 and set(seen[-1].tolist()) == {2, 10}
    # Same generator state, same loss.
    a = diffusion_loss(model, sched, x0 + 1, y, 0.1, 10, torch.Generator().manual_seed(3))
    b = diffusion_loss(model, sched, x0 + 1, y, 0.1, 10, torch.Generator().manual_seed(3))
    assert a.item() == b.item()


# --------------------------------------------------------------------------- end to end


def test_train_end_to_end_with_the_tiny_config(data10, tmp_path):
    out = tmp_path / "run"
    ckpt_dir = train(TINY, str(data10), out, progress=False)
    assert ckpt_dir == out / "checkpoint"
    for f in ("state.pt", "checkpoint/config.json", "checkpoint/model.safetensors", "metrics.jsonl", "loss.png"):
        assert (out / f).is_file(), f
    assert not list(out.rglob("*.tmp"))
    with Image.open(out / "loss.png") as im:
        assert im.format == "PNG"

    recs = _metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]  # log_every=1
    for r in recs:
        assert r["loss"] > 0 and r["images_per_s"] > 0 and r["images_seen"] == 8 * r["step"]
        assert {"grad_norm", "lr", "wall_time_s"} <= set(r)

    ck = load_checkpoint(ckpt_dir)
    assert isinstance(ck.model, UNet) and ck.model.config == TINY.unet
    assert ck.class_names == CIFAR10_CLASSES
    assert ck.schedule.config == TINY.schedule
    prov = ck.provenance
    assert prov["steps"] == 4 and prov["images_seen"] == 32
    assert prov["wall_time_s"] >= 0 and prov["dataset"] == str(data10)
    assert prov["world_size"] == 1 and prov["num_images"] == 20 and prov["device"] == "cpu"
    assert prov["config"] == json.loads(json.dumps(TINY.to_dict()))
    assert prov["parameters"] == sum(p.numel() for p in ck.model.parameters())
    assert prov["precision"] == ("bf16" if training_autocast(TINY, torch.device("cpu")) else "fp32")

    st = _state(out)
    assert st["step"] == 4 and st["images_seen"] == 32
    # The checkpoint holds the EMA weights, which differ from the raw weights after training.
    ema_w = load_file(str(ckpt_dir / "model.safetensors"))
    assert all(torch.equal(ema_w[k], v.float()) for k, v in st["ema"].items())
    assert any(not torch.equal(st["ema"][k], v) for k, v in st["model"].items())
    with torch.no_grad():  # the loaded model runs
        x = ck.model(torch.zeros(2, 3, 32, 32), torch.tensor([0, 999]), torch.tensor([0, 10]))
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()


@pytest.mark.parametrize("has_bf16, expected", [(True, True), (None, True), (False, False)])
def test_bf16_training_falls_back_to_fp32_on_a_cpu_without_bf16_instructions(monkeypatch, caplog, has_bf16, expected):
    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: has_bf16)
    with caplog.at_level("WARNING", logger="training.train"):
        assert training_autocast(TINY, torch.device("cpu")) is expected
    assert ("training in fp32" in caplog.text) is (not expected)
    assert training_autocast(FAST, torch.device("cpu")) is False  # fp32 asked for: fp32, whatever the CPU
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100 or H200
    assert training_autocast(TINY, torch.device("cuda")) is True  # the CPU's instructions do not matter there


def test_bf16_training_falls_back_to_fp32_on_a_gpu_without_native_bf16(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # a V100: emulated bf16
    with caplog.at_level("WARNING", logger="training.train"):
        assert training_autocast(TINY, torch.device("cuda")) is False
    assert "no native bf16 (compute capability 7.0" in caplog.text
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    assert training_autocast(TINY, torch.device("cuda")) is True


@pytest.mark.parametrize("has_bf16, precision", [(True, "bf16"), (False, "fp32")])
def test_the_checkpoint_records_the_precision_it_trained_in(monkeypatch, data10, tmp_path, has_bf16, precision):
    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: has_bf16)
    cfg = replace(TINY, max_steps=1)
    assert load_checkpoint(train(cfg, str(data10), tmp_path / "a", progress=False)).provenance["precision"] == precision
    assert load_checkpoint(train(replace(cfg, bf16=False), str(data10), tmp_path / "b",
                                 progress=False)).provenance["precision"] == "fp32"


def test_the_training_state_keeps_the_gpus_random_stream(monkeypatch, tmp_path):
    """Dropout and noise drawn on a GPU use its own generator: state.pt keeps it for an exact resume there
    (checked here with a stand-in for torch.cuda; the GPU visit does not resume)."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    cuda_state = torch.arange(16, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: cuda_state)
    args = (model, model, opt, 3, 24, 1.0, TINY, torch.Generator())
    train_module._save_state(tmp_path / "gpu.pt", *args, device=torch.device("cuda", 0))
    assert torch.equal(torch.load(tmp_path / "gpu.pt", weights_only=True)["rng_cuda"], cuda_state)
    train_module._save_state(tmp_path / "cpu.pt", *args, device=torch.device("cpu"))
    assert "rng_cuda" not in torch.load(tmp_path / "cpu.pt", weights_only=True)


def test_mismatched_class_count_is_a_clear_error(image_folder3, tmp_path):
    with pytest.raises(ValueError, match="data set has 3 classes but the model expects 10"):
        train(FAST, str(image_folder3), tmp_path / "run", progress=False)
    # The same data with a matching model trains.
    cfg = replace(FAST, max_steps=1, unet=replace(FAST.unet, num_classes=3))
    ck = load_checkpoint(train(cfg, str(image_folder3), tmp_path / "run3", progress=False))
    assert ck.class_names == ("apple", "mango", "zebra")


def test_sample_grid_during_training(tmp_path):
    from tests.fixtures import make_images, write_image_folder
    data = write_image_folder(tmp_path / "d2", make_images(("a", "b"), 4))
    cfg = replace(FAST, max_steps=2, sample_every=2, unet=replace(FAST.unet, num_classes=2))
    train(cfg, str(data), tmp_path / "run", progress=False)
    with Image.open(tmp_path / "run" / "samples" / "step_0000002.png") as im:
        # 2 classes x 10 samples per row (100 // 2 capped at 10), 32 px + 2 px padding
        assert im.size == (10 * 34 + 2, 2 * 34 + 2)


@pytest.mark.parametrize("batch_size", [4, 8])
def test_resume_matches_an_uninterrupted_run(data10, tmp_path, batch_size, caplog):
    # Dropout on, so the global RNG matters too; batch 4 stops mid-epoch (20 images: 8 of 20 used),
    # batch 8 crosses an epoch boundary on the first step after resuming.
    cfg = replace(FAST, batch_size=batch_size, unet=replace(FAST.unet, dropout=0.1))
    full, part = tmp_path / "full", tmp_path / "part"
    train(replace(cfg, max_steps=4), str(data10), full, progress=False)
    train(replace(cfg, max_steps=2), str(data10), part, progress=False)
    assert _state(part)["step"] == 2
    caplog.set_level("INFO", logger="training.train")
    train(replace(cfg, max_steps=4), str(data10), part, resume=True, progress=False)
    assert "at step 4, 2 of them trained in this run" in caplog.text

    a, b = _state(full), _state(part)
    assert b["step"] == 4 and b["images_seen"] == a["images_seen"] == 4 * batch_size
    for key in ("model", "ema"):
        for k in a[key]:
            torch.testing.assert_close(b[key][k], a[key][k], rtol=0, atol=1e-6, msg=f"{key}.{k}")
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=0, atol=1e-9)
    assert torch.equal(a["rng_data"], b["rng_data"]) and torch.equal(a["rng_torch"], b["rng_torch"])
    assert torch.equal(a["perm"], b["perm"]) and a["pos"] == b["pos"]
    wa = load_file(str(full / "checkpoint" / "model.safetensors"))
    wb = load_file(str(part / "checkpoint" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
    # The logged losses of the resumed steps are those of the uninterrupted run.
    la, lb = _metrics(full), _metrics(part)
    assert [r["step"] for r in lb] == [1, 2, 3, 4]  # appended to by both runs
    la = {r["step"]: r["loss"] for r in la}
    lb = {r["step"]: r["loss"] for r in lb}
    for s in (3, 4):
        assert lb[s] == pytest.approx(la[s], abs=1e-6)
    assert load_checkpoint(part / "checkpoint").provenance["steps"] == 4


def test_a_trained_folder_is_not_trained_over_without_resume(data10, tmp_path):
    """Forgetting --resume must not overwrite a run's state and checkpoint (nor empty its metrics); resuming
    with another model's config is refused before any weights are loaded."""
    out = tmp_path / "run"
    train(replace(FAST, max_steps=1), str(data10), out, progress=False)
    before = (out / "state.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="pass --resume"):
        train(replace(FAST, max_steps=2), str(data10), out, progress=False)
    wider = replace(FAST, max_steps=2, unet=replace(FAST.unet, base_channels=2 * FAST.unet.base_channels))
    with pytest.raises(ValueError, match="another model"):
        train(wider, str(data10), out, resume=True, progress=False)
    # the model predicts the noise of the schedule it was trained with: another one is refused too
    for schedule in (ScheduleConfig("cosine", FAST.schedule.timesteps), ScheduleConfig(FAST.schedule.name, 500)):
        with pytest.raises(ValueError, match="trained with another noise schedule"):
            train(replace(FAST, max_steps=2, schedule=schedule), str(data10), out, resume=True, progress=False)
    assert ((out / "state.pt").read_bytes(), (out / "metrics.jsonl").read_text()) == before


def test_resume_refuses_a_data_set_of_other_classes(data10, tmp_path):
    """The same number of classes under other names: the labels the model learnt would mean other classes."""
    from tests.fixtures import make_images, write_image_folder

    other = write_image_folder(tmp_path / "other", make_images(tuple(f"class{i}" for i in range(10)), 2))
    out = tmp_path / "run"
    train(replace(FAST, max_steps=1), str(data10), out, progress=False)
    before = (out / "state.pt").read_bytes()
    with pytest.raises(ValueError, match="trained on the classes airplane, .*, truck, but .*other has class0"):
        train(replace(FAST, max_steps=2), str(other), out, resume=True, progress=False)
    assert (out / "state.pt").read_bytes() == before


def test_resume_uses_the_configs_weight_decay(data10, tmp_path):
    """The optimizer state saved in state.pt carries the old run's weight decay; the config's is used on resume."""
    import shutil

    cfg = replace(FAST, max_steps=1, warmup_steps=1)
    train(cfg, str(data10), tmp_path / "a", progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    p1 = _state(tmp_path / "a")["model"]
    train(replace(cfg, max_steps=2), str(data10), tmp_path / "a", resume=True, progress=False)
    train(replace(cfg, max_steps=2, weight_decay=0.5), str(data10), tmp_path / "b", resume=True, progress=False)
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert b["opt"]["param_groups"][0]["weight_decay"] == 0.5
    # AdamW's decoupled decay: the same step, less lr * weight_decay * the weights before it
    for k, v in p1.items():
        if v.is_floating_point():
            torch.testing.assert_close(b["model"][k], a["model"][k] - cfg.lr * 0.5 * v, rtol=0, atol=1e-6, msg=k)


def test_a_batch_that_does_not_split_evenly_over_the_processes_is_refused(data10, tmp_path, monkeypatch):
    """Batch 7 on 2 processes used to train 3 + 3 images a step while the provenance said 7."""
    class TwoProcesses(train_module._Dist):
        def __init__(self):  # rank 0 of 2, without a process group (refused before one would be used)
            self.world, self.rank, self.local_rank, self.owns_group = 2, 0, 0, False

    monkeypatch.setattr(train_module, "_Dist", TwoProcesses)
    with pytest.raises(ValueError, match="batch_size 7 is not a multiple of the 2 processes"):
        train(replace(FAST, batch_size=7), str(data10), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_batch_larger_than_the_data_set_is_refused(data10, tmp_path):
    """It used to train on the whole set each step while the provenance counted the batch it asked for."""
    with pytest.raises(ValueError, match=r"batch_size 32 \(32 per process\) is larger than the data set \(20 images\)"):
        train(replace(FAST, batch_size=32), str(data10), tmp_path / "run", progress=False)
    assert train(replace(FAST, batch_size=20, max_steps=1), str(data10), tmp_path / "ok", progress=False).exists()


@pytest.mark.parametrize("log_every", [1, 100])
def test_a_diverged_run_stops_and_keeps_its_last_good_state(data10, tmp_path, monkeypatch, log_every):
    """A NaN gradient norm at step 3 (NaN weights from there): the run stops at the next log step or checkpoint,
    whichever comes first, without writing, so state.pt and the checkpoint stay those of step 2."""
    out, norms = tmp_path / "run", []
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm):
        norm = real_clip(params, max_norm)
        norms.append(norm)
        return torch.full_like(norm, float("nan")) if len(norms) == 3 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    with pytest.raises(TrainingDiverged, match="not finite .* at a step up to (3|4).*hold the last state saved"):
        train(replace(FAST, max_steps=6, checkpoint_every=2, log_every=log_every), str(data10), out, progress=False)
    assert len(norms) == (3 if log_every == 1 else 4)
    assert _state(out)["step"] == 2
    assert load_checkpoint(out / "checkpoint").provenance["steps"] == 2


def test_resume_without_state_starts_fresh(data10, tmp_path, caplog, monkeypatch):
    out = tmp_path / "run"
    train(replace(FAST, max_steps=1), str(data10), out, resume=True, progress=False)
    assert "does not exist; starting fresh" in caplog.text
    assert _state(out)["step"] == 1
    # Resuming a finished run trains no further, and does not write its state and checkpoint again.
    writes = _count_writes(monkeypatch)
    train(replace(FAST, max_steps=1), str(data10), out, resume=True, progress=False)
    assert _state(out)["step"] == 1 and writes == []


@pytest.mark.parametrize("damage", ["empty", "cut short", "not a state"])
def test_a_damaged_state_is_a_clear_error_naming_it(data10, tmp_path, damage):
    """state.pt cut short by a power loss, or another file under its name: a ValueError that names it and says
    what to do (dreamdata train: one line, status 2), not a traceback from inside torch.load."""
    out = tmp_path / "run"
    train(replace(FAST, max_steps=1), str(data10), out, progress=False)
    state = out / "state.pt"
    whole = state.read_bytes()
    if damage == "not a state":
        torch.save({"weights": torch.zeros(2)}, state)
    else:
        state.write_bytes(b"" if damage == "empty" else whole[: len(whole) // 2])
    words = "is not a dreamdata training state" if damage == "not a state" else "cannot be read as a training state"
    with pytest.raises(ValueError, match=f"{state}.*{words}.*move it away"):
        train(replace(FAST, max_steps=2), str(data10), out, resume=True, progress=False)


def test_the_state_and_checkpoint_reach_the_disk_before_their_rename(data10, tmp_path, monkeypatch):
    """A power loss after the rename must not leave an empty file under the name (no copy of the old one)."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, Path.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def renaming(self, target):
        events.append(("replace", Path(target).name))
        return real_replace(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "replace", renaming)
    train(replace(FAST, max_steps=1), str(data10), tmp_path / "run", progress=False)
    for name in ("state.pt", "model.safetensors", "config.json"):
        i = events.index(("replace", name))
        assert events[i - 1][0] == "fsync" and events[i - 1][1].endswith(".tmp"), events
        assert events[i + 1][0] == "fsync" and events[i + 1][1] in ("run", "checkpoint"), events


def test_a_resumed_run_logs_each_step_once_and_says_what_config_changed(data10, tmp_path, caplog, monkeypatch):
    out = tmp_path / "run"
    train(replace(FAST, max_steps=2), str(data10), out, progress=False)
    with open(out / "metrics.jsonl", "a") as f:  # killed after logging steps 3 and 4, before their checkpoint
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + json.dumps({"step": 4, "loss": 9.0}) + "\n{\"step\": 5, \"lo")
    train(replace(FAST, max_steps=4, lr=1e-3), str(data10), out, resume=True, progress=False)
    recs = _metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and 9.0 not in [r["loss"] for r in recs]
    assert "differs from the saved run's in: lr, max_steps" in caplog.text
    # a fresh run into the same folder (its state removed: otherwise it is refused) starts a fresh log; each
    # checkpoint is written once
    (out / "state.pt").unlink()
    import training.train as tt
    writes = []
    real_save = tt.save_checkpoint
    monkeypatch.setattr(tt, "save_checkpoint", lambda *a, **k: writes.append(1) or real_save(*a, **k))
    train(replace(FAST, max_steps=1, checkpoint_every=1), str(data10), out, progress=False)
    assert [r["step"] for r in _metrics(out)] == [1] and len(writes) == 1


def test_resume_from_a_state_without_perm(data10, tmp_path):
    # state.pt files written before perm/pos, class names and the data's fingerprint were saved still resume
    # (on a set of other class names too: there is nothing to compare them with).
    from tests.fixtures import make_images, write_image_folder

    other = write_image_folder(tmp_path / "other", make_images(tuple(f"class{i}" for i in range(10)), 2))
    out = tmp_path / "run"
    train(replace(FAST, max_steps=1), str(data10), out, progress=False)
    st = _state(out)
    assert st["class_names"] == list(CIFAR10_CLASSES) and st["data_fingerprint"] == load_dataset(data10).fingerprint()
    del st["perm"], st["pos"], st["class_names"], st["data_fingerprint"]
    torch.save(st, out / "state.pt")
    train(replace(FAST, max_steps=2), str(other), out, resume=True, progress=False)
    assert _state(out)["step"] == 2


def test_resume_on_a_data_set_of_another_size_draws_a_new_order(data10, tmp_path, caplog):
    """The saved epoch order indexes the old data set: on a smaller one it points past its end. The same classes
    with other images are allowed, with a warning."""
    from tests.fixtures import make_images, write_image_folder

    bigger = write_image_folder(tmp_path / "data-big", make_images(CIFAR10_CLASSES, 3))
    out = tmp_path / "run"
    train(replace(FAST, max_steps=1), str(bigger), out, progress=False)
    st = _state(out)
    assert len(st["perm"]) == 30 and st["pos"] == 8
    assert st["perm"][8:16].max() >= 20  # the next batch of the saved order is not all inside the 20 images
    assert "data set of other contents" not in caplog.text
    train(replace(FAST, max_steps=2), str(data10), out, resume=True, progress=False)
    st = _state(out)
    assert st["step"] == 2 and sorted(st["perm"].tolist()) == list(range(20))
    assert "was trained on a data set of other contents" in caplog.text


def test_max_minutes_stops_and_is_resumable(data10, tmp_path, caplog, monkeypatch):
    out = tmp_path / "run"
    train(replace(FAST, max_steps=100, max_minutes=1e-6), str(data10), out, progress=False)
    st = _state(out)
    assert st["step"] == 1 and st["wall_time_s"] > 0
    assert [r["step"] for r in _metrics(out)][-1] == 1
    # Resumed with its budget spent: no step, and nothing written again.
    writes = _count_writes(monkeypatch)
    caplog.set_level("INFO", logger="training.train")
    train(replace(FAST, max_steps=100, max_minutes=1e-6), str(data10), out, resume=True, progress=False)
    assert _state(out)["step"] == 1 and writes == [] and [r["step"] for r in _metrics(out)] == [1]
    assert "the time budget is spent" in caplog.text
    shutil.rmtree(out / "checkpoint")  # ... unless the checkpoint is gone: then it is written from the state
    train(replace(FAST, max_steps=100, max_minutes=1e-6), str(data10), out, resume=True, progress=False)
    assert json.loads((out / "checkpoint" / "config.json").read_text())["provenance"]["steps"] == 1
    train(replace(FAST, max_steps=2), str(data10), out, resume=True, progress=False)
    st2 = _state(out)
    assert st2["step"] == 2 and st2["wall_time_s"] > st["wall_time_s"]  # wall time accumulates across runs


def test_sigterm_finishes_the_step_saves_a_resumable_state_and_says_it_stopped(data10, tmp_path, monkeypatch):
    import os
    import signal

    import training.train as tt

    real_update, calls = tt.ema_update, []

    def update_then_signal(ema, model, decay):  # the third step gets a SIGTERM in the middle
        real_update(ema, model, decay)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tt, "ema_update", update_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    # not a normal return: a caller (dreamdata train: exit status 130) can tell it from a finished run
    with pytest.raises(TrainingInterrupted, match="stopped by a signal at step 3"):
        train(replace(FAST, max_steps=1000), str(data10), out, progress=False)
    assert isinstance(TrainingInterrupted(), KeyboardInterrupt)
    assert _state(out)["step"] == 3
    assert (out / "checkpoint" / "model.safetensors").is_file()
    assert json.loads((out / "checkpoint" / "config.json").read_text())["provenance"]["steps"] == 3
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is removed again
    # --resume goes on from there, and a run that reaches max_steps returns normally
    assert train(replace(FAST, max_steps=4), str(data10), out, resume=True, progress=False) == out / "checkpoint"
    assert _state(out)["step"] == 4 and len(calls) == 4
    # a signal during the step that reaches max_steps: the run is finished, a normal return (nothing to resume)
    calls.clear()
    out2 = tmp_path / "run2"
    assert train(replace(FAST, max_steps=3), str(data10), out2, progress=False) == out2 / "checkpoint"
    assert _state(out2)["step"] == 3


class _Aborted(Exception):
    pass


def test_a_signal_during_the_final_save_lets_it_finish_and_a_stop_samples_no_grid(data10, tmp_path, monkeypatch):
    """With checkpoint_every 0 the state is first written after the last step: a SIGTERM then (docker stop)
    must not cut the only save short.  And a step that a stop ends does not sample its grid (tens of seconds on
    a CPU, past docker stop's grace period): nothing is lost, the state is saved."""
    import os
    import signal

    import training.train as tt

    real_save = tt.save_checkpoint

    def signal_then_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(*args, **kwargs)

    def abort(signum, frame):  # what a signal does outside the guard (SIG_DFL would end the test run)
        raise _Aborted

    monkeypatch.setattr(tt, "save_checkpoint", signal_then_save)
    before = signal.signal(signal.SIGTERM, abort)
    try:
        out = tmp_path / "run"
        assert train(replace(FAST, max_steps=3, checkpoint_every=0), str(data10), out,
                     progress=False) == out / "checkpoint"
        assert _state(out)["step"] == 3 and (out / "checkpoint" / "model.safetensors").is_file()
        assert not list(out.rglob("*.tmp"))
        assert signal.getsignal(signal.SIGTERM) is abort

        monkeypatch.setattr(tt, "save_checkpoint", real_save)
        real_update, calls = tt.ema_update, []

        def update_then_signal(ema, model, decay):  # the second step, a grid step, gets a SIGTERM
            real_update(ema, model, decay)
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        monkeypatch.setattr(tt, "ema_update", update_then_signal)
        out2 = tmp_path / "run2"
        with pytest.raises(TrainingInterrupted, match="at step 2"):
            train(replace(FAST, max_steps=10, checkpoint_every=0, sample_every=1), str(data10), out2,
                  progress=False)
        assert sorted(p.name for p in (out2 / "samples").iterdir()) == ["step_0000001.png"]
        assert _state(out2)["step"] == 2

        # the time budget's stop is a normal finish: its last step's grid is sampled
        monkeypatch.setattr(tt, "ema_update", real_update)
        out3 = tmp_path / "run3"
        train(replace(FAST, max_steps=10, max_minutes=1e-9, checkpoint_every=0, sample_every=1), str(data10), out3,
              progress=False)
        assert _state(out3)["step"] == 1 and (out3 / "samples" / "step_0000001.png").is_file()
    finally:
        signal.signal(signal.SIGTERM, before)


def _fixed_noise_loss(model, x0, y, schedule):
    """The diffusion loss at fixed (t, noise) draws for every image, several per image."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        return sum(diffusion_loss(model.eval(), schedule, x0, y, 0.0, 10, g).item() for _ in range(4)) / 4


def test_training_lowers_the_loss(data10, tmp_path):
    cfg = replace(FAST, max_steps=30, lr=1e-3, warmup_steps=5, batch_size=10, checkpoint_every=0, ema_decay=0.5)
    out = tmp_path / "run"
    ck = load_checkpoint(train(cfg, str(data10), out, progress=False))
    losses = [r["loss"] for r in _metrics(out)]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, losses

    # Held out from the training noise: the loss at fixed noise, before (same seed, same init) and after.
    ds = load_dataset(data10)
    x0, y = to_model_range(ds.images), ds.labels
    torch.manual_seed(cfg.seed)
    init = UNet(cfg.unet)
    before = _fixed_noise_loss(init, x0, y, ck.schedule)
    after = _fixed_noise_loss(ck.model, x0, y, ck.schedule)
    assert after < 0.8 * before, (before, after)
