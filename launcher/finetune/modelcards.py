"""Model-card parameters and dataset-aware advice for fine-tuning ResNets (`launcher recommend`).

The ResNet-18 and ResNet-101 cards define five user-facing parameters (Training Images, Batch Size,
Epochs, Learning Rate, Eval Steps), with a default and an allowed range each, plus advice by dataset
size and GPU memory. Those two are copied here as written. ResNet-34, -50 and -152 have no card; they
are derived "by the same logic", which the cards themselves state:

* Capacity decides how much data a model needs: ResNet-18 is at home from 100 images, ResNet-101
  needs 2,000 (5,000+ optimal) and the cards send users to ResNet-50 between 1,000 and 5,000. So the
  minimum is 100 (R18), 300 (R34), 1,000 (R50), 2,000 (R101), 5,000 (R152), and the size tiers sit
  at roughly the same multiples of each model's minimum.
* Deeper networks need gentler steps ("deep network needs careful tuning"): the LR ceiling falls
  from 1e-3 (R18) to 1e-4 (R101); R34 gets 5e-4, R50 3e-4, R152 keeps R101's 1e-4. Every card's
  default is 5e-5.
* Lighter models need more epochs on small data: the epoch ceiling falls from 50 (R18) to 20 (R101);
  R34 gets 40, R50 30, R152 20. Every default is 1 epoch, as on both cards.
* Memory bounds the batch: the batch ceiling is what fits the card's largest GPU tier (R18: 128 on
  16 GB+, R101: 32 on 24 GB+), scaled by training activation memory per image (R34 ~1.5x R18,
  R50 ~2.5x, R152 ~1.4x R101): R34 96, R50 64, R152 24. Bottleneck models keep R101's floor of 2
  (BatchNorm statistics from one image are noise); basic-block models keep R18's floor of 1. The
  default is the batch that fits the card's minimum GPU: 8 for R18/R34/R50, 4 for R101/R152.

Eval Steps ("evaluation frequency", default 1) is read as: evaluate on the validation split every N
epochs, and always after the last epoch. Its range is 1 to the model's epoch ceiling.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


class CardRangeError(ValueError):
    """A parameter outside the model card's allowed range (pass --force to accept it)."""


@dataclass(frozen=True)
class Param:
    default: float
    low: float
    high: float

    def describe(self) -> str:
        return f"{_fmt(self.low)}..{_fmt(self.high)} (card default {_fmt(self.default)})"


@dataclass(frozen=True)
class SizeTier:
    """The card's configuration for datasets with at most ``max_images`` images (None: no upper end)."""

    name: str
    max_images: int | None
    lr: float
    epochs: tuple[int, int]
    batch_size: tuple[int, int]
    augmentation: str  # light | standard | heavy | maximum
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class MemoryTier:
    min_gib: float
    batch_size: tuple[int, int]


@dataclass(frozen=True)
class ModelCard:
    name: str
    title: str
    params_m: float
    source: str  # "card" (copied from a model card) or "derived" (same logic, documented above)
    min_images: int
    min_per_class: int
    batch_size: Param
    epochs: Param
    lr: Param
    eval_steps: Param
    tiers: tuple[SizeTier, ...]
    memory: tuple[MemoryTier, ...]
    min_gpu_gib: float
    cpu: str
    cpu_batch: tuple[int, int]
    params: dict[str, Param] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", {"batch_size": self.batch_size, "epochs": self.epochs,
                                            "lr": self.lr, "eval_steps": self.eval_steps})

    def tier_for(self, num_images: int) -> SizeTier:
        for tier in self.tiers:
            if tier.max_images is None or num_images < tier.max_images:
                return tier
        return self.tiers[-1]


def _card(name: str, title: str, params_m: float, source: str, min_images: int, min_per_class: int,
          batch: tuple[int, int, int], epochs: tuple[int, int, int], lr: tuple[float, float, float],
          tiers: tuple[SizeTier, ...], memory: tuple[MemoryTier, ...], min_gpu_gib: float, cpu: str,
          cpu_batch: tuple[int, int]) -> ModelCard:
    return ModelCard(name, title, params_m, source, min_images, min_per_class, Param(*batch), Param(*epochs),
                     Param(*lr), Param(1, 1, epochs[2]), tiers, memory, min_gpu_gib, cpu, cpu_batch)


