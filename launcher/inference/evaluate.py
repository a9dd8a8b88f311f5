"""`launcher evaluate` and `launcher predict`: use a training checkpoint on new images.

A checkpoint (``runs/RUN/checkpoints/best.pt``; a run folder ``runs/RUN`` means its ``best.pt``, see
:func:`launcher.train.runs.resolve_checkpoint`) carries the weights, the resolved config and the
class names, so both commands need nothing else: the model is rebuilt from ``config["model"]`` and
``config["num_classes"]``, images are prepared exactly like the engine's validation images
(resize the shorter side to ``img_size / crop_pct``, center crop ``img_size``, ImageNet
normalization), and class indices are turned back into the names of the training folders.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from launcher.finetune.modelcards import IMAGE_EXTENSIONS
from launcher.progress import track
from launcher.train.checkpoints import load_checkpoint
from launcher.train.runs import CHECKPOINT_HELP, WHICH_HELP, resolve_checkpoint


@dataclass
class LoadedModel:
    model: nn.Module
    config: dict[str, Any]
    classes: list[str]
    path: Path
    device: torch.device

    @property
    def name(self) -> str:
        return str(self.config["model"])

    @property
    def img_size(self) -> int:
        return int(self.config.get("test_img_size") or self.config.get("img_size") or 224)

    def eval_transform(self, img_size: int | None = None) -> Any:
        """Encoded image bytes -> uint8 CHW tensor: the validation loader's own transform."""
        from launcher.data import EvalTransform

        return EvalTransform(img_size or self.img_size, crop_pct=float(self.config.get("crop_pct", 0.95)),
                             interpolation=str(self.config.get("interpolation", "bicubic")))

    def normalize(self, images_u8: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images_u8.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_DEFAULT_STD, device=images_u8.device).view(1, 3, 1, 1) * 255
        return (images_u8.float() - mean) / std

    @torch.no_grad()
    def logits(self, images_u8: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images_u8.to(self.device, non_blocking=True))).float()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint (loaded safely by :func:`launcher.train.state.load_checkpoint`) with its config."""
    checkpoint = load_checkpoint(path)
    if "config" not in checkpoint:
        raise ValueError(f"{path} is not a training checkpoint (missing config); "
                         "use runs/<run>/checkpoints/best.pt or last.pt")
    return checkpoint


def load_model(path: str | Path, device: str = "auto", which: str | None = None) -> LoadedModel:
    """Rebuild the model of a checkpoint (or a run folder's, see ``resolve_checkpoint``) in eval mode.

    The load is strict: every tensor must match.
    """
    from launcher.models import create_resnet

    path = resolve_checkpoint(path, which)
    checkpoint = read_checkpoint(path)
    config = dict(checkpoint["config"])
    state = {key.removeprefix("module.").removeprefix("_orig_mod."): value
             for key, value in checkpoint["model"].items()}
    num_classes = int(state["fc.weight"].shape[0])
    classes = [str(name) for name in checkpoint.get("classes") or []] or [str(i) for i in range(num_classes)]
    if len(classes) != num_classes:
        raise ValueError(f"{path}: {len(classes)} class names but a {num_classes}-way classifier")
    config["num_classes"] = num_classes
    model = create_resnet(str(config["model"]).split(".")[0], num_classes)
    model.load_state_dict(state, strict=True)
    target = resolve_device(device)
    model.to(target).eval()
    return LoadedModel(model, config, classes, Path(path), target)


def default_output(checkpoint: Path, folder: str) -> Path:
    """Next to the run: runs/RUN/checkpoints/best.pt -> runs/RUN/<folder>."""
    base = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return base / folder


# ---------------------------------------------------------------------------------------------- evaluate


def classification_report(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision / recall / F1 / support from a confusion matrix (rows: true, columns: predicted)."""
    true_pos = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, support, out=np.zeros_like(true_pos), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(true_pos), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    rows = confusion.sum(axis=1, keepdims=True)
    shares = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    side = min(4 + 0.45 * n, 30)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _label_map(dataset_classes: list[str], model_classes: list[str], spec: str) -> torch.Tensor:
    """Dataset label -> model label, by class name; refuses classes the model never saw."""
    index = {name: i for i, name in enumerate(model_classes)}
    unknown = [name for name in dataset_classes if name not in index]
    if unknown:
        raise ValueError(f"{spec} has classes the checkpoint was not trained on: {', '.join(unknown[:10])} "
                         f"(checkpoint classes: {', '.join(model_classes[:10])}{' ...' if len(model_classes) > 10 else ''})")
    return torch.tensor([index[name] for name in dataset_classes], dtype=torch.long)


def evaluate_checkpoint(checkpoint: str | Path, data: str | None, *, split: str = "validation", batch_size: int = 64,
                        img_size: int | None = None, workers: int = 2, device: str = "auto",
                        output: str | Path | None = None, progress: bool = True,
                        on_batch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
                        ) -> dict[str, Any]:
    """Loss, top-1/top-5, per-class metrics and the confusion matrix of a checkpoint on a dataset split.

    ``on_batch(images_u8, targets, logits)`` sees every batch (targets in the checkpoint's class indices),
    e.g. for the report's worst-image grid.

    ``data=None`` evaluates on the dataset the checkpoint was trained on (its config's ``data``).
    """
    from launcher.data import build_eval_loader, open_dataset

    loaded = load_model(checkpoint, device)
    if not data:
        data = str(loaded.config.get("data") or "")
        if not data:
            raise ValueError(f"{loaded.path} does not record its training data; pass --data")
        print(f"note: evaluating on the checkpoint's training data {data}")
    dataset = open_dataset(data)
    if not dataset.has_split(split):
        fallback = "train" if dataset.has_split("train") else None
        if fallback is None:
            raise ValueError(f"{data} has no {split!r} split")
        print(f"note: {data} has no {split!r} split; evaluating its {fallback!r} split "
              f"({dataset.num_samples(fallback)} images)")
        split = fallback
    label_map = _label_map(list(dataset.classes), loaded.classes, data)
    size = img_size or loaded.img_size
    loader = build_eval_loader(dataset, rank=0, world_size=1, batch_size=batch_size, img_size=size,
                               crop_pct=float(loaded.config.get("crop_pct", 0.95)),
                               interpolation=str(loaded.config.get("interpolation", "bicubic")),
                               workers=workers, split=split)
    num_classes = len(loaded.classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum, top5_hits, seen = 0.0, 0, 0
    topk = min(5, num_classes)
    total = math.ceil(dataset.num_samples(split) / batch_size)
    for images, labels in track(loader, total=total, desc=f"evaluate {split}", unit="batch", enabled=progress):
        logits = loaded.logits(images).cpu()
        targets = label_map[labels]
        loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        top5_hits += int((logits.topk(topk, dim=1).indices == targets[:, None]).any(dim=1).sum())
        confusion += torch.bincount(targets * num_classes + logits.argmax(dim=1),
                                    minlength=num_classes * num_classes).view(num_classes, num_classes)
        seen += len(targets)
        if on_batch is not None:
            on_batch(images, targets, logits)
    if seen == 0:
        raise ValueError(f"{data}: split {split!r} yielded no images")
    matrix = confusion.numpy()
    report = classification_report(matrix)
    present = report["support"] > 0
    metrics: dict[str, Any] = {
        "checkpoint": str(loaded.path), "data": str(data), "split": split, "images": seen, "img_size": size,
        "loss": loss_sum / seen, "top1": 100.0 * float(np.trace(matrix)) / seen, "top5": 100.0 * top5_hits / seen,
        "top5_k": topk,
        "macro_precision": float(report["precision"][present].mean()),
        "macro_recall": float(report["recall"][present].mean()),
        "macro_f1": float(report["f1"][present].mean()),
        "per_class": {name: {key: float(report[key][i]) for key in ("precision", "recall", "f1", "support")}
                      for i, name in enumerate(loaded.classes)},
    }
    out = Path(output) if output else default_output(loaded.path, f"eval_{split}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(out / "confusion.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *loaded.classes])
        writer.writerows([name, *map(int, row)] for name, row in zip(loaded.classes, matrix))
    with open(out / "per_class.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        writer.writerows([name, f"{report['precision'][i]:.4f}", f"{report['recall'][i]:.4f}",
                          f"{report['f1'][i]:.4f}", int(report["support"][i])] for i, name in enumerate(loaded.classes))
    plot_confusion(matrix, loaded.classes, out / "confusion.png",
                   f"{loaded.name} on {Path(str(data)).name}/{split}: top-1 {metrics['top1']:.1f}%")
    metrics["output"] = str(out)
    return metrics


