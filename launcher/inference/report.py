"""`launcher report RUN`: one self-contained ``RUN/report.html`` to look at after a run.

It evaluates the run's checkpoint (best.pt by default) on the run's validation split (``data`` and
``val_split`` from config.yaml) with :func:`launcher.inference.evaluate.evaluate_checkpoint`, and puts
on one page: loss / accuracy / LR curves (metrics.jsonl, drawn by the training's own plot), the
confusion matrix, per-class precision / recall / F1, a grid of the validation images with the highest
loss (as the model saw them: resized and center-cropped) with true and predicted labels, hardware and
throughput (summary.json), and the resolved config. Every image is an embedded ``data:`` URI and the
page has no script and no outside reference, so it works offline and travels with one ``scp``.
"""

from __future__ import annotations

import argparse
import base64
import heapq
import html
import io
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from launcher.inference.runs import CHECKPOINT_CHOICES, RunFiles, locate_run

__all__ = ["WorstImages", "build_report", "main", "write_report_after_training"]

REPORT_FILE = "report.html"
TEMPLATE = Path(__file__).with_name("report.html")
THUMBNAIL = 160  # px: larger crops are shrunk, smaller ones are drawn pixelated by the browser
LOW_SCORE = 0.5  # precision / recall below this are highlighted


@dataclass(order=True)
class _Sample:
    loss: float
    order: int
    image: torch.Tensor = field(compare=False)
    target: int = field(compare=False)
    predicted: int = field(compare=False)
    p_predicted: float = field(compare=False)
    p_target: float = field(compare=False)


