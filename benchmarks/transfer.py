"""Freezing-stages study, small: ResNet-18/34/50 with ``trainable_layers=3`` on 100 images per class.

Shape of the study in the seed notes ("Choose the best ResNet for transfer learning"): 10 classes,
100 training images per class, TRAINABLE_LAYERS = 3 (layer3 + layer4 + fc), AdamW at 1e-3,
train/val accuracy per epoch for each architecture. Here: scikit-learn's handwritten digits
(10 classes, 100 train per class, the remaining ~78 per class for validation) at 32 px, because no
ImageNet weights can be downloaded on the machine this runs on.

Weights: ``--weights random`` (default) starts every model from random init; stem, layer1 and
layer2 then stay frozen *at random values* (that is what "trainable layers 3" means without a
pretrained file), so the numbers measure how well the upper stages learn on top of fixed random
features, not ImageNet transfer. ``--weights DIR`` takes ``DIR/<model>.pth`` files instead (e.g.
real ImageNet weights copied over, or weights pre-trained elsewhere). The JSON says which was used.

The loop is the product's pieces without the run-folder machinery: ``create_resnet`` (freezing,
frozen BatchNorm in eval mode), timm AdamW, bf16 autocast + channels_last on CPU.

    python benchmarks/transfer.py --epochs 3 --out benchmarks/results/transfer.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe_machine
from PIL import Image

from launcher.models import create_resnet, model_info
from launcher.models.optim import create_optimizer


def digits(size: int, per_class_train: int, seed: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    data = load_digits()
    images = np.stack([np.asarray(Image.fromarray((a * 255 / 16).clip(0, 255).astype(np.uint8), mode="L")
                                  .resize((size, size), Image.Resampling.BICUBIC).convert("RGB")) for a in data.images])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    y = torch.from_numpy(data.target).long()
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(data.target == label))
        train += idx[:per_class_train].tolist()
        val += idx[per_class_train:].tolist()
    return x[train], y[train], x[val], y[val]


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> float:
    model.eval()
    hits = 0
    for start in range(0, len(x), 256):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hits += int((model(x[start:start + 256].contiguous(memory_format=torch.channels_last)).argmax(1)
                         == y[start:start + 256]).sum())
    return 100.0 * hits / len(x)


def run_model(name: str, data: tuple[torch.Tensor, ...], args: argparse.Namespace) -> dict:
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(args.seed)
    weights = None if args.weights == "random" else str(Path(args.weights) / f"{name}.pth")
    model = create_resnet(name, 10, pretrained=weights, trainable_layers=args.trainable_layers)
    model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(model, "adamw", args.lr, 0.01)
    epochs, start = [], time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train))
        for first in range(0, len(order) - args.batch_size + 1, args.batch_size):
            batch = order[first:first + args.batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(x_train[batch].contiguous(memory_format=torch.channels_last))
            loss = torch.nn.functional.cross_entropy(logits.float(), y_train[batch])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        row = {"epoch": epoch + 1, "train_acc": accuracy(model, x_train, y_train, args.bf16),
               "val_acc": accuracy(model, x_val, y_val, args.bf16), "seconds": time.perf_counter() - start}
        print(f"{name} epoch {epoch + 1}/{args.epochs}: train {row['train_acc']:.1f}%  val {row['val_acc']:.1f}%  "
              f"({row['seconds']:.0f} s)", flush=True)
        epochs.append(row)
    info = model_info(model)
    return {"model": name, "params": info["params"], "trainable_params": info["trainable_params"],
            "final_val_acc": epochs[-1]["val_acc"], "best_val_acc": max(r["val_acc"] for r in epochs),
            "final_train_acc": epochs[-1]["train_acc"], "epochs": epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--weights", default="random", help="'random' or a folder with <model>.pth files")
    parser.add_argument("--trainable-layers", default="3")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--note", default="", help="free text stored with the machine (e.g. how busy it was)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/transfer.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = digits(args.img_size, args.per_class, args.seed)
    results: list[dict] = []
    for name in args.models:  # the JSON is rewritten after each model, so a cut-short run keeps its numbers
        results.append(run_model(name, data, args))
        write_report(args, data, results)


def write_report(args: argparse.Namespace, data: tuple[torch.Tensor, ...], results: list[dict]) -> None:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    report = {
        "benchmark": "transfer: trainable_layers study (shape of the seed-003 experiment)",
        "dataset": f"sklearn digits, 10 classes, {args.per_class} train/class ({len(data[0])}), "
                   f"{len(data[2])} validation, {args.img_size}px RGB",
        "weights": ("random init (no pretrained weights available offline): frozen stages hold random features"
                    if args.weights == "random" else f"local files {args.weights}/<model>.pth"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": describe_machine() | {"load_average_at_end": load, "note": args.note},
        "models_requested": args.models,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
