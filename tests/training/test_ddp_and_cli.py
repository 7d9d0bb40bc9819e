"""Multi-process (DDP, gloo on CPU) training via torch.distributed.run, and the command lines."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from diffusion.checkpoint import load_checkpoint

# Runs training.train's own entry point (main(argv) = `python -m training.train`) in every rank and
# afterwards saves that rank's raw weights, the sums of the batches it trained on, its losses, and whether
# the process group was left initialised.
RANK_WRAPPER = textwrap.dedent('''
    import os, sys, torch
    import torch.distributed as dist
    import training.train as tt

    seen = {"batches": [], "losses": []}
    orig_ema_update, orig_loss = tt.ema_update, tt.diffusion_loss

    def ema_update(ema, model, decay):
        seen["model"] = model
        orig_ema_update(ema, model, decay)

    def diffusion_loss(model, schedule, x0, y, *a, **k):
        seen["batches"].append(float(x0.double().sum()))
        loss = orig_loss(model, schedule, x0, y, *a, **k)
        seen["losses"].append(loss.item())
        return loss

    tt.ema_update, tt.diffusion_loss = ema_update, diffusion_loss
    tt.main(sys.argv[1:])
    out = sys.argv[sys.argv.index("--out") + 1]
    rank = int(os.environ["RANK"])
    torch.save({"model": {k: v.detach().cpu().contiguous() for k, v in seen["model"].state_dict().items()},
                "batches": seen["batches"], "losses": seen["losses"], "group_left": dist.is_initialized()},
               os.path.join(out, f"rank{rank}-{os.environ['TAG']}.pt"))
''')


def _torchrun(wrapper, args, env, tag):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(wrapper), *args]
    r = subprocess.run(cmd, env=dict(env, TAG=tag), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


@pytest.mark.timeout(600)  # two torchrun launches of 3 processes each on a small, busy machine
def test_ddp_two_processes_on_cpu(data10, tmp_path, subprocess_env):
    wrapper = tmp_path / "rank_wrapper.py"
    wrapper.write_text(RANK_WRAPPER)
    out = tmp_path / "ddp"
    # --max-minutes (never reached) also exercises the per-step stop agreement between ranks.
    args = ["--config", "tiny", "--data", str(data10), "--out", str(out), "--no-bf16", "--max-minutes", "30"]
    _torchrun(wrapper, [*args, "--max-steps", "2"], subprocess_env, "a")

    ck = load_checkpoint(out / "checkpoint")
    prov = ck.provenance
    assert prov["world_size"] == 2 and prov["steps"] == 2
    assert prov["images_seen"] == 2 * 8  # global batch 8 = 4 per rank
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]  # only rank 0 writes

    r0, r1 = (torch.load(out / f"rank{r}-a.pt", weights_only=True) for r in (0, 1))
    # Gradients are averaged: both ranks hold identical weights ...
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k
    # ... rank 0's are the ones saved ...
    state = torch.load(out / "state.pt", weights_only=True)
    for k, v in state["model"].items():
        assert torch.equal(v, r0["model"][k]), k
    # ... and the ranks trained on different batches.
    assert len(r0["batches"]) == len(r1["batches"]) == 2
    assert r0["batches"] != r1["batches"]
    # The logged loss is the global batch's: the mean of the ranks' losses (log_every 1), not rank 0's.
    assert r0["losses"] != r1["losses"]
    for m, l0, l1 in zip(metrics, r0["losses"], r1["losses"]):
        assert m["loss"] == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert not r0["group_left"] and not r1["group_left"]  # train() destroys the process group it made

    # Resume under DDP: still in step, and rank 1 does not replay rank 0's data stream.
    _torchrun(wrapper, [*args, "--max-steps", "4", "--resume"], subprocess_env, "b")
    r0, r1 = (torch.load(out / f"rank{r}-b.pt", weights_only=True) for r in (0, 1))
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k
    assert len(r0["batches"]) == len(r1["batches"]) == 2
    assert r0["batches"] != r1["batches"]
    assert load_checkpoint(out / "checkpoint").provenance["steps"] == 4


def _cli_main(entry: str = "dreamdata train"):
    """(main, argv prefix) of one of the two ways to train: ``dreamdata train`` or ``python -m training.train``."""
    if entry == "dreamdata train":
        from dreamdata_cli import main
        return main, ["train"]
    from training.train import main
    return main, []


def test_train_cli(data10, tmp_path, capsys):
    main, prefix = _cli_main()
    out = tmp_path / "run"
    main([*prefix, "--config", "tiny", "--data", str(data10), "--out", str(out), "--max-steps", "1",
          "--batch-size", "4", "--no-bf16", "--threads", "1"])
    assert f"EMA checkpoint: {out / 'checkpoint'}" in capsys.readouterr().out
    prov = load_checkpoint(out / "checkpoint").provenance
    assert prov["steps"] == 1 and prov["images_seen"] == 4
    assert prov["config"]["batch_size"] == 4 and prov["config"]["bf16"] is False
    assert prov["config"]["num_threads"] == 1
    # --resume continues the run.
    main([*prefix, "--config", "tiny", "--data", str(data10), "--out", str(out), "--max-steps", "2",
          "--batch-size", "4", "--no-bf16", "--resume"])
    assert load_checkpoint(out / "checkpoint").provenance["steps"] == 2


def test_train_cli_json_config(data10, tmp_path):
    main, prefix = _cli_main()
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"unet": {"base_channels": 8, "channel_mult": [1], "num_res_blocks": 1,
                                        "attn_resolutions": [], "dropout": 0.0},
                               "batch_size": 2, "max_steps": 1, "bf16": False, "warmup_steps": 1,
                               "sample_every": 0, "checkpoint_every": 1, "log_every": 1,
                               "schedule": {"name": "cosine", "timesteps": 50}}))
    out = tmp_path / "run"
    main([*prefix, "--config", str(cfg), "--data", str(data10), "--out", str(out)])
    ck = load_checkpoint(out / "checkpoint")
    assert ck.schedule.config.name == "cosine" and ck.model.config.channel_mult == (1,)


@pytest.mark.parametrize("entry", ["dreamdata train", "python -m training.train"])
@pytest.mark.parametrize("case", ["wrong-classes", "missing-data", "unknown-config", "bad-config-value",
                                  "threads-0"])
def test_train_cli_errors(case, entry, image_folder3, data10, tmp_path, capsys):
    main, prefix = _cli_main(entry)
    data = {"wrong-classes": image_folder3, "missing-data": tmp_path / "nope"}.get(case, data10)
    config = {"unknown-config": "no-such-config", "bad-config-value": str(tmp_path / "cfg.json")}.get(case, "tiny")
    (tmp_path / "cfg.json").write_text(json.dumps({"unet": "cpu-tiny", "log_every": 0}))
    expected = {"wrong-classes": "3 classes but the model expects 10", "missing-data": "data set not found",
                "unknown-config": "unknown config 'no-such-config'",
                "bad-config-value": "log_every must be an integer >= 1, got 0",  # was a ZeroDivisionError
                "threads-0": "num_threads must be an integer >= 1"}[case]  # was ignored
    argv = [*prefix, "--config", config, "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "1",
            *(["--threads", "0"] if case == "threads-0" else [])]
    # a one-line error and exit status 2 either way (under torchrun: one line per rank, not a traceback each)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


@pytest.mark.parametrize("argv, expected", [
    (["sample", "--guidance-interval", "4,0.28"], "argument --guidance-interval: guidance interval must satisfy 0 <= lo"),
    (["sample", "--device", "foo"], "unknown device 'foo'; expected auto, cpu, cuda or cuda:N"),
    (["sample", "--steps", "0"], "steps=0 out of range"),
    (["sample", "--guidance", "50"], "guidance=50.0 out of range"),
    (["sample", "--sampler", "ddim", "--eta", "2"], "eta=2.0 out of range 0..1"),
    (["sample", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["evaluate", "--data", "x", "--seeds", "4-2"], "argument --seeds: expected comma-separated seeds or a rising range"),
    (["api", "--port", "99999"], "argument --port: a port is a number in 1..65535"),
    (["sample", "--out-is-a-file"], "is a file, not a folder"),
    (["evaluate", "--data", "x", "--out-is-a-file"], "is a file, not a folder"),
    (["evaluate", "--data", "x", "--width", "1"], "--width must be at least 2"),
    (["evaluate", "--data", "x", "--synthetic-per-class", "0"], "--synthetic-per-class must be at least 1, got 0"),
    (["evaluate", "--data", "x", "--real-fraction", "2"], "--real-fraction must be in (0, 1], got 2.0"),
    (["evaluate", "--data", "x", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["evaluate", "--data", "x", "--steps", "0"], "steps=0 out of range"),
])
def test_bad_cli_input_is_one_line_and_exit_status_2_before_anything_loads(argv, expected, tmp_path, capsys,
                                                                            monkeypatch):
    from dreamdata_cli import main
    from training import sample_cli

    monkeypatch.setattr(sample_cli, "load_for_sampling", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    out_is_a_file = "--out-is-a-file" in argv
    if out_is_a_file:
        argv = [a for a in argv if a != "--out-is-a-file"]
        out.write_text("a file where the output folder should go")
    with pytest.raises(SystemExit) as e:
        main(argv + (["--out", str(out)] if argv[0] in ("sample", "evaluate") else []))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert out.is_file() if out_is_a_file else not out.exists()


def test_ctrl_c_is_a_line_saying_how_to_go_on_not_a_traceback(monkeypatch, capsys):
    from dreamdata_cli import main
    from training import sample_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_cli, "run_sample", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["sample", "--out", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 130 and "with the same --seed goes on from the images" in err and "Traceback" not in err


@pytest.mark.parametrize("entry", ["dreamdata", "training.train"])
def test_train_stopped_by_a_signal_exits_130_saying_how_to_go_on(entry, data10, tmp_path, capsys, monkeypatch):
    """A script can tell a stopped run from a finished one: not status 0 and no "EMA checkpoint" line."""
    import os
    import signal

    import training.train as tt
    from dreamdata_cli import main as dreamdata_main

    real_update, calls = tt.ema_update, []

    def update_then_signal(ema, model, decay):
        real_update(ema, model, decay)
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(tt, "ema_update", update_then_signal)
    main, prefix = (dreamdata_main, ["train"]) if entry == "dreamdata" else (tt.main, [])
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main([*prefix, "--config", "tiny", "--data", str(data10), "--out", str(out), "--max-steps", "100",
              "--no-bf16"])
    captured = capsys.readouterr()
    assert e.value.code == 130 and "with --resume goes on from the last saved state" in captured.err
    assert "EMA checkpoint" not in captured.out and "Traceback" not in captured.err
    assert load_checkpoint(out / "checkpoint").provenance["steps"] == 1


def test_a_cuda_device_that_is_not_there_is_a_value_error(monkeypatch):
    from training.sample_cli import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU is available here"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="there are 2 CUDA GPU"):
        pick_device("cuda:2")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="only cpu and cuda"):
        pick_device("meta")
