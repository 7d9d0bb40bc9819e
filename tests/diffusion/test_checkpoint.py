"""Checkpoint directories: config.json + model.safetensors, round trip, validation, no pickle."""
import hashlib
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion.checkpoint import (CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, CheckpointError, load_checkpoint,
                                  read_config, save_checkpoint)
from diffusion.schedules import ScheduleConfig

from diffusion_testlib import TINY_UNET, make_tiny_unet

CLASSES = ["cat", "dog", "ship"]
PROVENANCE = {"steps": 1234, "images_seen": 78976, "wall_time_s": 12.5, "dataset": "cifar10-test", "git": "abc"}


def inputs(n=4):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 3, 8, 8, generator=g), torch.tensor([0, 10, 500, 999])[:n],
            torch.tensor([0, 1, 2, 3])[:n])


@pytest.fixture
def model():
    m = make_tiny_unet(seed=3)
    with torch.no_grad():  # make every parameter non-default, so that a missed tensor shows
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return m


def test_round_trip_identical_outputs(tmp_path, model):
    sched = ScheduleConfig("cosine", 500)
    d = save_checkpoint(tmp_path / "ckpt", model, sched, CLASSES, PROVENANCE)
    ck = load_checkpoint(d)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(ck.model(x, t, y), model(x, t, y))
    for k, v in model.state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v), k
    assert ck.model.config == TINY_UNET
    assert not ck.model.training
    assert not any(p.requires_grad for p in ck.model.parameters())
    assert ck.schedule.config == sched and ck.schedule.num_timesteps == 500
    assert ck.class_names == tuple(CLASSES)
    assert ck.provenance == PROVENANCE
    assert ck.path == d
    assert ck.sha256 == hashlib.sha256((d / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert json.loads(json.dumps(ck.config)) == json.loads((d / CONFIG_FILE).read_text())


def test_directory_layout_and_config_json(tmp_path, model):
    d = save_checkpoint(tmp_path / "a" / "b", model, ScheduleConfig(), CLASSES, PROVENANCE)
    assert sorted(p.name for p in d.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no tmp files left behind
    cfg = json.loads((d / CONFIG_FILE).read_text())
    assert cfg["format_version"] == FORMAT_VERSION == 1
    assert cfg["unet"] == json.loads(json.dumps(TINY_UNET.to_dict()))
    assert cfg["schedule"] == {"name": "linear", "timesteps": 1000}
    assert cfg["class_names"] == CLASSES
    assert cfg["provenance"] == PROVENANCE
    assert read_config(d) == cfg
    weights = load_file(str(d / WEIGHTS_FILE))
    assert set(weights) == set(model.state_dict())
    assert all(v.dtype == torch.float32 for v in weights.values())


def test_saving_again_overwrites(tmp_path, model):
    save_checkpoint(tmp_path, make_tiny_unet(seed=9), ScheduleConfig(), CLASSES, {"steps": 1})
    save_checkpoint(tmp_path, model, ScheduleConfig(), CLASSES, {"steps": 2})
    ck = load_checkpoint(tmp_path)
    assert ck.provenance == {"steps": 2}
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(ck.model(x, t, y), model(x, t, y))


def test_provenance_defaults_to_empty(tmp_path, model):
    save_checkpoint(tmp_path, model, ScheduleConfig(), CLASSES)
    assert load_checkpoint(tmp_path).provenance == {}


def test_class_names_must_match_num_classes(tmp_path, model):
    with pytest.raises(ValueError, match="2 class names for a model with 3 classes"):
        save_checkpoint(tmp_path, model, ScheduleConfig(), CLASSES[:2])


def test_channels_last_model_saves(tmp_path, model):
    x, t, y = inputs()
    with torch.no_grad():
        ref = model(x, t, y)
    save_checkpoint(tmp_path, model.to(memory_format=torch.channels_last), ScheduleConfig(), CLASSES)
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path).model(x, t, y), ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- wrappers

class FakeCompiled(torch.nn.Module):
    """Like torch._dynamo's OptimizedModule: the real model is the submodule ``_orig_mod``."""

    def __init__(self, mod):
        super().__init__()
        self._orig_mod = mod

    def forward(self, *a):
        return self._orig_mod(*a)


class FakeDDP(torch.nn.Module):
    """Like DistributedDataParallel: the real model is the submodule ``module``."""

    def __init__(self, mod):
        super().__init__()
        self.module = mod

    def forward(self, *a):
        return self.module(*a)


@pytest.mark.parametrize("wrap", [FakeCompiled, FakeDDP, lambda m: FakeCompiled(FakeDDP(m)),
                                  lambda m: FakeDDP(FakeCompiled(m))],
                         ids=["compile", "ddp", "compile(ddp)", "ddp(compile)"])
def test_wrapped_model_saves_unwrapped_state(tmp_path, model, wrap):
    wrapped = wrap(model)
    assert any(k.startswith(("_orig_mod.", "module.")) for k in wrapped.state_dict())  # the trap is real
    save_checkpoint(tmp_path, wrapped, ScheduleConfig(), CLASSES)
    assert set(load_file(str(tmp_path / WEIGHTS_FILE))) == set(model.state_dict())
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path).model(x, t, y), model(x, t, y))


