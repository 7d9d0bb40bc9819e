"""Outputs of an augmentation experiment (``training.evaluate``), all in one folder::

    report.json                  everything (the dict run_evaluation returns)
    report.md                    a short human-readable summary that links the plots
    accuracy.png                 test accuracy per arm: mean, +-1 std error bars, one dot per seed
    per_class.png                per-class test accuracy of every arm
    confusion_<arm>.png          confusion heatmap per arm (counts summed over seeds; colour = row share)

Arm slugs in file names: real, real_synthetic, synthetic.
"""
from __future__ import annotations

import json
from pathlib import Path

SLUG = {"real": "real", "real+synthetic": "real_synthetic", "synthetic": "synthetic"}
COLORS = {"real": "#4c72b0", "real+synthetic": "#55a868", "synthetic": "#c44e52"}



def _seed_text(synth: dict, base: int) -> str:
    """How the synthetic images got their seeds (reports from before per-class seeds have no stride)."""
    if "class_seed_stride" in synth:
        return f"image j of class c has seed {base} + c x {synth['class_seed_stride']:,} + j"
    return f"image i has seed {base} + i"

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def accuracy_plot(report: dict, path: Path) -> None:
    plt = _plt()
    arms = report["arms"]
    names = list(arms)
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=100)
    for i, arm in enumerate(names):
        a = arms[arm]
        ax.bar(i, 100 * a["accuracy_mean"], color=COLORS.get(arm), alpha=0.8,
               yerr=None if a["accuracy_std"] is None else 100 * a["accuracy_std"], capsize=6)
        ax.scatter([i] * len(a["accuracies"]), [100 * v for v in a["accuracies"]], color="black", s=12, zorder=3)
        ax.text(i, 50 * a["accuracy_mean"], f"{100 * a['accuracy_mean']:.1f}", ha="center", va="center",
                color="white", fontweight="bold")
    ax.set_xticks(range(len(names)), [f"{n}\n({arms[n]['train_images']} img)" for n in names])
    ax.set_ylabel("test accuracy (%); bar: mean, line: ±1 SD, dots: seeds")
    s = report["settings"]
    ax.set_title(f"{s['classifier']}, k={s['synthetic_per_class']}/class, {100 * s['real_fraction']:g}% real, "
                 f"{len(s['seeds'])} seed(s)", fontsize=10)
    ax.set_ylim(0, 105)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def per_class_plot(report: dict, path: Path) -> None:
    plt = _plt()
    names = report["class_names"]
    arms = report["arms"]
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names)), 4), dpi=100)
    for j, (arm, a) in enumerate(arms.items()):
        ax.bar([i + (j - (len(arms) - 1) / 2) * width for i in range(len(names))],
               [100 * a["per_class_accuracy"][c] for c in names], width, label=arm, color=COLORS.get(arm))
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(arms), frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def confusion_plot(matrix: list[list[int]], class_names: list[str], title: str, path: Path) -> None:
    """Heatmap: colour = share of the true class (row), text = count."""
    plt = _plt()
    k = len(class_names)
    rows = [max(1, sum(r)) for r in matrix]
    share = [[v / rows[i] for v in r] for i, r in enumerate(matrix)]
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=100)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=7,
                    color="white" if share[i][j] > 0.5 else "black")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pct(v: float | None, signed: bool = False) -> str:
    return "n/a" if v is None else (f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}")


def _interval_text(interval: list[float] | None) -> str:
    """' at noise levels sigma in (lo, hi]' for a guidance interval; '' for guidance at every step."""
    return "" if not interval else f" at noise levels sigma in ({interval[0]:g}, {interval[1]:g}]"


def _train_arithmetic(train_settings: dict, device: str) -> str:
    """How the classifier trained: bf16 autocast on CUDA, or on a CPU where asked (and able); fp32 otherwise."""
    return "bf16 autocast" if train_settings.get("cpu_bf16") or str(device).startswith("cuda") else "fp32"


