"""Shared, cached fixtures for the fine-tuning tests: a locally pre-trained ResNet-18 and one fine-tuned run.

No weights can be downloaded here, so "pretrained" means: a ResNet-18 trained for a few epochs on
handwritten digits 0-4 (scikit-learn's scans at 32 px). Fine-tuning on digits 5-9 (classes the
backbone never saw) then shows transfer. Both are built once per test session under pytest's base
temp folder and reused by test_finetune.py, test_inference.py and test_export.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from launcher.data.sample_data import DIGIT_CLASSES, make_digits_tree

IMG_SIZE = 32
SOURCE_DIGITS = range(0, 5)
TARGET_DIGITS = range(5, 10)


def digits_tensor(digits: range, size: int = IMG_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as normalized float images, rendered exactly like make_digits_tree renders them."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    data = load_digits()
    keep = np.isin(data.target, list(digits))
    images = []
    for array in data.images[keep]:
        gray = (array * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        images.append(np.asarray(image))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return x, torch.from_numpy(data.target[keep] - min(digits)).long()


def pretrained_weights(base: Path) -> Path:
    """A torchvision-keyed ResNet-18 state_dict trained on digits 0-4 (5-way head), cached under ``base``."""
    path = base / "pretrained_digits04_resnet18.pth"
    if path.is_file():
        return path
    import timm

    torch.manual_seed(0)
    x, y = digits_tensor(SOURCE_DIGITS)
    model = timm.create_model("resnet18", num_classes=len(SOURCE_DIGITS))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    model.train()
    for _ in range(4):
        order = torch.randperm(len(x))
        for start in range(0, len(x) - 63, 64):
            batch = order[start:start + 64]
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return path


def target_tree(root: Path, per_class: int = 40) -> Path:
    """Digits 5-9 as a class-folder tree of PNGs (no val/ folder: finetune holds out 20 %)."""
    if root.is_dir():
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    make_digits_tree(tmp, size=IMG_SIZE, per_class=per_class, seed=1)
    for digit in SOURCE_DIGITS:
        shutil.rmtree(tmp / DIGIT_CLASSES[digit])
    tmp.rename(root)
    return root


# Linear-probe style transfer (fc only): cheap on CPU, and the frozen-stage checks cover the whole backbone.
# Digits are centered 8x8 scans: no flips (a mirrored digit is another symbol) and no random crops (a
# crop cuts strokes off). LR 3e-3 is above the card's 1e-3, so --force is exercised too. Any
# `launcher train` option (--hflip, --scale, --ratio, ...) passes through.
FINETUNE_ARGS = ["--model", "resnet18", "--trainable-layers", "1", "--epochs", "8", "--eval-steps", "2",
                 "--batch-size", "16", "--lr", "3e-3", "--force", "--img-size", str(IMG_SIZE), "--hflip", "0",
                 "--scale", "1", "1", "--ratio", "1", "1", "--workers", "1", "--patience", "0", "--no-progress",
                 "--seed", "0"]


def finetuned_run(base: Path) -> tuple[Path, Path, Path]:
    """(run folder, weights file, data tree) of one `launcher finetune` run, made once per session."""
    from launcher.finetune.command import main

    weights = pretrained_weights(base)
    data = target_tree(base / "digits59")
    output = base / "runs" / "finetune-digits59"
    if not (output / "summary.json").is_file():
        shutil.rmtree(output, ignore_errors=True)
        code = main([str(data), "--weights", str(weights), "--output", str(output), *FINETUNE_ARGS])
        assert code == 0, f"launcher finetune exited with {code}"
    assert json.loads((output / "summary.json").read_text())["best_top1"] is not None
    return output, weights, data
