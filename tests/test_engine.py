"""Engine pieces: micro-batch probe, checkpoint files and RNG, trackers, and the LR the loop applies."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import recipe_command, subprocess_env
from torch import nn

from launcher.train.batching import probe_micro_batch
from launcher.train.checkpoints import CheckpointWriter, atomic_save, load_checkpoint
from launcher.train.preemption import PREEMPTED_EXIT_CODE
from launcher.train.state import capture_rng_state, restore_rng_state
from launcher.train.tracking import plot_curves, prepare_wandb_environment, read_metrics


class PretendsToRunOutOfMemory(nn.Module):
    """Raises the CUDA OOM message for batches above a limit, like a GPU with little memory."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > self.limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


def test_probe_backs_off_to_largest_fitting_and_leaves_model_untouched() -> None:
    torch.manual_seed(0)
    model = PretendsToRunOutOfMemory(limit=40)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    found = probe_micro_batch(model, [128, 64, 32, 16], img_size=8, num_classes=10, device=torch.device("cpu"),
                              autocast=lambda: torch.autocast("cpu", enabled=False),
                              channels_last=True)
    assert found == 32
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats restored too
    assert torch.equal(rng_before, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


def test_probe_reraises_other_errors() -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        probe_micro_batch(Broken(), [8], img_size=8, num_classes=2, device=torch.device("cpu"),
                          autocast=lambda: torch.autocast("cpu", enabled=False), channels_last=False)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), np.random.normal(), torch.rand(3))
    atomic_save({"model": {}, "rng": [state]}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(loaded["rng"][0])
    again = (random.random(), np.random.rand(), np.random.normal(), torch.rand(3))
    assert expected[:3] == again[:3] and torch.equal(expected[3], again[3])


def test_checkpoint_dir_keeps_k_and_points_last_at_newest(tmp_path: Path) -> None:
    ckpt = CheckpointWriter(tmp_path, keep=2)
    for step in (10, 20, 30):
        ckpt.save_resumable({"model": {"w": torch.tensor([float(step)])}, "step": step}, step)
    ckpt.wait()
    assert [p.name for p in ckpt.step_checkpoints()] == ["step-00000020.pt", "step-00000030.pt"]
    assert load_checkpoint(ckpt.last)["step"] == 30
    path, state = ckpt.resolve_resume("auto")
    assert path == ckpt.last and state is not None and state["step"] == 30
    assert CheckpointWriter(tmp_path / "empty", keep=2).resolve_resume("auto") == (None, None)
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind


def test_load_checkpoint_rejects_pickled_objects_and_foreign_files(tmp_path: Path) -> None:
    torch.save({"model": {}, "obj": PretendsToRunOutOfMemory(1)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="pickled.pt cannot be loaded safely"):
        load_checkpoint(tmp_path / "pickled.pt")
    torch.save({"weights": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt is not a resnet-launcher checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_wandb_goes_offline_without_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "missing-netrc"))
    assert prepare_wandb_environment() == "offline"
    assert os.environ["WANDB_MODE"] == "offline"


def test_curves_png_from_metrics(tmp_path: Path) -> None:
    lines = [{"kind": "train", "step": s, "loss": 1.0 / s, "lr": 0.1 * s} for s in range(1, 5)]
    lines += [{"kind": "eval", "step": 4, "tag": "val", "loss": 0.5, "top1": 80.0, "top5": 99.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"torn": ')
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 5  # the torn last line is skipped
    png = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_preempted_exit_code_is_exported_from_engine() -> None:
    from launcher.train.loop import PREEMPTED_EXIT_CODE as from_engine

    assert from_engine == PREEMPTED_EXIT_CODE == 75


@pytest.mark.slow
@pytest.mark.parametrize("on_updates", [False, True])
def test_engine_applies_timm_cosine_schedule(digits_shards: Path,
                                              tmp_path: Path, on_updates: bool) -> None:
    """The LR logged after every optimizer step equals timm's CosineLRScheduler for the recipe."""
    from timm.scheduler import CosineLRScheduler

    from launcher.train.command import load_recipe
    from launcher.train.loop import train

    updates = 2
    cfg = dataclasses.replace(
        load_recipe("a3"), data=str(digits_shards), model="resnet18", img_size=16, test_img_size=0, epochs=4,
        warmup_epochs=1, global_batch=8, micro_batch=8, limit_train_batches=updates, workers=0, threads=2,
        log_every=1, progress=False, val_split="", output=str(tmp_path / "run"), sched_on_updates=on_updates,
        auto_augment=None, precision="fp32")  # fp32: this test is about the LR, and CPU bf16 has given NaN at 16 px
    summary = train(cfg)
    assert summary["steps"] == cfg.epochs * updates
    logged = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]

    reference = CosineLRScheduler(
        torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.resolved_lr()),
        t_initial=cfg.epochs * (updates if on_updates else 1), lr_min=cfg.min_lr,
        warmup_t=cfg.warmup_epochs * (updates if on_updates else 1), warmup_lr_init=cfg.warmup_lr,
        t_in_epochs=not on_updates)
    expected = []
    for step in range(1, cfg.epochs * updates + 1):
        epoch = (step - 1) // updates
        # the LR in the param groups right after `step` updates (timm: step_update(num_updates) after each)
        expected.append(reference._get_lr(step)[0] if on_updates else reference._get_lr(epoch)[0])
    assert logged == pytest.approx(expected, rel=1e-12)
    assert cfg.resolved_lr() == pytest.approx(8e-3 * (8 / 2048) ** 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("limit", [3, 4])  # mid-epoch and exactly at an epoch end
def test_max_train_steps_stops_the_run_there(digits_shards: Path, tmp_path: Path, limit: int) -> None:
    from launcher.train.command import load_recipe
    from launcher.train.loop import train

    cfg = dataclasses.replace(
        load_recipe("a3"), data=str(digits_shards), model="resnet18", img_size=16, test_img_size=0, epochs=5,
        warmup_epochs=1, global_batch=8, micro_batch=8, limit_train_batches=2, max_train_steps=limit, workers=0,
        threads=2, log_every=1, progress=False, val_split="", output=str(tmp_path / "run"), auto_augment=None,
        precision="fp32")
    summary = train(cfg)
    assert summary["steps"] == limit and summary["stop_reason"] == f"max_train_steps={limit} reached"
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, limit + 1))


@pytest.mark.slow
def test_training_output_in_a_file_has_plain_eta_lines(digits_shards: Path, tmp_path: Path) -> None:
    """Output to a file, as under SLURM / CI / nohup: no carriage-return frames, one line per log interval
    with the ETAs, the evaluation and checkpoint lines. The same run checks two small things: the A3
    recipe's 5 warmup epochs in a 2-epoch run are shortened with a warning, and a CPU run does not print
    DeepSpeed's "Setting accelerator to CPU" (DeepSpeed is installed with the test extra)."""
    command = recipe_command(
        "a3", f"--data={digits_shards}", "--model=resnet18", "--img-size=16", "--test-img-size=0", "--epochs=2",
        "--global-batch=8", "--micro-batch=8", "--limit-train-batches=2", "--limit-eval-batches=1", "--workers=0",
        "--threads=1", "--log-every=1", "--auto-augment=none", "--precision=fp32", "--device=cpu",
        f"--output={tmp_path / 'run'}")
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("LAUNCHER_PROGRESS")}
    log_path = tmp_path / "job.out"
    with open(log_path, "w") as log_file:
        result = subprocess.run(command, cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                timeout=600)
    text = log_path.read_text()
    assert result.returncode == 0, text[-3000:]
    assert "\r" not in text
    progress = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert len(progress) == 4, text  # --log-every 1: 2 epochs x 2 updates
    number = r"\d+\.\d+"
    for line, (epoch, update, step) in zip(progress, [(1, 1, 1), (1, 2, 2), (2, 1, 3), (2, 2, 4)]):
        assert re.fullmatch(rf"epoch {epoch}/2  update {update}/2  step {step}/4  loss {number}  lr {number}e-\d\d  "
                            rf"{number} img/s  data wait \d+%  ETA epoch \d+:\d\d:\d\d, run \d+:\d\d:\d\d", line), line
    assert progress[-1].endswith("ETA epoch 0:00:00, run 0:00:00")
    assert len(re.findall(r"^eval val +step \d+: loss", text, re.M)) == 2
    assert len(re.findall(r"^checkpoint: step \d+ -> ", text, re.M)) == 2
    assert "warmup_epochs=5 is not shorter than epochs=2: warmup shortened to 1 epoch" in text
    assert "Setting accelerator to CPU" not in text
    assert (tmp_path / "run" / "train.log").read_text().count(" ETA epoch ") == 4


def test_cpu_runs_name_deepspeeds_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.train.precision import configure_backends

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    configure_backends("cpu", deterministic=False, threads=0)
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")  # the user's choice is kept
    configure_backends("cpu", deterministic=False, threads=0)
    assert os.environ["DS_ACCELERATOR"] == "xpu"
