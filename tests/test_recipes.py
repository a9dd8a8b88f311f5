"""The recipes hold the paper's Table 1 rows; the shipped Accelerate / DeepSpeed configs are valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launcher.config import validate
from launcher.train.command import load_recipe

REPO = Path(__file__).resolve().parents[1]

COMMON = dict(model="resnet50", global_batch=2048, lr_ref_batch=2048, opt="lamb", warmup_epochs=5, warmup_lr=1e-4,
              min_lr=1e-6, sched_on_updates=False, loss="bce", bce_target_thresh=0.2, cutmix=1.0, crop_pct=0.95,
              interpolation="bicubic", model_ema=False, precision="auto", hflip=0.5, scale=(0.08, 1.0))
TABLE = {
    "a1": dict(epochs=600, img_size=224, lr=5e-3, weight_decay=0.01, smoothing=0.1, mixup=0.2,
               auto_augment="rand-m7-mstd0.5-inc1", aug_repeats=3, drop_path=0.05),
    "a2": dict(epochs=300, img_size=224, lr=5e-3, weight_decay=0.02, smoothing=0.0, mixup=0.1,
               auto_augment="rand-m7-mstd0.5-inc1", aug_repeats=3, drop_path=0.05),
    "a3": dict(epochs=100, img_size=160, test_img_size=224, lr=8e-3, weight_decay=0.02, smoothing=0.0, mixup=0.1,
               auto_augment="rand-m6-mstd0.5-inc1", aug_repeats=0, drop_path=0.0),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_recipe_matches_paper_table(name: str) -> None:
    recipe = load_recipe(name)
    for key, value in {**COMMON, **TABLE[name]}.items():
        assert getattr(recipe, key) == value, f"{name}.{key}"
    assert recipe.recipe == name
    validate(recipe.__class__(**{**recipe.__dict__, "data": "x"}))


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] in ("NO", "MULTI_CPU", "MULTI_GPU", "DEEPSPEED")
    assert config["num_processes"] >= 1
    if config["distributed_type"] == "DEEPSPEED":
        ds_file = REPO / config["deepspeed_config"]["deepspeed_config_file"]
        assert ds_file.is_file(), ds_file


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_configs_are_accepted_by_accelerate(stage: int) -> None:
    from accelerate.utils import DeepSpeedPlugin

    path = REPO / "recipes" / "deepspeed" / f"zero{stage}.json"
    config = json.loads(path.read_text())
    assert config["zero_optimization"]["stage"] == stage
    assert config["zero_allow_untested_optimizer"] is True  # timm's LAMB stays the optimizer
    assert config["gradient_clipping"] == "auto"  # the engine fills it in: LAMB's global clip at 1.0, or --clip-grad
    plugin = DeepSpeedPlugin(hf_ds_config=str(path))
    assert plugin.zero_stage == stage
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == "auto"  # the engine fills it in


@pytest.mark.parametrize(("opt", "clip", "expected"), [("lamb", None, 1.0), ("lamb", 0.5, 0.5), ("adamw", None, 0.0),
                                                        ("sgd", 2.0, 2.0)])
def test_engine_fills_deepspeed_batch_clip_and_autocast(opt: str, clip: float | None, expected: float) -> None:
    from types import SimpleNamespace

    from launcher.config import TrainConfig
    from launcher.train.accelerator import configure_deepspeed

    config = json.loads((REPO / "recipes" / "deepspeed" / "zero2.json").read_text())
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))
    configure_deepspeed(accelerator, TrainConfig(opt=opt, clip_grad=clip, global_batch=64), "bf16", micro=8,
                        accumulation=4)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (8, 4, 64)
    assert config["gradient_clipping"] == expected
    # fp32 weights and BN buffers, forward under autocast (DeepSpeed's own bf16 casts weights, not BN buffers)
    assert config["bf16"]["enabled"] is False and config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
