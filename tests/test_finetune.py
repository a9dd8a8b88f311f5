"""`launcher finetune`: card defaults and ranges, validation hold-out, guard rails, and an end-to-end transfer run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from finetune_helpers import finetuned_run

from launcher.finetune import command as finetune
from launcher.finetune.command import AUGMENT_LEVELS, diagnose, make_validation_split, plan_run
from launcher.finetune.modelcards import get_card


def touch_tree(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            (root / name / f"{index:04d}.jpg").write_bytes(b"not decoded by the planner")
    return root


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    return touch_tree(tmp_path / "imgs", {"cat": 30, "dog": 30, "fox": 30})


def test_card_defaults_per_model(small_tree: Path, tmp_path: Path) -> None:
    out = ["--output", str(tmp_path / "runs" / "r"), "--weights", "none"]
    r18 = plan_run([str(small_tree), *out]).cfg
    assert (r18.model, r18.global_batch, r18.epochs, r18.lr, r18.eval_every) == ("resnet18", 8, 1, 5e-5, 1)
    assert (r18.opt, r18.loss, r18.smoothing, r18.aug_repeats, r18.auto_augment) == ("adamw", "ce", 0.1, 0, None)
    assert r18.scale == AUGMENT_LEVELS["light"]["scale"] and r18.early_stop_patience == finetune.DEFAULT_PATIENCE
    r101 = plan_run([str(small_tree), "--model", "resnet101", *out]).cfg
    assert (r101.global_batch, r101.epochs, r101.lr) == (4, 1, 5e-5)
    timm_named = plan_run([str(small_tree), "--model", "resnet50.a1_in1k", "--output", str(tmp_path / "r")]).cfg
    assert (timm_named.model, timm_named.pretrained) == ("resnet50", "resnet50.a1_in1k")
    assert plan_run([str(small_tree), "--output", str(tmp_path / "r")]).cfg.pretrained == "DEFAULT"


def test_training_flags_with_values_anywhere_on_the_command_line(small_tree: Path, tmp_path: Path) -> None:
    # `--flag value` for a `launcher train` option must not lose its value to the positional data argument
    out = tmp_path / "runs" / "r"
    cfg = plan_run(["--output", str(out), "--device", "cpu", "--scale", "1", "1", "--img-size=48",
                    "--no-channels-last", str(small_tree), "--weights", "none"]).cfg
    assert (cfg.output, cfg.device, cfg.scale, cfg.img_size, cfg.channels_last) == (str(out), "cpu", (1.0, 1.0), 48, False)
    assert Path(cfg.data).resolve() != out.resolve()
    with pytest.raises(SystemExit):
        plan_run([str(small_tree), "--no-such-flag", "3"])


@pytest.mark.parametrize(("flags", "allowed"), [
    (["--batch-size", "256"], "1..128"),
    (["--lr", "5e-3"], "1e-5..1e-3"),
    (["--epochs", "60"], "1..50"),
    (["--model", "resnet101", "--epochs", "25"], "1..20"),
    (["--model", "resnet101", "--lr", "3e-4"], "1e-5..1e-4"),
])
def test_out_of_range_refused_or_forced(small_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        flags: list[str], allowed: str) -> None:
    args = [str(small_tree), "--weights", "none", "--output", str(tmp_path / "r"), *flags]
    assert finetune.main(args) == 2
    err = capsys.readouterr().err
    assert allowed in err and "--force" in err
    plan = plan_run([*args, "--force"])
    assert any(allowed in note and "--force" in note for note in plan.notes)


def test_auto_applies_card_advice(tmp_path: Path) -> None:
    tiny = touch_tree(tmp_path / "tiny", {"a": 20, "b": 20, "c": 5})
    plan = plan_run([str(tiny), "--auto", "--weights", "none", "--output", str(tmp_path / "r")])
    cfg = plan.cfg
    assert (cfg.lr, cfg.global_batch, cfg.auto_augment) == (1e-5, 4, AUGMENT_LEVELS["maximum"]["auto_augment"])
    assert 30 <= cfg.epochs <= 50 and cfg.mixup > 0 and cfg.warmup_epochs == 1
    assert cfg.class_weights == "balanced"  # 20 vs 4 training images after the hold-out
    # Explicit flags win over the advice.
    cfg = plan_run([str(tiny), "--auto", "--lr", "2e-5", "--epochs", "10", "--augment", "light",
                    "--weights", "none", "--output", str(tmp_path / "r")]).cfg
    assert (cfg.lr, cfg.epochs, cfg.auto_augment, cfg.mixup) == (2e-5, 10, None, 0.0)


def test_validation_hold_out_is_stratified_and_stable(small_tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "splits"
    first = make_validation_split(small_tree, val_fraction=0.2, seed=3, cache_root=cache)
    again = make_validation_split(small_tree, val_fraction=0.2, seed=3, cache_root=cache)
    other = make_validation_split(small_tree, val_fraction=0.2, seed=4, cache_root=cache)
    assert first == again != other
    info = json.loads((first / "split.json").read_text())
    assert info["counts"]["validation"] == {"cat": 6, "dog": 6, "fox": 6}
    assert info["counts"]["train"] == {"cat": 24, "dog": 24, "fox": 24}
    val_files = {p.relative_to(first / "val").as_posix() for p in (first / "val").rglob("*.jpg")}
    train_files = {p.relative_to(first / "train").as_posix() for p in (first / "train").rglob("*.jpg")}
    assert len(val_files) == 18 and len(train_files) == 72 and not val_files & train_files
    assert sorted(info["validation_files"]) == sorted(val_files)
    link = next((first / "val" / "dog").iterdir())
    assert link.resolve().parent == (small_tree / "dog").resolve()
    plan = plan_run([str(small_tree), "--weights", "none", "--output", str(tmp_path / "runs" / "x")])
    assert Path(plan.cfg.data).parent == tmp_path / "runs" / ".splits" and plan.stats.num_val == 18


def test_diagnosis_follows_the_cards_common_issues() -> None:
    card, cfg = get_card("resnet101"), finetune.finetune_config("resnet101", weights=None)
    over = diagnose(100.0, 62.0, card, cfg)[0]
    assert over.startswith("WARNING overfitting") and "ResNet-50" in over and "--augment" in over
    under = diagnose(41.0, 39.0, get_card("resnet18"), finetune.finetune_config("resnet18", weights=None))[0]
    assert under.startswith("WARNING underfitting") and "--epochs 2" in under and "ResNet-50" in under
    assert diagnose(97.0, 91.0, card, cfg)[0].startswith("fit looks healthy")


def test_out_of_memory_is_caught_with_advice(small_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import launcher.train.loop

    def fail(cfg: object) -> dict:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(launcher.train.loop, "train", fail)
    args = [str(small_tree), "--weights", "none", "--output", str(tmp_path / "r"), "--batch-size", "32",
            "--micro-batch", "16"]
    assert finetune.main(args) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "--micro-batch 8" in err and "global batch of 32" in err


def test_missing_dataset_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert finetune.main([str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_end_to_end_transfers_and_freezes(tmp_path_factory: pytest.TempPathFactory) -> None:
    output, weights, _ = finetuned_run(tmp_path_factory.getbasetemp())
    summary = json.loads((output / "summary.json").read_text())
    # Digits 5-9 were never seen by the backbone (trained on 0-4); a new head on its frozen features learns
    # them from 160 images (chance: 20 %; the same head on random-init features stays near 25 %).
    assert summary["best_top1"] >= 55.0, summary  # measured: 70 %
    assert summary["model"] == "resnet18" and summary["num_classes"] == 5
    report = summary["finetune"]
    assert report["train_top1"] > 50 and report["diagnosis"] and "--force" in " ".join(report["notes"])
    # Eval Steps = 2 with 8 epochs: evaluations after epochs 2, 4, 6 and 8 only.
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if row.get("kind") == "eval"]
    assert [row["epoch"] for row in evals] == [2, 4, 6, 8], evals
    # --trainable-layers 1: everything but fc (weights AND BatchNorm running stats) bit-identical to the file.
    before = torch.load(weights, map_location="cpu", weights_only=True)
    after = torch.load(output / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
    frozen = [k for k in before if not k.startswith("fc.")]
    assert any("running_mean" in k for k in frozen) and any(k.startswith("layer4") for k in frozen)
    changed = [k for k in frozen if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]
    assert after["fc.weight"].shape == (5, 512)
    best = torch.load(output / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert best["classes"] == [f"digit_{d}" for d in range(5, 10)] and best["config"]["model"] == "resnet18"
