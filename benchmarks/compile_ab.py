"""The default sampler eager against compiled (``diffusion.precision.compile_for_sampling``), each variant in a
fresh process of its own, alternated in rotated rounds.  The default sampler is the service's, all of
``DEFAULT_SETTINGS`` (``diffusion/spec.py``: sampler, steps, spacing, guidance and its interval; the README's
"Which sampler" says what it is and why).

``sampling_ab.py --compile`` times both in one process that also holds the other variants (and diffusers);
a long job such as ``dreamdata evaluate --compile`` runs one model in a process of its own. This script
times the comparison that job makes: every timed run is a new Python process that loads the checkpoint,
warms up (the compiled one with a whole run, which compiles the guided and unguided shapes) and then times
--runs whole runs of --batch images; the parent decides the precision and weight layout once (``auto``
times them) and hands them to every process, then prints the rates and the per-round ratio.

    python benchmarks/compile_ab.py [--checkpoint checkpoints/cifar10] [--threads 2] [--batch 50] [--rounds 3]
        [--runs 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("eager", "compiled")


def child(a: argparse.Namespace) -> None:
    import torch

    from diffusion.checkpoint import load_for_sampling
    from diffusion.precision import compile_for_sampling
    from diffusion.samplers import sample
    from diffusion.spec import DEFAULT_SETTINGS as d

    torch.set_num_threads(a.threads)
    ckpt = load_for_sampling(a.checkpoint, "cpu", a.precision)
    if a.layout:  # the parent's choice, so that both variants run the same layout
        ckpt.model.to(memory_format=torch.channels_last if a.layout == "channels_last" else torch.contiguous_format)
    model = compile_for_sampling(ckpt.model) if a.child == "compiled" else ckpt.model
    labels, seeds = torch.arange(a.batch) % model.config.num_classes, list(range(a.batch))

    def run(steps: int) -> None:
        sample(model, ckpt.schedule, labels, seeds, sampler=d.sampler, steps=steps, guidance=d.guidance,
               guidance_interval=d.guidance_interval, spacing=d.spacing, autocast=ckpt.precision.bf16)

    t0 = time.perf_counter()
    # both warm up with a whole run: the guided and the unguided batch shape each see a first call untimed (two steps
    # would not do: at t = 999 and 0, both outside the default interval, they miss the guided shape; until 2026-12-02
    # eager warmed up with those two only)
    run(d.steps)
    warm = time.perf_counter() - t0
    rates = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        run(d.steps)
        rates.append(a.batch / (time.perf_counter() - t0))
    print(json.dumps({"variant": a.child, "rates": rates, "warmup_s": warm,
                      "precision": f"{ckpt.precision.name} {a.layout or ckpt.precision.layout}"}))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "cifar10"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=50, help="images per timed run (default 50)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each one process per variant (default 3)")
    p.add_argument("--runs", type=int, default=1, help="timed runs per process (default 1; their median counts)")
    p.add_argument("--precision", default=None, help="auto, fp32, bf16 (default: $DREAMDATA_PRECISION or auto)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--layout", choices=("NCHW", "channels_last"), help=argparse.SUPPRESS)  # the parent's choice
    a = p.parse_args(argv)
    if min(a.batch, a.rounds, a.runs, a.threads) < 1:
        p.error("--batch, --rounds, --runs and --threads must be at least 1")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.child:
        child(a)
        return {}
    # precision and layout decided once, here (auto times them), and handed to every child: each deciding for
    # itself, an eager and a compiled process once ran different layouts
    import torch

    from diffusion.checkpoint import load_for_sampling
    from diffusion.spec import DEFAULT_SETTINGS as d, format_guidance_interval

    torch.set_num_threads(a.threads)
    choice = load_for_sampling(a.checkpoint, "cpu", a.precision).precision
    print(f"the default sampler: {d.sampler}, {d.steps} steps ({d.spacing}-spaced), guidance {d.guidance:g} "
          f"(interval {format_guidance_interval(d.guidance_interval)})", flush=True)
    print(f"precision {choice.name} {choice.layout} ({choice.reason}), in every process", flush=True)
    common = ["--checkpoint", a.checkpoint, "--threads", str(a.threads), "--batch", str(a.batch),
              "--runs", str(a.runs), "--precision", choice.name, "--layout", choice.layout]
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(a.rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for v in order:
            out = subprocess.run([sys.executable, __file__, "--child", v, *common], check=True, capture_output=True,
                                 text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            rates[v].append(statistics.median(res["rates"]))
            print(f"round {r + 1} {v}: {rates[v][-1]:.3f} images/s (warm-up {res['warmup_s']:.1f} s; "
                  f"{res['precision']})", flush=True)
    ratios = [c / e for c, e in zip(rates["compiled"], rates["eager"])]
    print(f"\nbatch {a.batch}, {a.threads} threads, {a.rounds} rounds; images/s median [min, max]")
    for v in VARIANTS:
        print(f"{v:<9} {statistics.median(rates[v]):.3f} [{min(rates[v]):.3f}, {max(rates[v]):.3f}]")
    print(f"compiled / eager, per round: {statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]")
    return {"rates": rates, "ratios": ratios}


if __name__ == "__main__":
    main()
