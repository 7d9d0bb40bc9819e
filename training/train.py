"""Train a class-conditional DDPM.

    dreamdata train --config cifar10-cpu --data ../shared/data/cifar10-jpeg.tar.gz --out runs/cpu [--resume]
    torchrun --nproc_per_node 8 --shutdown-timeout 300 -m training.train --config cifar10-ddpm --data ... --out runs/ddpm

(torchrun sends SIGKILL 30 s after it forwards a stop unless ``--shutdown-timeout`` says otherwise: rank 0
needs the time to finish its step and write the state.)

Writes to ``--out``: ``state.pt`` (resumable training state: weights, EMA, optimizer, step, RNG),
``checkpoint/`` (EMA weights in the checkpoint format), ``metrics.jsonl``, ``loss.png`` and
``samples/step_NNNNNNN.png`` (EMA sample grids, one row per class).

A SIGINT or SIGTERM finishes the step, writes the checkpoint and state, and then raises
``TrainingInterrupted`` (a KeyboardInterrupt: ``dreamdata train`` exits 130), so a script can tell a
stopped run from a finished one.  A step whose gradient norm is NaN or inf raises ``TrainingDiverged`` at
the next log step or checkpoint, on every process, before that step's log line or checkpoint is written, so
``state.pt`` keeps the last good state.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import pickle
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from diffusion.checkpoint import replace_durably, save_checkpoint
from diffusion.precision import cpu_has_bf16, gpu_has_bf16
from diffusion.samplers import sample
from diffusion.schedules import NoiseSchedule
from diffusion.unet import UNet, count_parameters

from .configs import GRID_SAMPLER, TrainConfig, resolve_config
from .data import load_dataset, random_flip, tmp_path, to_model_range
from .plots import image_grid, loss_curve, to_uint8

log = logging.getLogger(__name__)


class TrainingInterrupted(KeyboardInterrupt):
    """train() stopped early on SIGINT/SIGTERM after writing its checkpoint and state: ``--resume`` goes on."""


class TrainingDiverged(RuntimeError):
    """A step's gradient norm was NaN or inf: the weights are lost from there, so nothing of them is saved."""


