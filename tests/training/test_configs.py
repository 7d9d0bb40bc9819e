"""training.configs: named configs, JSON config files, overrides."""
from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from diffusion.schedules import ScheduleConfig
from diffusion.unet import UNET_CONFIGS, UNet, UNetConfig, count_parameters
from training.configs import CONFIGS, TrainConfig, resolve_config


def test_named_config():
    assert resolve_config("tiny") is CONFIGS["tiny"]
    assert resolve_config("cifar10-cpu").unet == UNET_CONFIGS["cpu-small"]
    assert resolve_config("cifar10-ddpm").unet == UNET_CONFIGS["ddpm-cifar10"]


def test_json_file_config(tmp_path):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"unet": "cpu-tiny", "batch_size": 32, "lr": 1e-4, "bf16": False,
                             "schedule": {"name": "cosine", "timesteps": 500}}))
    cfg = resolve_config(str(p))
    assert isinstance(cfg, TrainConfig)
    assert cfg.unet == UNET_CONFIGS["cpu-tiny"]
    assert cfg.schedule == ScheduleConfig("cosine", 500)
    assert (cfg.batch_size, cfg.lr, cfg.bf16) == (32, 1e-4, False)
    assert cfg.max_steps == TrainConfig().max_steps  # unspecified fields keep their defaults


def test_json_file_with_unet_dict(tmp_path):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"unet": {"base_channels": 16, "channel_mult": [1, 2], "num_classes": 3}}))
    cfg = resolve_config(str(p))
    assert cfg.unet == UNetConfig(base_channels=16, channel_mult=(1, 2), num_classes=3)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_named_config_round_trips_through_json(name, tmp_path):
    cfg = CONFIGS[name]
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg.to_dict()))
    assert resolve_config(str(p)) == cfg


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="unknown config 'nope'") as e:
        resolve_config("nope")
    for name in CONFIGS:
        assert name in str(e.value)


def test_bad_json_configs(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"batch_size": 8, "learning_rate": 1}))
    with pytest.raises(ValueError, match="unknown training config keys: \\['learning_rate'\\]"):
        resolve_config(str(p))
    p.write_text(json.dumps({"unet": "no-such-unet"}))
    with pytest.raises(ValueError, match="unknown UNet config 'no-such-unet'.*cpu-small"):
        resolve_config(str(p))
    p.write_text(json.dumps({"unet": {"widths": 3}}))
    with pytest.raises(ValueError, match="unknown UNet config keys"):
        resolve_config(str(p))
    p.write_text('{"batch_size": 8,\n "lr": }')  # a JSONDecodeError is a ValueError too: the message matters
    with pytest.raises(ValueError, match=r"config file .*c\.json: not valid JSON: Expecting value at line 2 column 8"):
        resolve_config(str(p))
    p.write_text("[1, 2]")
    with pytest.raises(ValueError, match="c.json: expected a JSON object of training config fields, got list"):
        resolve_config(str(p))


def test_a_config_is_checked_before_training_starts(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"checkpoint_dtype": "fp16"}))  # used to fail at the first checkpoint, steps in
    with pytest.raises(ValueError, match="checkpoint_dtype must be one of float32, float16, bfloat16, got 'fp16'"):
        resolve_config(str(p))
    p.write_text(json.dumps({"schedule": "cosine"}))  # a name, as "unet" may be
    assert resolve_config(str(p)).schedule == ScheduleConfig("cosine", 1000)
    for bad, words in (({"schedule": "sigmoid"}, "unknown beta schedule 'sigmoid'"),
                       ({"schedule": {"name": "linear", "steps": 10}}, "bad schedule"),
                       ({"schedule": 3}, "expected a name"),
                       ({"schedule": {"name": "linear", "timesteps": 0}}, "at least 1 timestep")):
        p.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=words):
            resolve_config(str(p))


