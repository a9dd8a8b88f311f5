"""`launcher finetune ./imgs --model resnet18`: fine-tune a pretrained ResNet on a small class-folder tree.

The run is an ordinary training run of the shared engine (same run folder, checkpoints and
``summary.json``); this module only decides the configuration and guards it:

1. Start from the model card (:mod:`launcher.finetune.modelcards`): batch size (the *global* batch; the engine
   splits it into micro-batches with gradient accumulation), epochs, learning rate, Eval Steps.
   ``--auto`` replaces them with the card's advice for the dataset's size. Explicit flags win; values
   outside the card's range are refused unless ``--force``.
2. Fine-tuning recipe: AdamW, cross-entropy with label smoothing 0.1, cosine decay per update,
   light augmentation (random-resized crop of 50-100 % of the image + flip; ``--augment`` or the
   card's advice raise it up to RandAugment + mixup/cutmix), no repeated augmentation.
3. A validation split is always there: a ``val/`` folder if the tree has one, else a seeded,
   stratified hold-out (``--val-fraction``, default 0.2) made of symlinks, so early stopping
   (``--patience`` evaluations without a better top-1) and ``best.pt`` (best validation top-1) work.
4. After training, ``best.pt`` is evaluated on the training images too: a large train/val gap is
   reported as overfitting, low accuracy on both as underfitting, with the card's remedies.

Every ``launcher train`` option (``--img-size``, ``--micro-batch``, ``--workers``, ``--device``,
``--class-weights``, ...) is accepted as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launcher.config import ConfigError, TrainConfig, parse_config
from launcher.config import build_parser as build_config_parser
from launcher.finetune.modelcards import (
    CardRangeError,
    DatasetStats,
    ModelCard,
    advise,
    check_params,
    get_card,
    scan_dataset,
)

# The augmentation levels the cards speak of, as training-config fields.
AUGMENT_LEVELS: dict[str, dict[str, Any]] = {
    "light": dict(scale=(0.5, 1.0), hflip=0.5, auto_augment=None, mixup=0.0, cutmix=0.0),
    "standard": dict(scale=(0.25, 1.0), hflip=0.5, auto_augment=None, mixup=0.0, cutmix=0.0),
    "heavy": dict(scale=(0.2, 1.0), hflip=0.5, auto_augment="rand-m7-mstd0.5-inc1", mixup=0.0, cutmix=0.0),
    "maximum": dict(scale=(0.08, 1.0), hflip=0.5, auto_augment="rand-m9-mstd0.5-inc1", mixup=0.2, cutmix=1.0),
}
DEFAULT_WEIGHTS = "DEFAULT"  # torchvision's best ImageNet weights for the architecture
DEFAULT_PATIENCE = 5
DEFAULT_VAL_FRACTION = 0.2
OVERFIT_GAP = 15.0  # top-1 points between training and validation images
UNDERFIT_TOP1 = 70.0  # top-1 (%) on the training images themselves
DIAGNOSE_MAX_IMAGES = 20_000  # one extra pass over at most this many training images


def finetune_config(model: str = "resnet18", *, data: str = "", weights: str | None = DEFAULT_WEIGHTS) -> TrainConfig:
    """The fine-tuning recipe with the model card's defaults (what `launcher finetune` starts from)."""
    card = get_card(model)
    epochs = int(card.epochs.default)
    return TrainConfig(
        recipe="finetune", data=data, model=card.name, pretrained=weights, trainable_layers="all",
        epochs=epochs, global_batch=int(card.batch_size.default), micro_batch=0,
        opt="adamw", lr=card.lr.default, lr_ref_batch=0, weight_decay=0.05,
        warmup_epochs=_warmup_epochs(epochs), warmup_lr=card.lr.default / 10, min_lr=card.lr.default / 100,
        sched_on_updates=True, loss="ce", bce_target_thresh=None, smoothing=0.1,
        aug_repeats=0, drop_path=0.0, crop_pct=0.95, interpolation="bicubic", img_size=224,
        **AUGMENT_LEVELS["light"],
        eval_every=int(card.eval_steps.default), early_stop_patience=DEFAULT_PATIENCE, keep_checkpoints=0,
        workers=min(4, os.cpu_count() or 1), log_every=10,
    )


def _warmup_epochs(epochs: int) -> int:
    return 1 if epochs >= 10 else 0


# ---------------------------------------------------------------------------------------------- data