class WorstImages:
    """Keeps the ``k`` highest-loss samples seen by :func:`evaluate_checkpoint` (its ``on_batch`` hook)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._heap: list[_Sample] = []  # min-heap on loss: the root is the first to drop
        self._order = itertools.count()

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor) -> None:
        if self.k <= 0:
            return
        logits = logits.float().cpu()
        losses = F.cross_entropy(logits, targets, reduction="none")
        probs = logits.softmax(dim=1)
        candidates = losses.topk(min(self.k, len(losses))).indices.tolist()
        for i in candidates:
            loss = float(losses[i])
            if len(self._heap) == self.k and loss <= self._heap[0].loss:
                continue
            sample = _Sample(loss, next(self._order), images[i].detach().cpu().clone(), int(targets[i]),
                             int(probs[i].argmax()), float(probs[i].max()), float(probs[i, targets[i]]))
            if len(self._heap) < self.k:
                heapq.heappush(self._heap, sample)
            else:
                heapq.heapreplace(self._heap, sample)

    def worst_first(self) -> list[_Sample]:
        return sorted(self._heap, key=lambda s: (-s.loss, s.order))


# ---------------------------------------------------------------------------------------------- pieces


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _image_uri(image_chw_u8: torch.Tensor) -> str:
    from PIL import Image

    picture = Image.fromarray(image_chw_u8.permute(1, 2, 0).contiguous().numpy())
    if max(picture.size) > THUMBNAIL:
        picture.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return _png_uri(buffer.getvalue())


def _img(uri: str, alt: str, css: str = "plot") -> str:
    return f'<img class="{css}" src="{uri}" alt="{html.escape(alt)}">'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(text: Any) -> str:
    return f"<td>{html.escape(str(text))}</td>"


def _score_td(value: float, support: float) -> str:
    css = "bar low" if support and value < LOW_SCORE else "bar"
    return f'<td class="{css}"><i style="width:{100 * value:.0f}%"></i><em>{value:.3f}</em></td>'


def curves_section(files: RunFiles) -> str:
    from launcher.train.tracking import METRICS_FILE, plot_curves

    metrics = files.folder / METRICS_FILE
    if not metrics.is_file():
        return _note(f"no {METRICS_FILE} in {files.folder}: no curves")
    with tempfile.TemporaryDirectory() as scratch:
        png = plot_curves(metrics, Path(scratch) / "curves.png", title=files.name)
        if png is None:
            return _note(f"{metrics} has no train or eval lines yet")
        return _img(_png_uri(png.read_bytes()), "loss, accuracy and learning rate against the optimizer step")


def per_class_section(metrics: dict[str, Any]) -> str:
    rows = [[_td(name), _score_td(row["precision"], row["support"]), _score_td(row["recall"], row["support"]),
             _score_td(row["f1"], row["support"]), _td(int(row["support"]))]
            for name, row in metrics["per_class"].items()]
    rows.append([_td("macro average"), _td(f"{metrics['macro_precision']:.3f}"),
                 _td(f"{metrics['macro_recall']:.3f}"), _td(f"{metrics['macro_f1']:.3f}"), _td(metrics["images"])])
    return _table(["class", "precision", "recall", "F1", "support"], rows)


def worst_section(worst: list[_Sample], classes: list[str]) -> str:
    figures = []
    for sample in worst:
        true, predicted = classes[sample.target], classes[sample.predicted]
        css = "correct" if sample.target == sample.predicted else "wrong"
        caption = (f'<span class="true">true: {html.escape(true)} ({100 * sample.p_target:.1f}%)</span><br>'
                   f'<span class="pred">predicted: {html.escape(predicted)} ({100 * sample.p_predicted:.1f}%)</span>'
                   f"<br>loss {sample.loss:.3f}")
        figures.append(f'<figure class="{css}">{_img(_image_uri(sample.image), f"true {true}, predicted {predicted}", "")}'
                       f"<figcaption>{caption}</figcaption></figure>")
    return "".join(figures)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def hardware_section(summary: dict[str, Any], config: dict[str, Any]) -> str:
    if not summary:
        return _note("no summary.json in the run folder (the run has not finished): no hardware or throughput")
    rows = [
        ("device", summary.get("device")), ("processes (world size)", summary.get("world_size")),
        ("precision", summary.get("precision")),
        ("channels_last / compile", f"{config.get('channels_last', '?')} / {config.get('compile', '?')}"
         if config else None),
        ("global batch = micro x accumulation x world",
         f"{summary.get('global_batch')} = {summary.get('micro_batch')} x {summary.get('accumulation')} x "
         f"{summary.get('world_size')}" if summary.get("global_batch") else None),
        ("training throughput (img/s)", None if summary.get("img_per_s") is None else f"{summary['img_per_s']:.1f}"),
        ("time waiting for data", None if summary.get("data_wait_fraction") is None
         else f"{100 * summary['data_wait_fraction']:.1f} %"),
        ("training time (s)", summary.get("train_s")), ("wall time (s)", summary.get("wall_s")),
        ("optimizer steps", summary.get("steps")), ("epochs done / planned",
                                                     f"{_fmt(summary.get('epochs_done'))} / {summary.get('epochs')}"),
        ("stop reason", summary.get("stop_reason")),
    ]
    return _table(["", "value"], [[_td(key), _td(_fmt(value))] for key, value in rows if value is not None])


def _cards(metrics: dict[str, Any], summary: dict[str, Any]) -> str:
    cards = [(f"{metrics['top1']:.2f}%", f"top-1 ({metrics['split']})"),
             (f"{metrics['top5']:.2f}%", f"top-{metrics['top5_k']}"), (f"{metrics['loss']:.4f}", "loss"),
             (f"{metrics['macro_f1']:.3f}", "macro F1"), (str(metrics["images"]), "images evaluated")]
    if summary.get("img_per_s"):
        cards.append((f"{summary['img_per_s']:.0f}", "training img/s"))
    return "".join(f"<div class=\"card\"><b>{html.escape(value)}</b><span>{html.escape(label)}</span></div>"
                   for value, label in cards)


# ---------------------------------------------------------------------------------------------- report


def build_report(run: str | Path, *, checkpoint: str = "best", data: str | None = None, split: str | None = None,
                 worst: int = 24, batch_size: int = 64, workers: int = 2, device: str = "auto",
                 out: str | Path | None = None, progress: bool = True) -> Path:
    """Evaluate the run's checkpoint and write the report; returns its path (default RUN/report.html)."""
    from launcher import __version__
    from launcher.inference.evaluate import evaluate_checkpoint, read_checkpoint

    files = locate_run(run, checkpoint)
    config = files.config()
    saved = read_checkpoint(files.checkpoint)
    config = config or dict(saved["config"])
    data = data or config.get("data")
    if not data:
        raise ValueError(f"{files.folder}: config.yaml names no data; pass --data")
    if "://" not in str(data) and not any(ch in str(data) for ch in "{*") and not Path(str(data)).exists():
        raise FileNotFoundError(f"the run's data {data} is not here (config.yaml 'data'); pass --data PATH "
                                f"to evaluate on a copy of it")
    split = split or config.get("val_split") or "validation"
    collector = WorstImages(worst)
    metrics = evaluate_checkpoint(files.checkpoint, str(data), split=split, batch_size=batch_size, workers=workers,
                                  device=device, progress=progress, on_batch=collector)
    classes = list(saved.get("classes") or metrics["per_class"])
    summary = files.summary()
    confusion = Path(metrics["output"]) / "confusion.png"
    split_label = f"{metrics['split']} split, {metrics['images']} images"
    shown = collector.worst_first()
    wrong = sum(1 for s in shown if s.target != s.predicted)
    values = {
        "title": html.escape(f"{files.name}: {saved['config'].get('model', '?')} report"),
        "subtitle": html.escape(f"checkpoint {files.checkpoint} (step {saved.get('step', '?')}), evaluated on "
                                f"{data} ({metrics['split']})"),
        "cards": _cards(metrics, summary),
        "curves": curves_section(files),
        "split_label": html.escape(split_label),
        "confusion": _img(_png_uri(confusion.read_bytes()), "confusion matrix: rows true, columns predicted"),
        "per_class": per_class_section(metrics),
        "worst_note": html.escape(f"the {len(shown)} images with the highest cross-entropy ({wrong} misclassified), "
                                  f"as the model saw them (resized and center-cropped to {metrics['img_size']} px); "
                                  f"percentages are the model's probabilities"),
        "worst": worst_section(shown, classes),
        "hardware": hardware_section(summary, config),
        "config": html.escape((files.folder / "config.yaml").read_text() if (files.folder / "config.yaml").is_file()
                              else json.dumps(config, indent=2)),
        "footer": html.escape(f"written by resnet-launcher {__version__} on {time.strftime('%Y-%m-%d %H:%M')}; "
                              f"evaluation files in {metrics['output']}"),
    }
    page = Template(TEMPLATE.read_text(encoding="utf-8")).substitute(values)
    target = Path(out) if out else files.folder / REPORT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(page, encoding="utf-8")
    os.replace(partial, target)
    return target


