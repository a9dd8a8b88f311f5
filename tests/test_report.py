"""`launcher report RUN`: one self-contained report.html, checked for content and in a real headless Chromium.

The run folder is written directly (checkpoint, config.yaml, metrics.jsonl, summary.json as training
writes them) around the digits shards, so no training is needed; the report evaluates it for real.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import tomllib
import torch
from browser_helpers import Chromium, find_chromium

from launcher.config import TrainConfig, save_config
from launcher.inference.evaluate import evaluate_checkpoint
from launcher.inference.report import WorstImages, build_report, main

REPO = Path(__file__).resolve().parents[1]
WORST = 12


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, digits_shards: Path) -> Path:
    from launcher.data import open_dataset
    from launcher.models import create_resnet

    run = tmp_path_factory.mktemp("report") / "a3-resnet18-digits"
    (run / "checkpoints").mkdir(parents=True)
    classes = list(open_dataset(str(digits_shards)).classes)
    torch.manual_seed(0)
    model = create_resnet("resnet18", len(classes))
    with torch.no_grad():  # varied BatchNorm statistics: predictions spread over several classes
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    cfg = dataclasses.replace(TrainConfig(), data=str(digits_shards), model="resnet18", img_size=32, epochs=2,
                              output=str(run))
    save_config(cfg, run / "config.yaml")
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "classes": classes, "epoch": 2, "step": 20,
                "metrics": {"top1": 10.0, "top5": 50.0, "loss": 2.3}}, run / "checkpoints" / "best.pt")
    lines = [{"kind": "train", "step": s, "loss": 2.5 - 0.02 * s, "lr": 1e-3 * s / 20, "epoch": s // 10}
             for s in range(1, 21)]
    lines += [{"kind": "eval", "tag": "val", "step": s, "loss": 2.4 - 0.01 * s, "top1": 9.0 + s / 10,
               "top5": 50.0 + s / 10} for s in (10, 20)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run / "summary.json").write_text(json.dumps({
        "best_top1": 11.0, "final_top1": 11.0, "final_top5": 52.0, "epochs": 2, "epochs_done": 2.0, "steps": 20,
        "global_batch": 32, "micro_batch": 16, "accumulation": 2, "world_size": 1, "img_per_s": 321.5,
        "data_wait_fraction": 0.05, "wall_s": 60.0, "train_s": 50.0, "precision": "fp32", "device": "cpu",
        "stop_reason": "completed"}))
    return run


@pytest.fixture(scope="module")
def report(tiny_run: Path) -> Path:
    return build_report(tiny_run, worst=WORST, workers=0, progress=False)


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.rows: list[list[str]] = []
        self._row: list[str] | None = None
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {key: value or "" for key, value in attrs}
        if tag == "img":
            self.images.append(values)
        self.links += [values[key] for key in ("href", "src", "action") if key in values]
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell += data


def test_worst_images_keeps_the_highest_losses() -> None:
    torch.manual_seed(1)
    keeper = WorstImages(5)
    all_losses = []
    for _ in range(4):
        logits, targets = torch.randn(16, 3) * 3, torch.randint(0, 3, (16,))
        images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
        keeper(images, targets, logits)
        all_losses += torch.nn.functional.cross_entropy(logits, targets, reduction="none").tolist()
    kept = keeper.worst_first()
    assert [s.loss for s in kept] == pytest.approx(sorted(all_losses, reverse=True)[:5])
    assert all(0 <= s.p_target <= s.p_predicted <= 1 for s in kept)


def test_report_shows_the_runs_evaluation(tiny_run: Path, report: Path) -> None:
    from PIL import Image

    assert report == tiny_run / "report.html"
    page = _Page()
    page.feed(report.read_text())
    # everything is embedded: curves + confusion matrix + the worst-image grid, all PNG data: URIs
    assert len(page.images) == 2 + WORST
    assert page.links and all(link.startswith("data:image/png;base64,") for link in page.links)
    for image in page.images:
        picture = Image.open(io.BytesIO(base64.b64decode(image["src"].split(",", 1)[1])))
        assert picture.format == "PNG" and min(picture.size) > 0 and image["alt"]

    metrics = json.loads((tiny_run / "eval_validation" / "metrics.json").read_text())
    assert metrics["images"] == 269 and metrics["split"] == "validation"
    text = report.read_text()
    assert f"<b>{metrics['top1']:.2f}%</b><span>top-1 (validation)</span>" in text
    per_class = {row[0]: row[1:] for row in page.rows if row and row[0] in metrics["per_class"]}
    assert len(per_class) == 10
    for name, row in metrics["per_class"].items():
        assert per_class[name] == [f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                                   str(int(row["support"]))]
    hardware = {row[0]: row[1] for row in page.rows if len(row) == 2}
    assert hardware["training throughput (img/s)"] == "321.5" and hardware["device"] == "cpu"
    assert hardware["global batch = micro x accumulation x world"] == "32 = 16 x 2 x 1"
    assert f"data: {metrics['data']}" in text and "img_size: 32" in text  # config.yaml verbatim

    # the grid holds the highest-loss validation images, worst first, as an independent pass finds them
    losses: list[float] = []
    evaluate_checkpoint(tiny_run / "checkpoints" / "best.pt", metrics["data"],
                        workers=0, progress=False, output=tiny_run / "eval_check",
                        on_batch=lambda x, y, logits: losses.extend(
                            torch.nn.functional.cross_entropy(logits, y, reduction="none").tolist()))
    shown = [float(v) for v in re.findall(r"<br>loss ([0-9.]+)</figcaption>", text)]
    assert shown == pytest.approx(sorted(losses, reverse=True)[:WORST], abs=1e-3)
    assert len(re.findall(r"true: digit_\d", text)) == WORST and "predicted: digit_" in text


def test_report_loads_cleanly_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it as root)")
    broken = tmp_path / "broken.html"
    broken.write_text(report.read_text().replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1)
                      .replace("</body>", '<img src="https://example.com/x.png" alt="outside"></body>'))
    browser = Chromium(binary, tmp_path / "profile")
    try:
        good = browser.check(report, screenshot=True)
        bad = browser.check(broken)
    finally:
        browser.close()
    assert good.errors == []
    assert len(good.images) == 2 + WORST
    assert all(image["complete"] and image["naturalWidth"] > 0 for image in good.images), good.images
    assert good.requests[0] == report.resolve().as_uri()
    assert all(url.startswith("data:image/png") for url in good.requests[1:])
    assert good.screenshot.startswith(b"\x89PNG")
    # the same checks fail on a page with a broken image and an outside reference
    assert sum(image["naturalWidth"] == 0 for image in bad.images) == 2
    assert any("https://example.com/x.png" in error for error in bad.errors)


def test_report_command_and_its_errors(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "is neither a checkpoint file nor a run folder" in capsys.readouterr().err
    moved = tmp_path / "copied-run"
    (moved / "checkpoints").mkdir(parents=True)
    (moved / "checkpoints" / "best.pt").write_bytes((tiny_run / "checkpoints" / "best.pt").read_bytes())
    (moved / "config.yaml").write_text((tiny_run / "config.yaml").read_text().replace(
        str(json.loads((tiny_run / "eval_validation" / "metrics.json").read_text())["data"]), "/gone/shards"))
    assert main([str(moved), "--quiet"]) == 2
    assert "the run's data /gone/shards is not here" in capsys.readouterr().err
    data = json.loads((tiny_run / "eval_validation" / "metrics.json").read_text())["data"]
    assert main([str(moved), "--data", data, "--worst", "3", "--workers", "0", "--quiet"]) == 0
    assert f"report: {moved / 'report.html'}" in capsys.readouterr().out
    assert "no summary.json in the run folder" in (moved / "report.html").read_text()


def test_template_ships_with_the_package() -> None:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "report.html" in data["launcher.inference"]
    assert (REPO / "launcher" / "inference" / "report.html").is_file()


@pytest.mark.slow
def test_finetune_writes_the_report(tmp_path_factory: pytest.TempPathFactory) -> None:
    from finetune_helpers import finetuned_run

    output, _, _ = finetuned_run(tmp_path_factory.getbasetemp())
    page = _Page()
    page.feed((output / "report.html").read_text())
    assert len(page.images) >= 3 and all(link.startswith("data:image/png") for link in page.links)