def make_validation_split(data: str | Path, *, val_fraction: float, seed: int, cache_root: Path) -> Path:
    """A ``train/`` + ``val/`` view of a class-folder tree, made of symlinks (hard links or copies where
    symlinks are not allowed), stratified and seeded exactly like ``shardify --val-fraction``.

    The folder name hashes the file list, fraction and seed, so every rank of a multi-process run (and
    every re-run) finds the same split; it is built in a temporary folder and renamed into place.
    """
    from launcher.data.folders import SourceError, plan_source

    root = Path(data).resolve()
    try:
        plan = plan_source(root, val_fraction=val_fraction, seed=seed)
    except SourceError as error:
        raise ConfigError(str(error)) from None
    files = {split: [(f.path, _inside_class(f.relpath, plan.classes[f.label]), plan.classes[f.label])
                     for f in plan.splits.get(split, [])] for split in ("train", "validation")}
    key = json.dumps([str(root), val_fraction, seed, sorted(f[0] for f in files["train"] + files["validation"])])
    target = cache_root / f"{root.name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if (target / "split.json").is_file():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_root))
    for split, folder in (("train", "train"), ("validation", "val")):
        for source, inner, name in files[split]:
            link = building / folder / name / inner
            link.parent.mkdir(parents=True, exist_ok=True)
            _link(Path(source).resolve(), link)
    counts = {split: {name: sum(1 for f in entries if f[2] == name) for name in plan.classes}
              for split, entries in files.items()}
    (building / "split.json").write_text(json.dumps({
        "source": str(root), "val_fraction": val_fraction, "seed": seed, "counts": counts,
        "validation_files": [os.path.relpath(f[0], root) for f in files["validation"]]}, indent=1) + "\n")
    try:
        os.rename(building, target)
    except OSError:  # another rank (or run) published the same split first
        shutil.rmtree(building, ignore_errors=True)
    return target


def _inside_class(relpath: str, class_name: str) -> Path:
    """The part of a relative path below its class folder (``train/cat/x.jpg`` -> ``x.jpg``)."""
    parts = Path(relpath).parts
    return Path(*parts[parts.index(class_name) + 1:]) if class_name in parts[:-1] else Path(parts[-1])


def _link(source: Path, link: Path) -> None:
    try:
        link.symlink_to(source)
    except OSError:
        try:
            os.link(source, link)
        except OSError:
            shutil.copy2(source, link)


# ---------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launcher finetune", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a pretrained ResNet on a class-folder tree (or shards) with the model card's "
                    "parameters.",
        epilog="Every `launcher train` option is accepted too (e.g. --img-size 160 --micro-batch 4 --workers 2 "
               "--device cpu --class-weights balanced); see `launcher train --help`. Eval Steps = evaluate every "
               "N epochs (and after the last).")
    parser.add_argument("data", nargs="?", help="class-folder tree (optionally train/ + val/), or a shard folder")
    parser.add_argument("--data", dest="data_flag", default=None, help="same as the positional argument")
    parser.add_argument("--model", default=None, help="resnet18/34/50/101/152, or a timm name like resnet50.a1_in1k "
                                                      "(default: resnet18, or the recipe's)")
    parser.add_argument("--weights", default=None,
                        help="pretrained weights: torchvision name (DEFAULT, IMAGENET1K_V1, ...), timm name "
                             "(resnet50.a1_in1k), a local file (.pth/.safetensors), or 'none' (random init)")
    parser.add_argument("--trainable-layers", default=None, help="1 = fc, 2 = layer4+fc, 3 = layer3+, ..., all")
    parser.add_argument("--batch-size", type=int, default=None, help="card's Batch Size = global batch per step")
    parser.add_argument("--epochs", type=int, default=None, help="card's Epochs")
    parser.add_argument("--lr", type=float, default=None, help="card's Learning Rate (AdamW)")
    parser.add_argument("--eval-steps", type=int, default=None, help="card's Eval Steps: evaluate every N epochs")
    parser.add_argument("--patience", type=int, default=None,
                        help=f"early stop after N evaluations without a better val top-1 (0 = off, default "
                             f"{DEFAULT_PATIENCE})")
    parser.add_argument("--augment", choices=sorted(AUGMENT_LEVELS), default=None,
                        help="augmentation level (default light; --auto uses the card's advice)")
    parser.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help="share of each class held out for validation when the tree has no val/ folder")
    parser.add_argument("--auto", action="store_true", help="apply the card's advice for this dataset's size")
    parser.add_argument("--force", action="store_true", help="accept values outside the card's ranges (warns)")
    parser.add_argument("--no-diagnose", dest="diagnose", action="store_false",
                        help="skip the train/val gap check after training")
    return parser


