"""Model-card parameters, range checks and `launcher recommend` advice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.finetune.modelcards import (
    CARDS,
    CardRangeError,
    DeviceInfo,
    advise,
    check_params,
    get_card,
    main,
    memory_advice,
    scan_dataset,
)


def make_tree(root: Path, counts: dict[str, int], suffix: str = ".jpg") -> Path:
    """Empty image-named files: scanning only counts names, so this is enough and instant."""
    for name, count in counts.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            (folder / f"{index:05d}{suffix}").touch()
    return root


def test_cards_copy_resnet18_and_resnet101_values() -> None:
    r18, r101 = CARDS["resnet18"], CARDS["resnet101"]
    assert (r18.batch_size.default, r18.batch_size.low, r18.batch_size.high) == (8, 1, 128)
    assert (r18.epochs.default, r18.epochs.low, r18.epochs.high) == (1, 1, 50)
    assert (r18.lr.default, r18.lr.low, r18.lr.high) == (5e-5, 1e-5, 1e-3)
    assert (r101.batch_size.default, r101.batch_size.low, r101.batch_size.high) == (4, 2, 32)
    assert (r101.epochs.default, r101.epochs.low, r101.epochs.high) == (1, 1, 20)
    assert (r101.lr.default, r101.lr.low, r101.lr.high) == (5e-5, 1e-5, 1e-4)
    assert r18.eval_steps.default == r101.eval_steps.default == 1
    assert (r18.min_images, r101.min_images) == (100, 2_000)


def test_derived_cards_follow_the_documented_logic() -> None:
    order = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    cards = [CARDS[name] for name in order]
    assert [card.source for card in cards] == ["card", "derived", "derived", "card", "derived"]
    # Deeper: more data needed, gentler LR ceiling, fewer epochs, smaller batch ceiling.
    for shallow, deep in zip(cards, cards[1:]):
        assert deep.min_images > shallow.min_images
        assert deep.lr.high <= shallow.lr.high
        assert deep.epochs.high <= shallow.epochs.high
        assert deep.batch_size.high <= shallow.batch_size.high
    for card in cards:
        assert card.lr.default == 5e-5 and card.epochs.default == 1
        for param in card.params.values():
            assert param.low <= param.default <= param.high
        for tier in card.tiers:
            assert card.lr.low <= tier.lr <= card.lr.high
            assert card.epochs.low <= tier.epochs[0] <= tier.epochs[1] <= card.epochs.high
            assert card.batch_size.low <= tier.batch_size[0] <= tier.batch_size[1] <= card.batch_size.high


def test_get_card_accepts_weight_qualified_names() -> None:
    assert get_card("resnet50.a1_in1k").name == "resnet50"
    assert get_card("ResNet-18").name == "resnet18"
    with pytest.raises(ValueError, match="resnet18"):
        get_card("vit_base_patch16_224")


@pytest.mark.parametrize(("model", "key", "value", "allowed"), [
    ("resnet18", "batch_size", 256, "1..128"),
    ("resnet18", "lr", 5e-3, "1e-5..1e-3"),
    ("resnet101", "epochs", 30, "1..20"),
    ("resnet101", "lr", 3e-4, "1e-5..1e-4"),
    ("resnet101", "batch_size", 1, "2..32"),
])
def test_out_of_range_is_refused_with_the_range(model: str, key: str, value: float, allowed: str) -> None:
    card = get_card(model)
    with pytest.raises(CardRangeError) as error:
        check_params(card, {key: value})
    assert allowed in str(error.value) and "--force" in str(error.value)
    warnings = check_params(card, {key: value}, force=True)
    assert len(warnings) == 1 and allowed in warnings[0]
    assert check_params(card, {key: card.params[key].default, "epochs": None}) == []


def test_recommend_tiny_small_medium(tmp_path: Path) -> None:
    tiny = scan_dataset(make_tree(tmp_path / "tiny", {"cat": 30, "dog": 30}))
    advice = advise(get_card("resnet18"), tiny)
    assert (advice.tier.name, advice.lr, advice.batch_size, advice.augmentation) == ("tiny", 1e-5, 4, "maximum")
    assert 30 <= advice.epochs <= 50

    small = scan_dataset(make_tree(tmp_path / "small", {"a": 200, "b": 200, "c": 200}))
    advice = advise(get_card("resnet18"), small)
    assert (advice.tier.name, advice.lr, advice.augmentation) == ("small", 5e-5, "heavy")
    assert 15 <= advice.epochs <= 25 and advice.class_weights is None
    r101 = advise(get_card("resnet101"), small)
    text = "\n".join(r101.lines)
    assert "overfitting likely" in text and "consider ResNet-50" in text

    medium = scan_dataset(make_tree(tmp_path / "medium", {"a": 1500, "b": 1500}))
    advice = advise(get_card("resnet18"), medium)
    assert advice.tier.name == "medium" and advice.batch_size == 32
    assert "consider ResNet-50" in "\n".join(advice.lines)
    assert advise(get_card("resnet101"), medium).tier.name == "small"


def test_imbalance_and_splits_are_reported(tmp_path: Path) -> None:
    root = tmp_path / "imb"
    make_tree(root / "train", {"common": 120, "rare": 8})
    make_tree(root / "val", {"common": 10, "rare": 3})
    stats = scan_dataset(root)
    assert stats.train_counts == {"common": 120, "rare": 8} and stats.num_val == 13
    assert stats.imbalance == 15
    advice = advise(get_card("resnet18"), stats)
    assert advice.class_weights == "balanced"
    text = "\n".join(advice.lines)
    assert "--class-weights balanced" in text and "rare (8)" in text


def test_shard_folder_counts_come_from_info_json(tmp_path: Path) -> None:
    (tmp_path / "_info.json").write_text(json.dumps({
        "splits": {}, "classes": ["a", "b"],
        "class_counts": {"train": {"a": 700, "b": 600}, "validation": {"a": 70, "b": 60}}}))
    stats = scan_dataset(tmp_path)
    assert (stats.kind, stats.num_train, stats.num_val) == ("shards", 1300, 130)


def test_memory_advice_for_gpu_and_cpu() -> None:
    r101 = get_card("resnet101")
    small_gpu = "\n".join(memory_advice(r101, DeviceInfo("cuda", "Test GPU", 8.0, 8)))
    assert "below the card's minimum of 10 GB" in small_gpu and "4-8" in small_gpu
    big_gpu = "\n".join(memory_advice(r101, DeviceInfo("cuda", "Test GPU", 23.6, 8)))
    assert "16-32" in big_gpu and "--micro-batch" in big_gpu
    cpu = "\n".join(memory_advice(r101, DeviceInfo("cpu", "CPU", 16, 4)))
    assert "not recommended" in cpu
    assert "viable" in "\n".join(memory_advice(get_card("resnet18"), DeviceInfo("cpu", "CPU", 16, 4)))


def test_recommend_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_tree(tmp_path / "imgs", {"a": 40, "b": 40}, suffix=".png")
    (root / "a" / "notes.txt").write_text("not an image")
    assert main([str(root), "--model", "resnet101"]) == 0
    out = capsys.readouterr().out
    assert "80 training images" in out and "2 classes" in out and "consider ResNet-50" in out
    assert "device:" in out
    assert main([str(root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_train"] == 80 and data["tier"] == "tiny"
    assert main([str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
