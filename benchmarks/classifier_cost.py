"""Seconds per training epoch of the evaluation classifiers on full CIFAR-10 (50,000 images).

    python benchmarks/classifier_cost.py [--threads 1] [--batches 20] [--device cpu] [--cnn-widths 16,32,64]

Times ``--batches`` optimisation steps (after 2 warm-up steps) of each classifier with its default
training recipe on random uint8 images, then extrapolates to one epoch (50,000 // batch size
steps) and to one test-set pass.  Prints one JSON line per classifier.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from training.classifiers import (_autocast, augment, build_classifier, count_parameters, default_train_settings,
                                  predict)
from training.data import to_model_range

TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000


def time_steps(kind: str, width: int | None, batches: int, device: torch.device) -> dict:
    s = default_train_settings(kind)
    model = build_classifier(kind, 10, width).to(device).train()
    opt = (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True) if s.optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-3))
    g = torch.Generator().manual_seed(0)
    x_all = torch.randint(0, 256, (s.batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    y_all = torch.randint(0, 10, (s.batch_size,), device=device)

    def step() -> None:
        x = augment(to_model_range(x_all), g, s.crop, s.flip)
        with _autocast(device):  # as train_classifier trains (bf16 on a GPU)
            loss = F.cross_entropy(model(x).float(), y_all, label_smoothing=s.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(batches):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / batches
    x_eval = x_all.repeat(-(-1000 // len(x_all)), 1, 1, 1)[:1000]  # 1000 images, whatever the batch
    t0 = time.perf_counter()
    predict(model, x_eval, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_image_eval = (time.perf_counter() - t0) / len(x_eval)
    return {"classifier": kind, "width": model.width, "params": count_parameters(model), "batch_size": s.batch_size,
            "timed_steps": batches, "s_per_step": round(per_step, 4),
            "s_per_epoch": round(per_step * (TRAIN_IMAGES // s.batch_size), 1),
            "s_per_test_pass": round(per_image_eval * TEST_IMAGES, 1),
            "threads": torch.get_num_threads(), "device": str(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cnn-widths", default="16,32")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(json.dumps(time_steps("mlp", None, a.batches * 10, device)), flush=True)
    for w in a.cnn_widths.split(","):
        print(json.dumps(time_steps("cnn", int(w), a.batches, device)), flush=True)


if __name__ == "__main__":
    main()