@pytest.mark.parametrize("field, value, allowed", [
    ("log_every", 0, "an integer >= 1"),  # used to be a ZeroDivisionError at the first step, after decoding
    ("p_uncond", 1.5, "a number in [0, 1]"),
    ("p_uncond", -0.1, "a number in [0, 1]"),
    ("ema_decay", 1.0, "a number in [0, 1)"),
    ("ema_decay", -0.5, "a number in [0, 1)"),
    ("lr", 0, "a number > 0"),
    ("lr", "x", "a number > 0"),
    ("lr", float("nan"), "a number > 0"),
    ("weight_decay", -1e-4, "a number >= 0"),
    ("batch_size", 0, "an integer >= 1"),
    ("batch_size", 8.5, "an integer >= 1"),
    ("batch_size", True, "an integer >= 1"),
    ("max_steps", 0, "an integer >= 1"),
    ("warmup_steps", -1, "an integer >= 0"),
    ("grad_clip", 0, "a number > 0"),
    ("sample_every", -1, "an integer >= 0"),
    ("checkpoint_every", -5, "an integer >= 0"),
    ("sample_steps", 0, "an integer >= 1"),
    ("num_threads", 0, "an integer >= 1"),
    ("max_minutes", 0, "a number > 0"),
    ("max_minutes", "10", "a number > 0"),
    ("seed", 1.5, "an integer"),
    ("bf16", "false", "true or false"),
])
def test_a_bad_value_in_a_config_file_names_the_field_and_the_allowed_range(tmp_path, field, value, allowed):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"unet": "cpu-tiny", field: value}))
    with pytest.raises(ValueError, match=re.escape(f"{field} must be {allowed}") + ".*" + re.escape(f"got {value!r}")):
        resolve_config(str(p))


def test_the_sample_grids_steps_are_checked_against_their_sampler_and_schedule():
    """They used to be checked only at the first sample grid, a thousand steps into training."""
    with pytest.raises(ValueError, match=r"sample_steps: steps=200 out of range for dpmpp: 1\.\.100"):
        replace(CONFIGS["cifar10-cpu"], sample_steps=200)
    with pytest.raises(ValueError, match=r"sample_steps: steps=20 out of range for dpmpp: 1\.\.10"):
        replace(CONFIGS["cifar10-cpu"], schedule=ScheduleConfig("linear", 10))
    assert replace(CONFIGS["cifar10-cpu"], sample_steps=200, sample_every=0).sample_steps == 200  # no grids


def test_bad_overrides_are_refused_and_edge_values_accepted():
    for field, value in (("num_threads", 0), ("max_minutes", -1.0), ("batch_size", 0), ("lr", -1.0)):
        with pytest.raises(ValueError, match=f"{field} must be"):  # --threads 0 used to be ignored silently
            resolve_config("tiny", **{field: value})
    edges = dict(p_uncond=1.0, ema_decay=0.0, warmup_steps=0, weight_decay=0.0, sample_every=0, checkpoint_every=0,
                 num_threads=None, max_minutes=None, lr=1)  # an integer where a number is asked for is a number
    assert replace(CONFIGS["tiny"], **edges).lr == 1
    assert replace(CONFIGS["tiny"], p_uncond=0).p_uncond == 0


def test_overrides(tmp_path):
    cfg = resolve_config("tiny", max_steps=7, batch_size=4, bf16=False, max_minutes=None, compile=None)
    assert (cfg.max_steps, cfg.batch_size, cfg.bf16) == (7, 4, False)
    assert cfg.max_minutes is None and cfg.compile is False  # None means "not given"
    assert cfg == replace(CONFIGS["tiny"], max_steps=7, batch_size=4, bf16=False)
    assert resolve_config("tiny", max_steps=None) is CONFIGS["tiny"]
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"unet": "cpu-tiny"}))
    assert resolve_config(str(p), num_threads=2).num_threads == 2
    with pytest.raises(TypeError):
        resolve_config("tiny", not_a_field=1)


def test_cpu_configs_fit_the_size_budget():
    # The shipped CPU default must stay <= 8M parameters (at most 32 MB of fp32 weights).
    for name in ("cifar10-cpu", "cifar10-cpu-tiny"):
        cfg = CONFIGS[name]
        assert count_parameters(UNet(cfg.unet)) <= 8_000_000, name
        assert cfg.unet.num_classes == 10 and cfg.unet.image_size == 32


def test_tiny_config_is_tiny():
    cfg = CONFIGS["tiny"]
    assert count_parameters(UNet(cfg.unet)) < 200_000
    assert cfg.unet.dropout == 0.0 and cfg.max_steps <= 10 and cfg.sample_every == 0