def format_evaluation(metrics: dict[str, Any]) -> str:
    # the size says which number this is: a recipe with a test resolution (A3) ranks best.pt at its
    # training size, and evaluate uses the test size
    lines = [f"{metrics['images']} images ({metrics['split']}, {metrics['img_size']} px): loss {metrics['loss']:.4f}  "
             f"top-1 {metrics['top1']:.2f}%  top-{metrics['top5_k']} {metrics['top5']:.2f}%  "
             f"macro F1 {metrics['macro_f1']:.3f}"]
    width = max(12, *(len(name) for name in metrics["per_class"]))
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}  "
                     f"{int(row['support']):7d}")
    lines.append(f"written: {metrics['output']}/metrics.json, per_class.csv, confusion.csv, confusion.png")
    return "\n".join(lines)


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launcher evaluate", description=(
        "Evaluate a checkpoint on a dataset split: loss, top-1/top-5, per-class precision/recall/F1 and "
        "the confusion matrix (CSV + PNG)."))
    parser.add_argument("checkpoint", help=CHECKPOINT_HELP)
    parser.add_argument("--checkpoint", dest="which", default=None, help=WHICH_HELP)
    parser.add_argument("--data", default="", help="class-folder tree, shard folder or URL pattern "
                        "(default: the data the checkpoint was trained on)")
    parser.add_argument("--split", default="validation", help="split to evaluate (default validation)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=0, help="evaluation resolution (default: the checkpoint's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--output", default="", help="folder for the results (default: <run>/eval_<split>)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar / progress lines")
    args = parser.parse_args(argv)
    try:
        checkpoint = resolve_checkpoint(args.checkpoint, args.which)
        metrics = evaluate_checkpoint(checkpoint, args.data or None, split=args.split, batch_size=args.batch_size,
                                      img_size=args.img_size or None, workers=args.workers, device=args.device,
                                      output=args.output or None, progress=not args.quiet)
    except (FileNotFoundError, ValueError) as error:
        print(f"launcher evaluate: {error}", file=sys.stderr)
        return 2
    print(format_evaluation(metrics))
    return 0


# ---------------------------------------------------------------------------------------------- predict


def collect_images(target: str | Path) -> list[Path]:
    path = Path(target)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no such image or folder: {path}")
    return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


class _ImageFiles(torch.utils.data.Dataset):
    """(index, uint8 image or None, error text) so one bad file never stops the batch."""

    def __init__(self, paths: list[Path], transform: Any) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        from launcher.data.images import ImageRejected, read_file_bytes

        try:
            return index, self.transform(read_file_bytes(self.paths[index])), ""
        except ImageRejected as error:
            return index, None, str(error)
        except Exception as error:  # a broken decoder must not end the whole run
            return index, None, f"{type(error).__name__}: {error}"


def _collate(items: list[tuple[int, torch.Tensor | None, str]]) -> tuple[list[int], torch.Tensor | None, dict[int, str]]:
    good = [(index, image) for index, image, _ in items if image is not None]
    errors = {index: error for index, image, error in items if image is None}
    images = torch.stack([image for _, image in good]) if good else None
    return [index for index, _ in good], images, errors


def predict_images(loaded: LoadedModel, paths: list[Path], *, topk: int = 5, batch_size: int = 32,
                   workers: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """One record per file: ``{"file", "predictions": [{"class", "probability"}...], "error"}``."""
    k = max(1, min(topk, len(loaded.classes)))
    loader = torch.utils.data.DataLoader(_ImageFiles(paths, loaded.eval_transform()), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_collate)
    records: list[dict[str, Any]] = [{"file": str(path), "predictions": [], "error": ""} for path in paths]
    for indices, images, errors in track(loader, total=len(loader), desc="predict", unit="batch", enabled=progress):
        for index, error in errors.items():
            records[index]["error"] = error
        if images is None:
            continue
        probs, classes = loaded.logits(images).softmax(dim=1).topk(k, dim=1)
        for row, index in enumerate(indices):
            records[index]["predictions"] = [{"class": loaded.classes[int(c)], "probability": float(p)}
                                             for p, c in zip(probs[row].tolist(), classes[row].tolist())]
    return records


def format_predictions(records: list[dict[str, Any]], root: Path) -> str:
    def short(name: str) -> str:
        path = Path(name)
        return str(path.relative_to(root)) if root.is_dir() and path.is_relative_to(root) else path.name

    width = min(48, max([len(short(r["file"])) for r in records] + [4]))
    lines = [f"{'file':<{width}}  predictions"]
    for record in records:
        if record["error"]:
            shown = f"UNREADABLE ({record['error']})"
        else:
            shown = "  ".join(f"{p['class']} {100 * p['probability']:.1f}%" for p in record["predictions"])
        lines.append(f"{short(record['file'])[-width:]:<{width}}  {shown}")
    return "\n".join(lines)


def write_predictions_csv(records: list[dict[str, Any]], path: Path, k: int) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["file"] + [f"{kind}_{rank}" for rank in range(1, k + 1) for kind in ("class", "probability")]
        writer.writerow([*header, "error"])
        for record in records:
            cells = [value for p in record["predictions"] for value in (p["class"], f"{p['probability']:.6f}")]
            writer.writerow([record["file"], *cells, *[""] * (2 * k - len(cells)), record["error"]])


def predict_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launcher predict", description=(
        "Top-k classes with probabilities for one image or every image under a folder. Unreadable "
        "images are reported and skipped."))
    parser.add_argument("checkpoint", help=CHECKPOINT_HELP)
    parser.add_argument("images", help="an image file or a folder (searched recursively)")
    parser.add_argument("--checkpoint", dest="which", default=None, help=WHICH_HELP)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="decoding worker processes (0 = in this process)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--csv", default="", help="also write the predictions to this CSV file")
    parser.add_argument("--json", default="", help="also write the predictions to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no table on the console")
    args = parser.parse_args(argv)
    try:
        if args.topk < 1 or args.batch_size < 1:
            raise ValueError("--topk and --batch-size must be >= 1")
        loaded = load_model(args.checkpoint, args.device, which=args.which)
        paths = collect_images(args.images)
    except (FileNotFoundError, ValueError) as error:
        print(f"launcher predict: {error}", file=sys.stderr)
        return 2
    if not paths:
        print(f"launcher predict: no image files under {args.images}", file=sys.stderr)
        return 2
    records = predict_images(loaded, paths, topk=args.topk, batch_size=args.batch_size, workers=args.workers,
                             progress=not args.quiet)
    k = max(1, min(args.topk, len(loaded.classes)))
    if not args.quiet:
        print(format_predictions(records, Path(args.images)))
    if args.csv:
        write_predictions_csv(records, Path(args.csv), k)
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": str(loaded.path), "classes": loaded.classes,
                                               "predictions": records}, indent=2) + "\n")
    failed = sum(1 for record in records if record["error"])
    print(f"{len(records) - failed} images predicted, {failed} unreadable"
          + "".join(f"; written {name}" for name in (args.csv, args.json) if name))
    return 0 if failed < len(records) else 1