CARDS: dict[str, ModelCard] = {card.name: card for card in (
    _card("resnet18", "ResNet-18", 11.7, "card", 100, 10, (8, 1, 128), (1, 1, 50), (5e-5, 1e-5, 1e-3), (
        SizeTier("tiny", 100, 1e-5, (30, 50), (4, 4), "maximum",
                 ("still may want to consider classical ML methods",)),
        SizeTier("small", 1_000, 5e-5, (15, 25), (8, 16), "heavy", ("optimal model for this range",)),
        SizeTier("medium", 10_000, 5e-5, (5, 15), (32, 32), "standard",
                 ("consider ResNet-50 if accuracy is more important than speed",)),
        SizeTier("large", None, 1e-4, (3, 10), (64, 64), "light",
                 ("acceptable but not optimal: consider ResNet-50 unless speed is paramount",))),
        (MemoryTier(4, (8, 16)), MemoryTier(8, (32, 64)), MemoryTier(16, (64, 128))), 2,
        "viable (5-15x slower than a GPU), practical for datasets under 1,000 images", (4, 8)),
    _card("resnet34", "ResNet-34", 21.8, "derived", 300, 15, (8, 1, 96), (1, 1, 40), (5e-5, 1e-5, 5e-4), (
        SizeTier("tiny", 300, 1e-5, (25, 40), (4, 8), "maximum",
                 ("consider ResNet-18",)),
        SizeTier("small", 3_000, 5e-5, (12, 20), (8, 16), "heavy", ()),
        SizeTier("medium", 15_000, 5e-5, (5, 12), (32, 32), "standard",
                 ("consider ResNet-50 if accuracy is more important than speed",)),
        SizeTier("large", None, 1e-4, (3, 8), (64, 64), "light", ("consider ResNet-50 or deeper",))),
        (MemoryTier(4, (8, 8)), MemoryTier(8, (16, 32)), MemoryTier(16, (48, 96))), 3,
        "usable but about 2x slower than ResNet-18, practical for datasets under 500 images", (4, 8)),
    _card("resnet50", "ResNet-50", 25.6, "derived", 1_000, 30, (8, 2, 64), (1, 1, 30), (5e-5, 1e-5, 3e-4), (
        SizeTier("tiny", 1_000, 1e-5, (15, 30), (8, 8), "maximum",
                 ("consider ResNet-18",)),
        SizeTier("small", 5_000, 3e-5, (10, 20), (8, 16), "heavy", ("monitor closely for overfitting",)),
        SizeTier("medium", 20_000, 5e-5, (5, 10), (32, 32), "standard", ("optimal range",)),
        SizeTier("large", None, 1e-4, (2, 5), (64, 64), "light",
                 ("consider ResNet-101 for maximum CNN accuracy",))),
        (MemoryTier(8, (8, 16)), MemoryTier(16, (16, 32)), MemoryTier(24, (32, 64))), 6,
        "slow (hours per epoch beyond a few thousand images); only for small experiments", (2, 8)),
    _card("resnet101", "ResNet-101", 44.5, "card", 2_000, 50, (4, 2, 32), (1, 1, 20), (5e-5, 1e-5, 1e-4), (
        SizeTier("tiny", 2_000, 1e-5, (10, 15), (8, 8), "maximum",
                 ("consider ResNet-50",)),
        SizeTier("small", 5_000, 2e-5, (10, 15), (8, 8), "heavy",
                 ("use cautiously: consider ResNet-50 instead", "monitor closely for overfitting")),
        SizeTier("medium", 20_000, 5e-5, (5, 8), (16, 16), "standard",
                 ("optimal range: expect 2-3% over ResNet-50",)),
        SizeTier("large", 100_000, 1e-4, (3, 5), (16, 32), "light", ("ResNet-101 excels here",)),
        SizeTier("very large", None, 1e-4, (1, 3), (16, 32), "light",
                 ("consider ViT Large for maximum accuracy; ResNet-101 still wins on inference speed",))),
        (MemoryTier(8, (4, 8)), MemoryTier(16, (8, 16)), MemoryTier(24, (16, 32))), 10,
        "not recommended: extremely slow (days for one epoch of a large dataset); a GPU is required", (2, 4)),
    _card("resnet152", "ResNet-152", 60.2, "derived", 5_000, 100, (4, 2, 24), (1, 1, 20), (5e-5, 1e-5, 1e-4), (
        SizeTier("tiny", 5_000, 1e-5, (8, 12), (8, 8), "maximum",
                 ("consider ResNet-101 or ResNet-50",)),
        SizeTier("small", 20_000, 2e-5, (8, 12), (8, 8), "heavy", ("monitor closely for overfitting",)),
        SizeTier("medium", 100_000, 5e-5, (3, 8), (16, 16), "standard",
                 ("often only marginally better than ResNet-101",)),
        SizeTier("large", None, 1e-4, (1, 3), (16, 24), "light", ())),
        (MemoryTier(12, (4, 8)), MemoryTier(24, (8, 16)), MemoryTier(40, (16, 24))), 12,
        "not recommended: extremely slow; a GPU is required", (2, 4)),
)}

PARAM_FLAGS = {"batch_size": "--batch-size", "epochs": "--epochs", "lr": "--lr", "eval_steps": "--eval-steps"}


