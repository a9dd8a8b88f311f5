"""TrainConfig: flags from the dataclass, YAML round-trip, the LR rule, one-line errors naming the setting."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.config import (
    FIELD_NAMES,
    ConfigError,
    TrainConfig,
    build_parser,
    load_config,
    parse_config,
    save_config,
)
from launcher.train.batching import accumulation_steps, micro_batch_candidates
from launcher.train.command import load_recipe

REPO = Path(__file__).resolve().parents[1]


def test_every_field_has_default_and_help() -> None:
    for f in dataclasses.fields(TrainConfig):
        assert f.default is not dataclasses.MISSING, f.name
        assert f.metadata.get("help"), f.name


def test_help_lists_every_field_with_its_default() -> None:
    text = build_parser(load_recipe("a2")).format_help()
    for name in FIELD_NAMES:
        assert "--" + name.replace("_", "-") in text, name
    assert "(default: 300)" in text  # the recipe's epochs, not the dataclass default
    assert "--no-channels-last" in text


def test_recipe_help_runs_as_a_script() -> None:
    result = subprocess.run([sys.executable, str(REPO / "recipes" / "a3.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--global-batch" in result.stdout and "--micro-batch" in result.stdout


def test_flags_override_recipe_with_types() -> None:
    base = load_recipe("a3")
    cfg = parse_config(["--data", "d", "--model", "resnet101", "--epochs", "50", "--scale", "0.5", "1",
                        "--no-channels-last", "--bce-target-thresh", "none", "--auto-augment", "None",
                        "--pretrained", "resnet50.a1_in1k", "--trainable-layers", "2"], base)
    assert (cfg.model, cfg.epochs, cfg.scale, cfg.channels_last) == ("resnet101", 50, (0.5, 1.0), False)
    assert cfg.bce_target_thresh is None and cfg.auto_augment is None
    assert cfg.pretrained == "resnet50.a1_in1k" and cfg.trainable_layers_value() == 2
    assert cfg.img_size == 160 and cfg.lr == base.lr  # untouched fields keep the recipe's values


def test_lr_rule_scales_with_global_batch_unless_lr_given() -> None:
    from launcher.models.optim import scaled_lr

    base = load_recipe("a2")
    same = parse_config(["--data", "d"], base)
    assert same.resolved_lr() == pytest.approx(5e-3)
    smaller = parse_config(["--data", "d", "--global-batch", "512"], base)
    assert smaller.resolved_lr() == pytest.approx(scaled_lr(5e-3, 2048, 512, "lamb"))
    assert smaller.resolved_lr() == pytest.approx(5e-3 * math.sqrt(512 / 2048))
    sgd = parse_config(["--data", "d", "--global-batch", "512", "--opt", "sgd"], base)
    assert sgd.resolved_lr() == pytest.approx(5e-3 * 512 / 2048)
    explicit = parse_config(["--data", "d", "--global-batch", "512", "--lr", "0.01"], base)
    assert explicit.resolved_lr() == pytest.approx(0.01) and explicit.lr_rule() == "as given"


def test_yaml_round_trip_and_config_flag(tmp_path: Path) -> None:
    cfg = parse_config(["--data", "d", "--epochs", "7", "--scale", "0.3", "0.9"], load_recipe("a1"))
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    again = parse_config(["--config", str(path), "--epochs", "9"], TrainConfig())
    assert again == dataclasses.replace(cfg, epochs=9)


@pytest.mark.parametrize(("argv", "needle"), [
    (["--model", "resnet9"], "model="),
    (["--micro-batch", "3", "--mixup", "0.1"], "micro_batch=3"),
    (["--global-batch", "100", "--micro-batch", "24"], "global_batch=100"),
    (["--crop-pct", "1.5"], "crop_pct"),
    (["--precision", "fp8"], "precision"),
    (["--epochs", "x"], "epochs"),
    (["--resume", "/nonexistent/last.pt"], "resume="),
    (["--trainable-layers", "6"], "trainable_layers must be 'all' or 1..5"),
    (["--workers", "-1"], "workers must be >= 0"),
])
def test_bad_setting_is_one_line_naming_it(argv: list[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(["--data", "d", *argv], load_recipe("a2"))
    message = str(info.value)
    if needle not in message:  # argparse choices errors are printed by argparse itself
        assert needle.replace("_", "-") in capsys.readouterr().err
    assert "\n" not in message


def test_warmup_longer_than_the_run_is_accepted() -> None:
    """A smoke test runs a recipe for 2 epochs; the scheduler shortens the recipe's 5 warmup epochs."""
    cfg = parse_config(["--data", "d", "--epochs", "2"], load_recipe("a3"))
    assert (cfg.epochs, cfg.warmup_epochs) == (2, 5)
    with pytest.raises(ConfigError, match="warmup_epochs must be >= 0"):
        parse_config(["--data", "d", "--warmup-epochs", "-1"], load_recipe("a3"))


@pytest.mark.parametrize(("name", "value"), [("LAUNCHER_PROGRESS", "fancy"), ("LAUNCHER_PROGRESS_INTERVAL", "soon")])
def test_bad_progress_environment_is_a_config_error(name: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"{name}='{value}'"):
        parse_config(["--data", "d"], load_recipe("a3"))


def test_bad_yaml_key_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown setting\(s\) learning_rate"):
        load_config(path)


def test_launcher_train_bad_setting_exit_code_and_message(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "launcher.cli", "train", "--recipe", "a2", "--data", str(tmp_path),
                             "--model", "resnet9"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "model='resnet9'" in lines[0]


def test_batch_arithmetic_errors_name_the_numbers() -> None:
    assert accumulation_steps(2048, 8, 64) == 4
    with pytest.raises(ConfigError, match=r"global_batch=2048 is not divisible by micro_batch=48 x world size 8"):
        accumulation_steps(2048, 8, 48)
    assert micro_batch_candidates(96, 2, even=True, limit=32) == [24, 16, 12, 8, 6, 4, 2]
    with pytest.raises(ConfigError, match="world size 3"):
        micro_batch_candidates(2048, 3, even=False, limit=64)


def test_changing_the_train_resolution_carries_the_test_resolution_at_the_recipe_ratio() -> None:
    a3 = load_recipe("a3")  # trains at 160, also evaluated at 224
    assert parse_config(["--data", "d", "--img-size", "32"], a3).test_img_size == 45  # round(32 * 224 / 160)
    assert parse_config(["--data", "d", "--img-size", "32", "--test-img-size", "0"], a3).test_img_size == 0
    assert parse_config(["--data", "d"], a3).test_img_size == 224
    assert parse_config(["--data", "d", "--img-size", "64"], load_recipe("a2")).test_img_size == 0  # A2 has none