def _split_train_flags(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `launcher train` flags (with their values) from finetune's own arguments.

    argparse's parse_known_args cannot know that an unknown ``--output /x`` takes a value and would hand
    ``/x`` to the positional data argument; the training config's parser knows how many values each takes.
    """
    own_flags = {flag for action in parser._actions for flag in action.option_strings}
    arity = {flag: action.nargs for action in build_config_parser(TrainConfig())._actions
             for flag in action.option_strings}
    own: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        flag = token.split("=", 1)[0]
        index += 1
        if not token.startswith("--") or flag in own_flags or flag not in arity:
            own.append(token)  # unknown flags stay here so argparse reports them by name
            continue
        rest.append(token)
        nargs = arity[flag]
        if "=" in token or nargs == 0:
            continue
        count = nargs if isinstance(nargs, int) else 1 if nargs in (None, "?") else len(argv)
        while count and index < len(argv) and not argv[index].startswith("--"):
            rest.append(argv[index])
            index += 1
            count -= 1
    return own, rest


@dataclasses.dataclass
class Plan:
    cfg: TrainConfig
    card: ModelCard
    stats: DatasetStats
    notes: list[str]
    diagnose: bool
    source_data: str


def plan_run(argv: Sequence[str], base: TrainConfig | None = None) -> Plan:
    """Command line -> resolved config (card defaults <- --auto advice <- explicit flags), checked."""
    parser = build_parser()
    own, rest = _split_train_flags(parser, list(argv))
    args = parser.parse_args(own)
    data = args.data_flag or args.data or (base.data if base else "")
    if not data:
        raise ConfigError("no dataset given: launcher finetune ./imgs (a folder with one subfolder per class)")
    model, weights = args.model or (base.model if base else "resnet18"), args.weights
    if "." in model:  # resnet50.a1_in1k: architecture + timm weights
        weights = weights or model
        model = model.split(".", 1)[0]
    card = get_card(model)
    cfg = finetune_config(card.name, data=str(data))
    if base is not None and base.model == card.name:  # a recipe file's RECIPE, for its own model
        cfg = dataclasses.replace(base, data=str(data))
    if weights is not None:
        cfg = dataclasses.replace(cfg, pretrained=None if weights.lower() in ("none", "random", "") else weights)
    try:
        stats = scan_dataset(data) if Path(data).is_dir() else None
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"data={data!r}: {error}") from None
    notes: list[str] = []
    if stats is None:
        raise ConfigError(f"data={data!r}: finetune reads a local class-folder tree or shard folder")
    advice = advise(card, stats)
    changes: dict[str, Any] = {}
    if args.auto:
        changes.update(global_batch=advice.batch_size, epochs=advice.epochs, lr=advice.lr,
                       **AUGMENT_LEVELS[advice.augmentation])
        if advice.class_weights:
            changes["class_weights"] = advice.class_weights
        notes.append(f"--auto: {advice.tier.name} dataset -> batch {advice.batch_size}, {advice.epochs} epochs, "
                     f"lr {advice.lr:g}, {advice.augmentation} augmentation"
                     + (", class-weighted loss" if advice.class_weights else ""))
    explicit = {"global_batch": args.batch_size, "epochs": args.epochs, "lr": args.lr, "eval_every": args.eval_steps,
                "early_stop_patience": args.patience, "trainable_layers": args.trainable_layers}
    changes.update({key: value for key, value in explicit.items() if value is not None})
    if args.augment:
        changes.update(AUGMENT_LEVELS[args.augment])
    cfg = dataclasses.replace(cfg, **changes)
    cfg = dataclasses.replace(cfg, warmup_epochs=_warmup_epochs(cfg.epochs), warmup_lr=cfg.lr / 10,
                              min_lr=cfg.lr / 100)
    try:
        notes += check_params(card, {"batch_size": cfg.global_batch, "epochs": cfg.epochs, "lr": cfg.lr,
                                     "eval_steps": cfg.eval_every}, force=args.force)
    except CardRangeError as error:
        raise ConfigError(str(error)) from None
    if not args.auto and stats.num_train and cfg.epochs < advice.tier.epochs[0]:
        notes.append(f"{cfg.epochs} epoch(s) is below the card's advice for {stats.num_train} images: "
                     f"{advice.tier.epochs[0]}-{advice.tier.epochs[1]} (use --auto or --epochs)")
    cfg = parse_config(rest, cfg, prog="launcher finetune")  # every launcher-train option, validated
    if cfg.mixup or cfg.cutmix:
        cfg = dataclasses.replace(cfg, micro_batch=cfg.micro_batch if cfg.micro_batch % 2 == 0 else 0)
    cfg = _with_validation_split(cfg, stats, args.val_fraction, notes)
    return Plan(cfg, card, stats, notes, args.diagnose, str(data))


def _with_validation_split(cfg: TrainConfig, stats: DatasetStats, val_fraction: float, notes: list[str]) -> TrainConfig:
    if stats.num_val:
        return cfg
    if stats.kind == "shards":
        notes.append("the shards have no validation split: no early stopping and no best.pt "
                     "(re-run shardify with --val-fraction 0.1)")
        return cfg
    if val_fraction <= 0:
        notes.append("--val-fraction 0: no validation, no early stopping and no best.pt")
        return cfg
    if not 0 < val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    cache = (Path(cfg.output).parent if cfg.output else Path("runs")) / ".splits"
    split = make_validation_split(cfg.data, val_fraction=val_fraction, seed=cfg.seed, cache_root=cache)
    counts = json.loads((split / "split.json").read_text())["counts"]
    held = sum(counts["validation"].values())
    notes.append(f"no val/ folder: {held} images ({val_fraction:.0%} of each class, seed {cfg.seed}) held out "
                 f"for validation -> {split}")
    stats.train_counts = counts["train"]
    stats.val_counts = counts["validation"]
    return dataclasses.replace(cfg, data=str(split))


def imbalance_report(stats: DatasetStats, cfg: TrainConfig) -> list[str]:
    counts = {name: stats.train_counts.get(name, 0) for name in stats.classes}
    lines = [f"classes: {len(counts)}; training images per class: min {min(counts.values())}, "
             f"max {max(counts.values())}, imbalance {stats.imbalance:.1f}x"]
    if stats.imbalance >= 3:
        largest = sorted(counts.items(), key=lambda item: item[1])
        lines.append("  smallest: " + ", ".join(f"{name} {n}" for name, n in largest[:5]))
        if cfg.class_weights == "none":
            lines.append("  imbalanced: consider --class-weights balanced (weights the loss by inverse class frequency)")
        else:
            lines.append("  compensating with a class-weighted loss (--class-weights balanced)")
    return lines


# ---------------------------------------------------------------------------------------------- after training


def diagnose(train_top1: float, val_top1: float, card: ModelCard, cfg: TrainConfig) -> list[str]:
    """The cards' "Common Issues": overfitting (large gap) and underfitting (both low), with their remedies."""
    gap = train_top1 - val_top1
    if gap > OVERFIT_GAP:
        smaller = {"resnet101": "ResNet-50", "resnet152": "ResNet-101", "resnet50": "ResNet-34 or ResNet-18",
                   "resnet34": "ResNet-18"}.get(card.name)
        remedies = ["stronger augmentation (--augment heavy or maximum)",
                    f"fewer epochs (try --epochs {max(1, cfg.epochs // 2)})",
                    f"a lower learning rate (--lr {card.lr.low:g})", "more training images"]
        if smaller:
            remedies.insert(0, f"a smaller model ({smaller})")
        return [f"WARNING overfitting: training images {train_top1:.1f}% vs validation {val_top1:.1f}% top-1 "
                f"(gap {gap:.1f} points > {OVERFIT_GAP:g}). Try: " + "; ".join(remedies)]
    if train_top1 < UNDERFIT_TOP1:
        higher_lr = min(card.lr.high, max(cfg.lr * 2, 1e-4))
        bigger = {"resnet18": "ResNet-50", "resnet34": "ResNet-50", "resnet50": "ResNet-101"}.get(card.name)
        remedies = [f"more epochs (try --epochs {min(int(card.epochs.high), cfg.epochs * 2)})",
                    "lighter augmentation (--augment light)", "check data quality and labels"]
        if higher_lr > cfg.lr:
            remedies.insert(1, f"a higher learning rate (--lr {higher_lr:g})")
        if bigger:
            remedies.append(f"more capacity ({bigger})")
        if cfg.trainable_layers != "all":
            remedies.insert(1, "more trainable layers (--trainable-layers all)")
        return [f"WARNING underfitting: only {train_top1:.1f}% top-1 on the training images and {val_top1:.1f}% on "
                f"validation. Try: " + "; ".join(remedies)]
    return [f"fit looks healthy: {train_top1:.1f}% top-1 on training images, {val_top1:.1f}% on validation "
            f"(gap {gap:.1f} points)"]


def _after_training(plan: Plan, summary: dict[str, Any]) -> dict[str, Any]:
    """Train-set accuracy of best.pt, the fit diagnosis, finetune.json, and a "finetune" entry in summary.json."""
    from launcher.inference.evaluate import evaluate_checkpoint

    output = Path(summary["output"])
    best = output / "checkpoints" / "best.pt"
    report: dict[str, Any] = {"card": plan.card.name, "card_source": plan.card.source, "data": plan.source_data,
                              "train_data": plan.cfg.data, "batch_size": plan.cfg.global_batch,
                              "epochs": plan.cfg.epochs, "lr": plan.cfg.lr, "eval_steps": plan.cfg.eval_every,
                              "notes": plan.notes, "diagnosis": []}
    if plan.diagnose and best.is_file() and summary.get("best_top1") is not None:
        if plan.stats.num_train <= DIAGNOSE_MAX_IMAGES:
            train_eval = evaluate_checkpoint(best, plan.cfg.data, split="train", batch_size=64,
                                             workers=min(plan.cfg.workers, 2), device=plan.cfg.device,
                                             output=output / "eval_train", progress=plan.cfg.progress)
            report["train_top1"] = train_eval["top1"]
            report["val_top1"] = summary["best_top1"]
            report["diagnosis"] = diagnose(train_eval["top1"], summary["best_top1"], plan.card, plan.cfg)
        else:
            report["diagnosis"] = [f"train/val gap not checked: more than {DIAGNOSE_MAX_IMAGES} training images"]
    (output / "finetune.json").write_text(json.dumps(report, indent=2) + "\n")
    summary_path = output / "summary.json"
    if summary_path.is_file():
        stored = json.loads(summary_path.read_text())
        stored["finetune"] = report
        summary_path.write_text(json.dumps(stored, indent=2) + "\n")
    summary["finetune"] = report
    return summary


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "not enough memory" in text


def _oom_advice(cfg: TrainConfig) -> str:
    micro = cfg.micro_batch or "the probed size"
    half = max(1, cfg.micro_batch // 2) if cfg.micro_batch else max(1, cfg.global_batch // 4)
    return (f"out of memory with micro-batch {micro} (global batch {cfg.global_batch}). Re-run with "
            f"--micro-batch {half}: gradient accumulation keeps the global batch of {cfg.global_batch}, so the "
            f"optimization is unchanged. Also possible: a smaller --img-size, --precision bf16, or a lighter model.")


def run(plan: Plan) -> dict[str, Any]:
    """Train with the engine, then check the fit. Raises ConfigError with advice on out-of-memory."""
    from launcher.train.loop import train

    try:
        summary = train(plan.cfg)
    except (RuntimeError, MemoryError) as error:
        if isinstance(error, MemoryError) or _is_out_of_memory(error):
            raise ConfigError(_oom_advice(plan.cfg)) from error
        raise
    if int(os.environ.get("RANK", "0")) == 0:
        summary = _after_training(plan, summary)
    return summary


def main(argv: Sequence[str] | None = None, base: TrainConfig | None = None) -> int:
    from launcher.models import WeightsUnavailableError
    from launcher.train.preemption import PREEMPTED_EXIT_CODE, Preempted

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        build_parser().print_help()
        return 0
    main_process = int(os.environ.get("RANK", "0")) == 0
    try:
        plan = plan_run(argv, base)
        if main_process:
            for line in plan.notes + imbalance_report(plan.stats, plan.cfg):
                print(f"finetune: {line}")
        summary = run(plan)
    except (ConfigError, FileNotFoundError, WeightsUnavailableError) as error:
        print(f"launcher finetune: {error}", file=sys.stderr)
        return 2
    except Preempted as error:
        print(f"preempted: {error}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    if main_process:
        report = summary.get("finetune", {})
        for line in report.get("diagnosis", []):
            print(f"finetune: {line}")
        output = Path(summary["output"])
        print(f"finetune: best val top-1 {summary.get('best_top1')}% -> {output / 'checkpoints' / 'best.pt'}; next: "
              f"launcher evaluate {output / 'checkpoints' / 'best.pt'} --data {plan.cfg.data}")
        from launcher.inference.report import write_report_after_training

        write_report_after_training(output, device=plan.cfg.device, workers=min(plan.cfg.workers, 2),
                                    progress=plan.cfg.progress, prefix="finetune: ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