def _fmt(value: float) -> str:
    """1e-3, 5e-5, 8, 0.5: learning rates in the cards' notation, counts as integers."""
    if value == 0 or abs(value) >= 1e-2:
        return f"{value:g}"
    text = f"{value:.0e}" if float(f"{value:.0e}") == value else f"{value:.1e}"
    return text.replace("e-0", "e-")


def get_card(model: str) -> ModelCard:
    """The card for ``model``: a plain name (``resnet50``) or a weights-qualified one (``resnet50.a1_in1k``)."""
    base = model.split(".", 1)[0].lower().removeprefix("tv_").replace("-", "")
    if base not in CARDS:
        raise ValueError(f"no model card for {model!r}; cards exist for {', '.join(CARDS)}")
    return CARDS[base]


def check_params(card: ModelCard, values: dict[str, float | None], *, force: bool = False) -> list[str]:
    """Check ``values`` (keys of ``card.params``; None = not given) against the card's ranges.

    Raises CardRangeError naming the parameter and its allowed range, unless ``force``: then the
    returned list holds one warning per out-of-range value.
    """
    problems = []
    for key, value in values.items():
        if value is None:
            continue
        param = card.params[key]
        if not param.low <= value <= param.high:
            problems.append(f"{PARAM_FLAGS[key]} {_fmt(value)} is outside the {card.title} card's range "
                            f"{param.describe()}")
    if problems and not force:
        raise CardRangeError("; ".join(problems) + " (pass --force to use it anyway)")
    return [f"{problem}; used anyway because of --force" for problem in problems]


# ---------------------------------------------------------------------------------------------- datasets


@dataclass
class DatasetStats:
    root: str
    kind: str  # "folder" or "shards"
    classes: list[str]
    train_counts: dict[str, int]
    val_counts: dict[str, int]

    @property
    def num_train(self) -> int:
        return sum(self.train_counts.values())

    @property
    def num_val(self) -> int:
        return sum(self.val_counts.values())

    @property
    def imbalance(self) -> float:
        """Largest over smallest class count in the training split (inf when a class is empty)."""
        counts = [self.train_counts.get(name, 0) for name in self.classes]
        if not counts:
            return 1.0
        return math.inf if min(counts) == 0 else max(counts) / min(counts)


def scan_dataset(path: str | Path) -> DatasetStats:
    """Count images per class in a class-folder tree (optionally with train/ and val/ subfolders, the
    same layouts the data layer reads) or a shardify output folder (reads its ``_info.json``)."""
    from launcher.data.folders import SourceError, plan_source

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    info_file = root / "_info.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        counts = info.get("class_counts", {})
        return DatasetStats(str(root), "shards", list(info["classes"]), dict(counts.get("train", {})),
                            dict(counts.get("validation", {})))
    try:
        plan = plan_source(root, val_fraction=0.0, seed=0)
    except SourceError as error:
        raise ValueError(str(error)) from None
    counts = {split: dict.fromkeys(plan.classes, 0) for split in ("train", "validation")}
    for split, files in plan.splits.items():
        for file in files:
            if Path(file.relpath).suffix.lower() in IMAGE_EXTENSIONS:
                counts[split][plan.classes[file.label]] += 1
    if sum(counts["train"].values()) == 0:
        raise ValueError(f"{root} holds no images in class subfolders (expected {root}/<class>/<image>)")
    return DatasetStats(str(root), "folder", list(plan.classes), counts["train"],
                        counts["validation"] if "validation" in plan.splits else {})


# ---------------------------------------------------------------------------------------------- advice


@dataclass
class Advice:
    model: str
    tier: SizeTier
    lr: float
    epochs: int
    batch_size: int
    augmentation: str
    class_weights: str | None
    lines: list[str]