def write_report_after_training(output: str | Path, *, device: str = "auto", workers: int = 2,
                                progress: bool = False, prefix: str = "") -> Path | None:
    """For `launcher finetune` / `launcher demo`: write the report, print its path; a failure only warns."""
    try:
        path = build_report(output, device=device, workers=workers, progress=progress)
    except Exception as error:  # the run itself succeeded; a report problem must not turn it into a failure
        print(f"{prefix}report not written: {type(error).__name__}: {error}", file=sys.stderr)
        return None
    print(f"{prefix}report: {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launcher report", description=(
        "Write RUN/report.html: curves, confusion matrix, per-class precision/recall, the validation images "
        "with the highest loss, hardware/throughput and the config, in one self-contained file (images "
        "embedded, works offline)."))
    parser.add_argument("run", help="a run folder (runs/NAME) or a checkpoint inside one")
    parser.add_argument("--checkpoint", default="best", help=f"{' | '.join(CHECKPOINT_CHOICES)} | PATH (default best; "
                                                             "last when the run has no best.pt)")
    parser.add_argument("--data", default=None, help="evaluate on this dataset instead of config.yaml's data")
    parser.add_argument("--split", default=None, help="split to evaluate (default: config.yaml's val_split)")
    parser.add_argument("--worst", type=int, default=24, help="how many highest-loss images to show (default 24)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--out", default=None, help="output file (default RUN/report.html)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.worst < 0 or args.batch_size < 1:
            raise ValueError("--worst must be >= 0 and --batch-size >= 1")
        path = build_report(args.run, checkpoint=args.checkpoint, data=args.data, split=args.split,
                            worst=args.worst, batch_size=args.batch_size, workers=args.workers, device=args.device,
                            out=args.out, progress=not args.quiet)
    except (FileNotFoundError, ValueError) as error:
        print(f"launcher report: {error}", file=sys.stderr)
        return 2
    print(f"report: {path} ({path.stat().st_size / 2**20:.1f} MiB, self-contained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
