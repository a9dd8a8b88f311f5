"""`launcher evaluate` and `launcher predict` on a checkpoint from a real fine-tuning run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from finetune_helpers import finetuned_run

from launcher.inference.evaluate import classification_report, evaluate_main, predict_main


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