def markdown(report: dict) -> str:
    s, arms, d, c = report["settings"], report["arms"], report["delta"], report["classifier"]
    lines = [
        "# Augmentation experiment", "",
        f"- classifier: {c['kind']} (width {c['width']}, {c['parameters']:,} parameters), " + (
            f"{c['train_settings']['steps']} optimizer steps per arm (= {s['epochs']} epochs of the real arm)"
            if s.get("budget", "epochs") == "steps" else f"{s['epochs']} epochs per arm")
        + f", trained in {_train_arithmetic(c['train_settings'], s['device'])}",
        f"- real data: {100 * s['real_fraction']:g}% of the training set, class-balanced "
        f"({report['data']['real_train_images_per_seed']} images; {s['data']})",
        f"- synthetic data: {s['synthetic_per_class']} images per class from checkpoint "
        f"`{report['synthetic']['checkpoint_sha256'][:12]}` ({s['sampler']}, {s['steps']} steps"
        f"{' spaced evenly in logSNR' if s.get('spacing', 'time') == 'logsnr' else ''}, "
        f"guidance {s['guidance']:g}{_interval_text(s.get('guidance_interval'))}, "
        f"{report['synthetic'].get('precision', 'fp32')} model calls, "
        f"{_seed_text(report['synthetic'], s['synthetic_seed'])})",
        f"- seeds: {', '.join(map(str, s['seeds']))}; tested on the real test split "
        f"({report['data']['test_images']} images)", "",
        "## Test accuracy (%)", "",
        "| arm | train images | optimizer steps | mean | std | per seed |", "|---|---:|---:|---:|---:|---|"]
    for arm, a in arms.items():
        lines.append(f"| {arm} | {a['train_images']} | {a.get('train_steps', 'n/a')} | {_pct(a['accuracy_mean'])} | "
                     f"{_pct(a['accuracy_std'])} | "
                     + ", ".join(_pct(v) for v in a["accuracies"]) + " |")
    lines += ["", "## Effect of the synthetic images", ""]
    if d["ci95"] is None:
        lines.append(f"real+synthetic minus real: {_pct(d['mean'], True)} points from one seed; the confidence "
                     "interval is undefined (run with 2 or more seeds; 3 or more for a useful interval).")
    else:
        lo, hi = d["ci95"]
        verdict = ("the interval excludes 0: the synthetic images " + ("helped" if d["mean"] > 0 else "hurt")
                   if d["significant"] else "the interval includes 0: no effect detectable with these seeds")
        lines.append(f"real+synthetic minus real: {_pct(d['mean'], True)} points, 95% CI "
                     f"[{_pct(lo, True)}, {_pct(hi, True)}] (paired t over {d['n']} seeds); {verdict}.")
    lines += ["", f"Classification Accuracy Score (synthetic only, Ravuri & Vinyals 2019): "
              f"{_pct(arms['synthetic']['accuracy_mean'])}% vs {_pct(arms['real']['accuracy_mean'])}% for real only "
              f"({arms['synthetic']['train_images']} vs {arms['real']['train_images']} training images).", "",
              "## Per-class accuracy (%)", "",
              "| class | " + " | ".join(arms) + " | delta |", "|---|" + "---:|" * (len(arms) + 1)]
    for name in report["class_names"]:
        lines.append(f"| {name} | " + " | ".join(_pct(a["per_class_accuracy"][name]) for a in arms.values())
                     + f" | {_pct(d['per_class'][name], True)} |")
    files = report.get("files", {})
    lines += ["", "## Plots", "", f"![accuracy per arm]({files.get('accuracy', 'accuracy.png')})",
              f"![per-class accuracy]({files.get('per_class', 'per_class.png')})", ""]
    for arm, f in files.get("confusion", {}).items():
        lines.append(f"![confusion matrix, {arm}]({f})")
    lines += ["", "## Notes", ""] + [f"- {k}: {v}" for k, v in report["notes"].items()]
    lines.append(f"- total time: {report['seconds']:.0f} s on {s['device']}")
    reused = report.get("runs", {}).get("reused")
    if reused:
        total = sum(len(a["accuracies"]) for a in arms.values())
        lines.append(f"- resumed: {len(reused)} of {total} training runs were reused from an earlier, interrupted "
                     f"run of this experiment ({', '.join(reused)}); the total time counts this run only")
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, out: Path) -> dict:
    """Write the plots, report.md and report.json into ``out``; sets and returns ``report["files"]``."""
    out = Path(out)
    files = {"report_json": "report.json", "report_md": "report.md", "accuracy": "accuracy.png",
             "per_class": "per_class.png", "confusion": {arm: f"confusion_{SLUG.get(arm, arm)}.png" for arm in report["arms"]}}
    report["files"] = files
    accuracy_plot(report, out / files["accuracy"])
    per_class_plot(report, out / files["per_class"])
    for arm, f in files["confusion"].items():
        a = report["arms"][arm]
        confusion_plot(a["confusion_matrix"], report["class_names"],
                       f"{arm}: {100 * a['accuracy_mean']:.1f}% (counts summed over {len(a['accuracies'])} seed(s))",
                       out / f)
    (out / files["report_md"]).write_text(markdown(report))
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out / files["report_json"])
    return files