def advise(card: ModelCard, stats: DatasetStats) -> Advice:
    """The card's configuration for this dataset, with the reasons, as applied by ``finetune --auto``."""
    n = stats.num_train
    tier = card.tier_for(n)
    bound = "" if tier.max_images is None else f" (< {tier.max_images:,} images)"
    lines = [f"{card.title}: {n:,} training images -> {tier.name} dataset{bound}"]
    if n < card.min_images:
        lines.append(f"  - below the card's minimum of {card.min_images:,} images: overfitting likely")
    lines += [f"  - {note}" for note in tier.notes]
    # Midpoint of the card's epoch range: early stopping trims it when validation stops improving.
    epochs = int(round(sum(tier.epochs) / 2))
    batch = tier.batch_size[0]
    # A batch larger than half the training set leaves one optimizer step per epoch (drop-last).
    if n >= 2 and batch > n // 2:
        batch = max(int(card.batch_size.low), n // 2)
        lines.append(f"  - batch capped at {batch} so each epoch has at least two optimizer steps")
    lines.append(f"  - suggested: --lr {_fmt(tier.lr)} --epochs {epochs} (card: {tier.epochs[0]}-{tier.epochs[1]}) "
                 f"--batch-size {batch} --augment {tier.augmentation}")
    small = [name for name in stats.classes if stats.train_counts.get(name, 0) < card.min_per_class]
    if small:
        shown = ", ".join(f"{name} ({stats.train_counts.get(name, 0)})" for name in small[:5])
        more = f" and {len(small) - 5} more" if len(small) > 5 else ""
        lines.append(f"  - classes with fewer than {card.min_per_class} images: {shown}{more}")
    class_weights = None
    if stats.imbalance >= 3:
        class_weights = "balanced"
        lines.append(f"  - classes are imbalanced (largest/smallest = {stats.imbalance:.1f}): use "
                     "--class-weights balanced (weights the loss by inverse class frequency)")
    if stats.num_val == 0:
        lines.append("  - no val/ folder: a stratified share of the training images is held out for validation")
    return Advice(card.name, tier, tier.lr, epochs, batch, tier.augmentation, class_weights, lines)


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda" or "cpu"
    name: str
    memory_gib: float
    cpus: int


def detect_device() -> DeviceInfo:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return DeviceInfo("cuda", props.name, props.total_memory / 2**30, os.cpu_count() or 1)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = 0.0
    return DeviceInfo("cpu", "CPU", ram, os.cpu_count() or 1)


def memory_advice(card: ModelCard, device: DeviceInfo) -> list[str]:
    """Batch sizes that fit the device at 224 px; beyond them, --micro-batch splits the card's batch."""
    if device.kind == "cpu":
        return [f"device: CPU ({device.cpus} cores, {device.memory_gib:.0f} GiB RAM) - {card.title} on CPU is "
                f"{card.cpu}", f"  - card batch for CPU: {card.cpu_batch[0]}-{card.cpu_batch[1]}; smaller "
                "--img-size (e.g. 160 or 128) cuts time roughly with the pixel count"]
    lines = [f"device: {device.name} ({device.memory_gib:.0f} GiB)"]
    if device.memory_gib < card.min_gpu_gib:
        lines.append(f"  - below the card's minimum of {card.min_gpu_gib:g} GB: use a small --micro-batch, "
                     "mixed precision, or a lighter model")
    fitting = [tier for tier in card.memory if device.memory_gib + 0.5 >= tier.min_gib]
    tier = fitting[-1] if fitting else card.memory[0]
    lines.append(f"  - card batch for {tier.min_gib:g} GB+: {tier.batch_size[0]}-{tier.batch_size[1]} per GPU at "
                 "224 px; a larger --batch-size still works: set --micro-batch to what fits and the rest is "
                 "gradient accumulation (same optimization)")
    return lines


def recommendation_text(card: ModelCard, stats: DatasetStats, device: DeviceInfo) -> str:
    counts = [stats.train_counts.get(name, 0) for name in stats.classes]
    lines = [f"dataset: {stats.root} ({stats.kind}): {stats.num_train:,} training images, "
             f"{stats.num_val:,} validation images, {len(stats.classes)} classes",
             f"per class: min {min(counts)}, max {max(counts)}, mean {sum(counts) / len(counts):.1f}"]
    lines += advise(card, stats).lines
    lines += memory_advice(card, device)
    if card.source == "derived":
        lines.append(f"note: {card.title} has no model card; its numbers are derived from the ResNet-18 and "
                     "ResNet-101 cards (see docs/finetune.md)")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launcher recommend", description=(
        "Count images, classes and class balance of a dataset and print the model card's advice for "
        "its size, plus batch-size guidance for this machine's GPU (or CPU)."))
    parser.add_argument("data", help="class-folder tree (optionally with train/ and val/) or a shardify folder")
    parser.add_argument("--model", default="resnet18", help=f"one of {', '.join(CARDS)} (default resnet18)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON instead of text")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        card = get_card(args.model)
        stats = scan_dataset(args.data)
    except (ValueError, FileNotFoundError) as error:
        print(f"launcher recommend: {error}", file=sys.stderr)
        return 2
    device = detect_device()
    if args.json:
        advice = advise(card, stats)
        print(json.dumps({"model": card.name, "num_train": stats.num_train, "num_val": stats.num_val,
                          "classes": stats.classes, "train_counts": stats.train_counts,
                          "tier": advice.tier.name, "lr": advice.lr, "epochs": advice.epochs,
                          "batch_size": advice.batch_size, "augmentation": advice.augmentation,
                          "class_weights": advice.class_weights, "advice": advice.lines,
                          "memory": memory_advice(card, device)}, indent=2))
    else:
        print(recommendation_text(card, stats, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