# -------------------------------------------------------------------------------------- validation

@pytest.fixture
def ckpt(tmp_path, model):
    return save_checkpoint(tmp_path / "ck", model, ScheduleConfig(), CLASSES, PROVENANCE)


def edit_config(d, **changes):
    cfg = json.loads((d / CONFIG_FILE).read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (d / CONFIG_FILE).write_text(json.dumps(cfg))


def test_no_config_json(tmp_path):
    with pytest.raises(CheckpointError, match=f"not a checkpoint directory \\(no {CONFIG_FILE}\\)"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "does-not-exist")


def test_config_json_without_weights(ckpt):
    (ckpt / WEIGHTS_FILE).unlink()
    read_config(ckpt)  # the config alone is fine
    with pytest.raises(CheckpointError, match=f"missing {WEIGHTS_FILE}"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_wrong_format_version(ckpt, version):
    edit_config(ckpt, format_version=version)
    with pytest.raises(CheckpointError, match=r"format_version .* is not supported \(expected 1\)"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("key", ["unet", "schedule", "class_names"])
def test_missing_config_key(ckpt, key):
    edit_config(ckpt, **{key: None})
    with pytest.raises(CheckpointError, match=f"missing key '{key}'"):
        load_checkpoint(ckpt)


def test_invalid_json(ckpt):
    (ckpt / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_checkpoint(ckpt)


def test_a_config_that_is_not_an_object(ckpt):
    (ckpt / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("unet_change, class_names, words", [
    ({"base_channels": 32.0}, None, "invalid model"),   # JSON that a float-writing tool produced
    ({"num_classes": 3.0}, None, "invalid model"),      # 3 names == 3.0 classes, but no such embedding
    ({"dropout": "0.1"}, None, "invalid model"),
    ({}, "abc", "list of strings"),
    ({}, [1, 2, 3], "list of strings"),
])
def test_mistyped_config_values_are_a_checkpoint_error(ckpt, unet_change, class_names, words):
    """Not a TypeError from deep inside torch: the service reports a CheckpointError naming the file."""
    unet = read_config(ckpt)["unet"]
    edit_config(ckpt, unet={**unet, **unet_change}, **({"class_names": class_names} if class_names else {}))
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint(ckpt)


def test_weights_missing_a_tensor(ckpt):
    state = load_file(str(ckpt / WEIGHTS_FILE))
    del state["class_emb.weight"]
    save_file(state, str(ckpt / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match="(?s)do not match.*class_emb.weight"):
        load_checkpoint(ckpt)


def test_weights_of_another_architecture(ckpt):
    unet = read_config(ckpt)["unet"]
    # class_emb has 4 rows in the file, 6 expected
    edit_config(ckpt, unet={**unet, "num_classes": 5}, class_names=["a", "b", "c", "d", "e"])
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(ckpt)


def test_class_names_must_match_the_models_classes(ckpt):
    unet = read_config(ckpt)["unet"]
    edit_config(ckpt, unet={**unet, "num_classes": 5})
    with pytest.raises(CheckpointError, match="3 class names for a model with 5 classes"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("change, words", [
    ({"schedule": {"name": "sigmoid", "timesteps": 1000}}, "unknown beta schedule 'sigmoid'"),
    ({"schedule": {"name": "linear", "steps": 1000}}, "invalid model or schedule config"),
    ({"unet": {"base_chanels": 8}}, "unknown UNet config keys"),
])
def test_a_bad_model_or_schedule_config_is_a_checkpoint_error(ckpt, change, words):
    if "unet" in change:
        change = {"unet": {**read_config(ckpt)["unet"], **change["unet"]}}
    edit_config(ckpt, **change)
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint(ckpt)


def test_the_sha256_is_of_the_bytes_loaded(ckpt, monkeypatch):
    import diffusion.checkpoint as checkpoint_module

    # One read: a training run that replaces the file just after the weights were parsed must not give them
    # the new file's hash.  The stand-in parser rewrites the file as it parses, as such a run would.
    weights = ckpt / WEIGHTS_FILE
    original = weights.read_bytes()
    real_load = checkpoint_module.load_safetensors

    def load_then_replace(blob):
        state = real_load(blob)
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # other bytes, same size
        return state
    monkeypatch.setattr(checkpoint_module, "load_safetensors", load_then_replace)
    loaded = load_checkpoint(ckpt)
    assert loaded.sha256 == hashlib.sha256(original).hexdigest()
    assert loaded.sha256 != hashlib.sha256(weights.read_bytes()).hexdigest()


def test_corrupt_weights_file(ckpt):
    (ckpt / WEIGHTS_FILE).write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(ckpt)


# ---------------------------------------------------------------------------------------- no pickle

def test_loading_never_unpickles(ckpt, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("load_checkpoint must not unpickle anything")

    class ForbiddenUnpickler:
        def __init__(self, *a, **k):
            forbidden()

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", ForbiddenUnpickler)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)
    ck = load_checkpoint(ckpt)
    x, t, y = inputs(2)
    with torch.no_grad():
        assert ck.model(x, t, y).shape == x.shape
    with pytest.raises(AssertionError, match="must not unpickle"):  # the trap itself works
        torch.load(ckpt / WEIGHTS_FILE)