@contextlib.contextmanager
def _stop_on_signal():
    """While training, SIGTERM/SIGINT ask the loop to finish its step and stop; train() then writes the checkpoint
    and state and raises TrainingInterrupted.

    Yields a zero-argument function that says whether a stop was requested. Only installed in the main
    thread (signal handlers cannot be set elsewhere); a second signal restores the default behaviour.
    """
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):
        log.warning("signal %d: stopping after this step (send again to abort at once)", signum)
        requested.set()
        for sig, h in old.items():
            signal.signal(sig, h)

    for sig in old:
        signal.signal(sig, handler)
    try:
        yield requested.is_set
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def ema_decay_at(step: int, max_decay: float) -> float:
    """EMA decay with warm-up: min(max_decay, (1 + step) / (10 + step))."""
    return min(max_decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # one fused update of all parameters (a loop of lerp_ is ~200 small kernel launches a step on a GPU)
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def lr_at(step: int, cfg: TrainConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


def diffusion_loss(model, schedule: NoiseSchedule, x0: torch.Tensor, y: torch.Tensor, p_uncond: float,
                   null_class: int, generator: torch.Generator | None = None, autocast: bool = False) -> torch.Tensor:
    """The report's objective: E ||eps - eps_theta(sqrt(abar) x0 + sqrt(1-abar) eps, t, y)||^2,
    with labels dropped to the null class with probability ``p_uncond``."""
    n = x0.shape[0]
    dev = x0.device
    t = torch.randint(0, schedule.num_timesteps, (n,), generator=generator).to(dev)
    noise = torch.randn(x0.shape, generator=generator).to(dev, memory_format=torch.preserve_format)
    drop = (torch.rand(n, generator=generator) < p_uncond).to(dev)
    y = torch.where(drop, torch.full_like(y, null_class), y)
    x_t = schedule.q_sample(x0, t, noise)
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        eps = model(x_t, t, y)
    return F.mse_loss(eps.float(), noise)


class _Dist:
    """Rank/world info; initialises torch.distributed when launched by torchrun."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = self.world > 1 and not dist.is_initialized()  # then train() also destroys it
        if self.owns_group:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def _save_state(path: Path, model, ema, opt, step: int, images_seen: int, wall: float, cfg: TrainConfig,
                gen: torch.Generator, perm: torch.Tensor | None = None, pos: int = 0,
                device: torch.device | None = None, class_names: tuple[str, ...] | None = None,
                data_fingerprint: str | None = None) -> None:
    state = {
        "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
        "step": step, "images_seen": images_seen, "wall_time_s": wall,
        "config": json.dumps(cfg.to_dict()), "rng_torch": torch.get_rng_state(), "rng_data": gen.get_state(),
    }
    if class_names is not None:  # the data set trained on, checked on resume
        state["class_names"] = list(class_names)
    if data_fingerprint is not None:
        state["data_fingerprint"] = data_fingerprint
    if perm is not None:  # the epoch's data order and position in it, for an exact resume mid-epoch
        state["perm"], state["pos"] = perm, pos
    if device is not None and device.type == "cuda":  # dropout and noise drawn on the GPU use its own stream
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    replace_durably(tmp, path)  # the only copy of the run's optimizer and data order


def _load_state(path: Path, device: torch.device) -> dict:
    """``state.pt``, or a ValueError that names it and says what to do: a damaged file is no traceback."""
    try:
        st = torch.load(path, map_location=device, weights_only=True)
    except torch.OutOfMemoryError:  # the file is fine; the device is full
        raise
    except (EOFError, pickle.UnpicklingError, RuntimeError) as e:  # empty, cut short, not a torch file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} cannot be read as a training state ({reason}): if it is damaged, the run cannot go "
                         "on from it; move it away and train again without --resume, or into another --out") from e
    if not isinstance(st, dict) or not {"config", "model", "ema", "opt", "step"} <= set(st):
        raise ValueError(f"{path} is not a dreamdata training state: move it away and train again without "
                         "--resume, or into another --out")
    return st


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the log records of steps up to ``step``, where this run starts: a run killed after its last
    checkpoint had logged steps that the resumed run logs again, and a fresh run starts an empty log (else
    the loss curve would double back)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except (ValueError, AttributeError):  # a line cut short by the kill
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def _sample_grid(ema: UNet, schedule: NoiseSchedule, cfg: TrainConfig, path: Path, autocast: bool) -> None:
    k = ema.config.num_classes
    per = min(10, max(1, 100 // k))
    labels = torch.arange(k).repeat_interleave(per)
    x = sample(ema, schedule, labels, list(range(len(labels))), sampler=GRID_SAMPLER, steps=cfg.sample_steps,
               guidance=1.0, autocast=autocast)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)  # a kill mid-write leaves no truncated grid (none is written again)
    image_grid(to_uint8(x.cpu()), nrow=per).save(tmp, format="PNG")
    tmp.replace(path)


def training_autocast(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether this run trains in bf16 autocast: as ``cfg.bf16`` says, except on a CPU that torch says has
    no bf16 instructions (neither AVX512-BF16 nor AMX): there bf16 is emulated, and on a 2-core AVX2 EPYC
    the shipped UNet trained at 0.5-0.7 images/s in bf16 against 7.9-10.2 in fp32 (batch 16,
    benchmarks/training_throughput.py), so it trains in fp32 and says so."""
    if not cfg.bf16:
        return False
    if device.type == "cpu" and cpu_has_bf16() is False:
        log.warning("this CPU has no bf16 instructions (bf16 autocast would be emulated, many times slower): "
                    "training in fp32 (the config asks for bf16)")
        return False
    if device.type == "cuda" and not gpu_has_bf16(device):
        log.warning("this GPU has no native bf16 (compute capability %s.%s; 8.0 or newer has it): training in fp32 "
                    "(the config asks for bf16)", *torch.cuda.get_device_capability(device))
        return False
    return True


def _architecture(unet: dict | None) -> dict:
    """A UNet config's fields that shape its weights (dropout does not: it may change on resume)."""
    return {k: v for k, v in (unet or {}).items() if k != "dropout"}


def _check_resumable(state_path: Path, st: dict, saved: dict, now: dict, class_names: tuple[str, ...],
                     data: str, fingerprint: str | None) -> None:
    """Refuse (ValueError) to resume ``st``, a run saved with config ``saved``, under config ``now`` on a data set
    of ``class_names``, where its weights would mean something else; warn where only the data's content differs.
    A state.pt written before class names and fingerprints were saved is not checked for them."""
    again = "resume it with the --config and --data it was trained with, or choose another --out"
    if _architecture(saved.get("unet")) != _architecture(now["unet"]):
        raise ValueError(f"{state_path} is a run of another model (its UNet config differs): {again}")
    if "schedule" in saved and saved["schedule"] != now["schedule"]:
        raise ValueError(f"{state_path} was trained with another noise schedule ({saved['schedule']}, this "
                         f"config has {now['schedule']}): the model predicts noise for that schedule; {again}")
    if "class_names" in st and tuple(st["class_names"]) != tuple(class_names):
        raise ValueError(f"{state_path} was trained on the classes {', '.join(st['class_names'])}, but {data} has "
                         f"{', '.join(class_names)}: its class labels would mean other classes; {again}")
    if fingerprint is not None and st.get("data_fingerprint") not in (None, fingerprint):
        log.warning("%s was trained on a data set of other contents (fingerprint %s; %s has %s): resuming on it",
                    state_path, st["data_fingerprint"], data, fingerprint)


def _per_rank_batch(batch_size: int, world: int) -> int:
    """The batch each of ``world`` processes trains, refusing a global batch that does not split evenly."""
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not a multiple of the {world} processes: each trains an equal "
                         f"share of the global batch, so choose a multiple of {world}")
    return batch_size // world


def train(cfg: TrainConfig, data: str, out: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Train (or resume) and return the EMA checkpoint directory; TrainingInterrupted after a stop by signal."""
    _per_rank_batch(cfg.batch_size, int(os.environ.get("WORLD_SIZE", "1")))  # refused before any process group
    dd = _Dist()
    try:
        return _train(cfg, data, Path(out), resume, progress, dd)
    finally:  # also after an error: a group left behind makes torch warn at exit, and blocks a later init
        if dd.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, data: str, out: Path, resume: bool, progress: bool, dd: _Dist) -> Path:
    per_rank = _per_rank_batch(cfg.batch_size, dd.world)
    device = dd.device()
    if cfg.num_threads is not None and device.type == "cpu":
        torch.set_num_threads(cfg.num_threads)
    state_path = out / "state.pt"
    if not resume and state_path.exists():  # a fresh run would overwrite it at its first checkpoint
        raise ValueError(f"{state_path} exists: pass --resume to continue that run, or choose another --out")
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(data, "train", image_size=cfg.unet.image_size)
    if len(ds.class_names) != cfg.unet.num_classes:
        raise ValueError(f"data set has {len(ds.class_names)} classes but the model expects {cfg.unet.num_classes}")
    if per_rank > len(ds.labels):  # a batch is drawn without repeats from one shuffle of the data
        raise ValueError(f"batch_size {cfg.batch_size} ({per_rank} per process) is larger than the data set "
                         f"({len(ds.labels)} images): pass a smaller --batch-size")
    # the data's content, saved in state.pt and compared on resume (sha256 of the pixels: ~0.3 s for CIFAR-10)
    fingerprint = ds.fingerprint() if dd.main else None
    torch.manual_seed(cfg.seed + dd.rank)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + dd.rank)
    bf16 = training_autocast(cfg, device)

    model = UNet(cfg.unet).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = NoiseSchedule(cfg.schedule)
    step, images_seen, wall = 0, 0, 0.0
    perm, pos = None, 0
    if resume and state_path.exists():
        st = _load_state(state_path, device)
        saved, now = json.loads(st["config"]), json.loads(json.dumps(cfg.to_dict()))
        _check_resumable(state_path, st, saved, now, ds.class_names, data, fingerprint)
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        for g in opt.param_groups:  # the saved groups carry the old run's value (lr is set at every step)
            g["weight_decay"] = cfg.weight_decay
        step, images_seen, wall = st["step"], st["images_seen"], st["wall_time_s"]
        if dd.rank == 0:
            # RNG states must be CPU ByteTensors (map_location may have moved them to the GPU).
            torch.set_rng_state(st["rng_torch"].cpu())
            gen.set_state(st["rng_data"].cpu())
            if "rng_cuda" in st and device.type == "cuda":
                torch.cuda.set_rng_state(st["rng_cuda"].cpu(), device)
            if "perm" in st and len(st["perm"]) == len(ds.labels):
                perm, pos = st["perm"].cpu(), int(st["pos"])
        else:
            # state.pt holds rank 0's streams only: other ranks must not replay them (they would draw
            # the same batches and noise as rank 0), so they continue from fresh rank- and step-specific seeds.
            torch.manual_seed(cfg.seed + dd.rank + 7919 * step)
            gen.manual_seed(cfg.seed * 1000 + dd.rank + 7919 * step)
        if dd.main:
            log.info("resumed from %s at step %d (%.1f min trained)", state_path, step, wall / 60)
            changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            if changed:  # legitimate for max_steps or max_minutes; worth a look for anything else
                log.warning("resuming with a config that differs from the saved run's in: %s", ", ".join(changed))
    elif resume and dd.main:
        log.warning("--resume given but %s does not exist; starting fresh", state_path)

    train_model = model
    if dd.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dd.local_rank] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    # On a GPU the data set lives there (CIFAR-10: 150 MB of uint8): a batch is gathered, flipped and converted on
    # the GPU, instead of on the CPU with its 6 MB of floats copied over every step.  The random draws stay on the
    # CPU generator (the same streams on any device); their small copies still wait for the GPU at each step.
    images_u8 = ds.images.to(device) if device.type == "cuda" else ds.images
    labels_all = ds.labels.to(images_u8.device)
    n_data = len(labels_all)
    if perm is None:
        perm, pos = torch.randperm(n_data, generator=gen), 0
    if dd.main:
        _trim_metrics(out / "metrics.jsonl", step)
    metrics_f = open(out / "metrics.jsonl", "a") if dd.main else None
    provenance_base = {"config": cfg.to_dict(), "dataset": str(data), "num_images": n_data,
                       "parameters": count_parameters(model), "world_size": dd.world,
                       "device": device.type, "precision": "bf16" if bf16 else "fp32"}

    written_at = [None]  # the step of the last checkpoint written

    def stop_if_diverged():
        if diverged.item():
            last = ("nothing was saved" if written_at[0] is None and not state_path.exists() else
                    f"{state_path} and {out / 'checkpoint'} hold the last state saved before it")
            raise TrainingDiverged(f"the gradient norm was not finite (NaN or inf) at a step up to {step}: training "
                                   f"stopped there ({last}); resume with a lower --lr, or start again")

    def write_checkpoint():
        stop_if_diverged()
        written_at[0] = step
        prov = dict(provenance_base, steps=step, images_seen=images_seen, wall_time_s=round(wall, 1),
                    trained_until=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        save_checkpoint(out / "checkpoint", ema, cfg.schedule, ds.class_names, prov,
                        dtype=getattr(torch, cfg.checkpoint_dtype))
        _save_state(state_path, model, ema, opt, step, images_seen, wall, cfg, gen, perm, pos, device,
                    class_names=ds.class_names, data_fingerprint=fingerprint)

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (progress and dd.main), unit="step",
               dynamic_ncols=True)
    # summed on the device and read at log steps only (one wait for the GPU fewer per step)
    loss_acc = torch.zeros((), dtype=torch.float64, device=device)
    # set on the device (no wait for the GPU) at the first step whose gradient norm is not finite; read before
    # every checkpoint: a diverged run stops and keeps the state and checkpoint of its last good write
    diverged = torch.zeros((), dtype=torch.bool, device=device)
    n_acc, t_log = 0, time.perf_counter()
    start_step, t_start_wall = step, wall

    def budget_spent() -> bool:
        return cfg.max_minutes is not None and wall >= cfg.max_minutes * 60

    # wall and step are the same on every rank here (all read them from state.pt), so all ranks agree
    stop = budget_spent()
    if stop and dd.main:
        log.info("the time budget is spent (%.1f of max_minutes %g trained): no step to train; raise --max-minutes "
                 "to go on", wall / 60, cfg.max_minutes)
    elif step >= cfg.max_steps and dd.main:
        log.info("already at max_steps %d: no step to train; raise --max-steps to go on", cfg.max_steps)
    interrupted = False  # stopped by SIGINT/SIGTERM (not by max_steps or max_minutes)
    model.train()
    with _stop_on_signal() as stop_requested:
        while step < cfg.max_steps and not stop:
            t0 = time.perf_counter()
            if pos + per_rank > n_data:
                perm, pos = torch.randperm(n_data, generator=gen), 0
            idx = perm[pos: pos + per_rank].to(images_u8.device)
            pos += per_rank
            x0 = to_model_range(random_flip(images_u8[idx], gen)).to(device)
            if cfg.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            y = labels_all[idx].to(device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            loss = diffusion_loss(train_model, schedule, x0, y, cfg.p_uncond, cfg.unet.num_classes, gen, bf16)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            diverged |= ~torch.isfinite(gnorm)
            opt.step()
            ema_update(ema, model, ema_decay_at(step, cfg.ema_decay))
            step += 1
            images_seen += per_rank * dd.world
            wall += time.perf_counter() - t0
            loss_acc += loss.detach()
            n_acc += 1
            reason = 2.0 if stop_requested() else 1.0 if budget_spent() else 0.0  # 2: a signal, 1: the budget
            if dd.world > 1:
                # Wall time and signals differ between ranks: stop together, or the ranks left behind hang in
                # all-reduce (a signal to any rank wins, so every rank raises TrainingInterrupted below).
                flag = torch.tensor([reason], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                reason = flag.item()
            stop = reason > 0
            interrupted = reason == 2.0 and step < cfg.max_steps  # a signal at the last step: finished all the same
            log_now = step % cfg.log_every == 0 or stop or step == cfg.max_steps  # the same on every rank
            save_now = bool(cfg.checkpoint_every) and (step % cfg.checkpoint_every == 0 or stop
                                                       or step == cfg.max_steps)
            if log_now or save_now:  # on every rank (their gradients agree after DDP's all-reduce): all stop together
                stop_if_diverged()
            if log_now and dd.world > 1:  # the loss of the global batch: the mean over ranks
                dist.all_reduce(loss_acc)
                loss_acc /= dd.world
            if dd.main:
                bar.update(1)
                if log_now:
                    now = time.perf_counter()
                    rec = {"step": step, "loss": loss_acc.item() / n_acc, "grad_norm": float(gnorm),
                           "lr": lr_at(step - 1, cfg), "images_seen": images_seen, "wall_time_s": round(wall, 2),
                           "images_per_s": round(n_acc * per_rank * dd.world / max(now - t_log, 1e-9), 1)}
                    metrics_f.write(json.dumps(rec) + "\n")
                    metrics_f.flush()
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=rec["images_per_s"])
                    t_log = now
            if log_now:
                loss_acc.zero_()
                n_acc = 0
            if dd.main:
                if save_now:
                    write_checkpoint()
                    loss_curve(out / "metrics.jsonl", out / "loss.png")
                if cfg.sample_every and step % cfg.sample_every == 0 and not interrupted:  # a signal: exit soon
                    _sample_grid(ema, schedule, cfg, out / "samples" / f"step_{step:07d}.png", bf16)
        bar.close()
        if dd.main:
            # written unless the loop's last step wrote it, or no step ran (a spent budget, a finished run) and the
            # checkpoint is there; still under the signal guard, so a first SIGTERM during the save (the only one
            # with checkpoint_every 0) lets it finish instead of losing the run
            if (step != start_step and written_at[0] != step) or not (out / "checkpoint" / "config.json").exists():
                write_checkpoint()
                loss_curve(out / "metrics.jsonl", out / "loss.png")
            metrics_f.close()
        if dd.world > 1:  # under the guard too: torchrun's SIGTERM to every rank must not end the others meanwhile
            dist.barrier()
    if dd.main:
        log.info("at step %d, %d of them trained in this run (%.1f min)", step, step - start_step,
                 (wall - t_start_wall) / 60)
    if interrupted:
        raise TrainingInterrupted(f"stopped by a signal at step {step}; {state_path} holds the state to resume")
    return out / "checkpoint"


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="named config (cifar10-cpu, cifar10-ddpm, tiny, ...) or JSON file")
    p.add_argument("--data", required=True, help="CIFAR-10 tar.gz, cifar-10-batches-py folder or ImageFolder dir")
    p.add_argument("--out", required=True, help="run directory (state, checkpoint, logs, sample grids)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt")
    p.add_argument("--max-steps", type=int, help="override the config's max_steps")
    p.add_argument("--max-minutes", type=float, help="stop after this much training wall time in all (with "
                                                     "--resume, the earlier runs' time counts too)")
    p.add_argument("--batch-size", type=int, help="override the config's global batch size")
    p.add_argument("--lr", type=float, help="override the config's peak learning rate")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", default=None, help="train in fp32")


def run_train(args: argparse.Namespace) -> None:
    cfg = resolve_config(args.config, max_steps=args.max_steps, max_minutes=args.max_minutes,
                         batch_size=args.batch_size, compile=args.compile, bf16=args.bf16,
                         num_threads=args.threads, lr=args.lr)
    try:
        ckpt = train(cfg, args.data, args.out, resume=args.resume)
    except TrainingDiverged as e:  # one line and status 1, not a traceback: nothing in it would help
        raise SystemExit(f"train: error: {e}") from None
    print(f"EMA checkpoint: {ckpt}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    args = p.parse_args(argv)
    # one line each, not a traceback per rank under torchrun; the statuses of dreamdata train
    try:
        run_train(args)
    except (ValueError, FileNotFoundError) as e:  # bad input, a missing --data, a run that is not resumable
        p.exit(2, f"train: error: {e}\n")
    except OSError as e:  # a disk, permission or file error met while working
        p.exit(1, f"train: error: {e}\n")
    except KeyboardInterrupt:  # torchrun forwards SIGINT/SIGTERM to every rank
        p.exit(130, "stopped; the same command with --resume goes on from the last saved state\n")


if __name__ == "__main__":
    main()
