"""`launcher evaluate` and `launcher predict` on a checkpoint from a real fine-tuning run."""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from finetune_helpers import finetuned_run

from launcher.data.sample_data import DIGIT_CLASSES, make_digits_tree
from launcher.inference.evaluate import classification_report, evaluate_main, predict_main
from launcher.models import create_resnet
from launcher.train.runs import resolve_checkpoint


def test_classification_report_matches_sklearn() -> None:
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.6, truth, rng.integers(0, 4, 200))
    pred[pred == 3] = 2  # class 3 never predicted: precision must be 0, not NaN
    confusion = np.zeros((4, 4), dtype=np.int64)
    np.add.at(confusion, (truth, pred), 1)
    ours = classification_report(confusion)
    p, r, f, s = precision_recall_fscore_support(truth, pred, labels=range(4), zero_division=0)
    for key, expected in zip(("precision", "recall", "f1", "support"), (p, r, f, s)):
        np.testing.assert_allclose(ours[key], expected, atol=1e-12)


def test_bad_checkpoint_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate_main([str(tmp_path / "missing.pt"), "--data", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    assert predict_main([str(tmp_path / "plain.pt"), str(tmp_path)]) == 2
    assert "not a training checkpoint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return finetuned_run(tmp_path_factory.getbasetemp())


@pytest.mark.slow
def test_evaluate_then_predict(run: tuple[Path, Path, Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    output, _, _ = run
    best = output / "checkpoints" / "best.pt"
    split_dir = Path(torch.load(best, map_location="cpu", weights_only=True)["config"]["data"])
    summary = json.loads((output / "summary.json").read_text())

    assert evaluate_main([str(best), "--data", str(split_dir), "--output", str(tmp_path / "eval"),
                          "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    classes = [f"digit_{d}" for d in range(5, 10)]
    assert metrics["images"] == 40 and list(metrics["per_class"]) == classes
    # Same weights, same images, same preprocessing as the engine's evaluation (which ran in bf16):
    # at most one image may flip.
    assert abs(metrics["top1"] - summary["best_top1"]) <= 100 / 40 + 1e-9
    assert metrics["top5"] == 100.0 and metrics["top1"] >= 55.0 and "top-1" in printed
    with open(tmp_path / "eval" / "confusion.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:] == classes
    matrix = np.array([[int(v) for v in row[1:]] for row in rows[1:]])
    assert matrix.sum() == 40 and np.trace(matrix) == round(metrics["top1"] * 40 / 100)
    assert (matrix.sum(axis=1) == [metrics["per_class"][c]["support"] for c in classes]).all()
    assert (tmp_path / "eval" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # predict over the same validation images, plus a broken file: reported, not fatal.
    images = tmp_path / "images"
    for path in (split_dir / "val").rglob("*.png"):
        target = images / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    (images / "digit_5" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    csv_path, json_path = tmp_path / "pred.csv", tmp_path / "pred.json"
    assert predict_main([str(best), str(images), "--topk", "3", "--batch-size", "7", "--csv", str(csv_path),
                         "--json", str(json_path)]) == 0
    printed = capsys.readouterr().out
    assert "UNREADABLE" in printed and "40 images predicted, 1 unreadable" in printed
    records = json.loads(json_path.read_text())["predictions"]
    assert len(records) == 41
    broken = [r for r in records if r["file"].endswith("broken.png")]
    assert broken[0]["error"] and broken[0]["predictions"] == []
    good = [r for r in records if not r["error"]]
    for record in good:
        probs = [p["probability"] for p in record["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    hits = sum(Path(r["file"]).parent.name == r["predictions"][0]["class"] for r in good)
    assert hits == round(metrics["top1"] * 40 / 100)  # predict and evaluate agree image for image
    with open(csv_path) as handle:
        header = next(csv.reader(handle))
    assert header == ["file", "class_1", "probability_1", "class_2", "probability_2", "class_3",
                      "probability_3", "error"]
    # A single image works too, and a folder without a val/ split evaluates its training images.
    assert predict_main([str(best), good[0]["file"], "--quiet"]) == 0
    assert "1 images predicted, 0 unreadable" in capsys.readouterr().out


def make_run_folder(run: Path, data: Path) -> Path:
    """A run folder as training leaves it (best.pt, a step checkpoint and last.pt linked to it, summary.json),
    with untrained ResNet-18 weights for the ten digit classes at 16 px."""
    torch.manual_seed(0)
    config = {"model": "resnet18", "img_size": 16, "test_img_size": 0, "crop_pct": 0.95, "interpolation": "bicubic",
              "num_classes": 10, "data": str(data)}
    state = {"model": create_resnet("resnet18", 10).state_dict(), "config": config, "classes": DIGIT_CLASSES,
             "epoch": 1, "step": 4}
    folder = run / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(state, folder / "best.pt")
    torch.save({**state, "model": create_resnet("resnet18", 10).state_dict(), "step": 8}, folder / "step-00000008.pt")
    os.link(folder / "step-00000008.pt", folder / "last.pt")
    (run / "summary.json").write_text("{}\n")
    return run


def test_checkpoint_resolution_in_run_folders(tmp_path: Path) -> None:
    run = tmp_path / "run"
    folder = run / "checkpoints"
    folder.mkdir(parents=True)
    for name in ("best.pt", "last.pt", "step-00000008.pt"):
        (folder / name).write_bytes(b"x")
    assert resolve_checkpoint(run) == folder / "best.pt"
    assert resolve_checkpoint(str(run), "last") == folder / "last.pt"
    assert resolve_checkpoint(run, "step-00000008.pt") == folder / "step-00000008.pt"
    assert resolve_checkpoint(folder, "best") == folder / "best.pt"  # the checkpoints/ folder itself
    assert resolve_checkpoint(folder / "last.pt") == folder / "last.pt"  # a file stays a file
    with pytest.raises(ValueError, match="--checkpoint last picks a checkpoint inside a run folder"):
        resolve_checkpoint(folder / "best.pt", "last")
    with pytest.raises(FileNotFoundError, match="neither .*step-9.pt nor step-9.pt exists"):
        resolve_checkpoint(run, "step-9.pt")
    with pytest.raises(FileNotFoundError, match="is neither a checkpoint file nor a run folder"):
        resolve_checkpoint(tmp_path / "typo")
    with pytest.raises(FileNotFoundError, match="is not a run folder"):
        resolve_checkpoint(tmp_path)


@pytest.mark.parametrize(("files", "which", "reason"), [
    ([], "best", r"no checkpoint written yet: the training is in its first epoch .*\(train.log last written \d+ s ago\)"),
    (["checkpoints/last.pt"], "best", "no evaluation has finished yet: the training is still running or stopped early"),
    (["checkpoints/last.pt", "summary.json"], "best", r"no validation split\), so it wrote no best.pt; use --checkpoint last"),
    (["checkpoints/last.pt", "PREEMPTED"], "best", "preempted before its first evaluation"),
    (["checkpoints/best.pt"], "last", "only best.pt is there; use --checkpoint best"),
])
def test_a_missing_checkpoint_says_why(tmp_path: Path, files: list[str], which: str, reason: str) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "train.log").write_text("started\n")
    for name in files:
        (run / name).write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as info:
        resolve_checkpoint(run, which)
    message = str(info.value)
    assert message.startswith(f"checkpoint not found: {run / 'checkpoints' / (which + '.pt')}: ") and "\n" not in message
    assert re.search(reason, message), message


def test_evaluate_predict_take_a_run_folder_and_log_plain_lines(
        digits_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`launcher evaluate RUN` (best.pt, the run's own data) with stderr in a file: lines with ETA, no '\\r'."""
    run = make_run_folder(tmp_path / "run", digits_shards)
    monkeypatch.delenv("LAUNCHER_PROGRESS", raising=False)  # the mode follows stderr
    monkeypatch.setenv("LAUNCHER_PROGRESS_INTERVAL", "0")  # a line per batch: this takes seconds, not 30
    log_path = tmp_path / "job.err"
    with open(log_path, "w") as log_file:
        monkeypatch.setattr(sys, "stderr", log_file)
        assert evaluate_main([str(run), "--workers", "0", "--batch-size", "64"]) == 0
        monkeypatch.undo()
    text = log_path.read_text()
    assert "\r" not in text
    assert re.search(r"^evaluate validation: 1/5 batch \(20%\), [\d.]+ batch/s, ETA \d+:\d\d:\d\d$", text, re.M), text
    assert re.search(r"^evaluate validation: 5/5 batch in \d+:\d\d:\d\d", text, re.M), text
    assert f"note: evaluating on the checkpoint's training data {digits_shards}" in capsys.readouterr().out
    metrics = json.loads((run / "eval_validation" / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(run / "checkpoints" / "best.pt") and metrics["images"] == 269

    assert evaluate_main([str(run), "--checkpoint", "last", "--workers", "0", "--output", str(tmp_path / "e"),
                          "--quiet"]) == 0
    last = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert last["checkpoint"] == str(run / "checkpoints" / "last.pt") and last["loss"] != metrics["loss"]

    images = tmp_path / "images"
    make_digits_tree(images, size=16, per_class=1)
    for which, expected in ((None, "best.pt"), ("step-00000008.pt", "step-00000008.pt")):
        out = tmp_path / f"pred-{expected}.json"
        argv = [str(run), str(images), "--quiet", "--json", str(out)] + (["--checkpoint", which] if which else [])
        assert predict_main(argv) == 0
        assert json.loads(out.read_text())["checkpoint"] == str(run / "checkpoints" / expected)
    assert "10 images predicted, 0 unreadable" in capsys.readouterr().out

    (run / "checkpoints" / "best.pt").unlink()
    assert evaluate_main([str(run), "--workers", "0"]) == 2
    assert "use --checkpoint last" in capsys.readouterr().err
