"""DeepSpeed ZeRO-1 and ZeRO-2 (the configs we ship) through the launch path a GPU user takes:
``accelerate launch --config_file recipes/accelerate/deepspeed_zero{1,2}.yaml --num_processes 2 recipes/a3.py``,
here on 2 CPU processes over gloo. A run is SIGKILLed mid-training (whole process group), resumed with
``--resume auto`` from the newest complete step checkpoint + its DeepSpeed folder, and ends with the same
weights, bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_helpers import REPO, free_port, subprocess_env

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")

ARGS = ["--model", "resnet18", "--img-size", "16", "--test-img-size", "0", "--epochs", "2", "--warmup-epochs", "0",
        "--global-batch", "16", "--micro-batch", "4", "--limit-train-batches", "3", "--precision", "fp32",
        "--workers", "1", "--threads", "1", "--log-every", "1", "--checkpoint-every", "1", "--keep-checkpoints", "1",
        "--val-split", "", "--no-progress", "--drop-path", "0.05"]


def launch_command(stage: int, data: Path, output: Path, *extra: str) -> list[str]:
    config = REPO / "recipes" / "accelerate" / f"deepspeed_zero{stage}.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
            "--main_process_port", str(free_port()), str(REPO / "recipes" / "a3.py"), "--data", str(data),
            "--output", str(output), *ARGS, *extra]


def environment() -> dict[str, str]:
    return dict(subprocess_env(), DS_ACCELERATOR="cpu")


def final_model(output: Path) -> dict[str, torch.Tensor]:
    return torch.load(output / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_trains_checkpoints_is_killed_and_resumes_exactly(stage: int, digits_shards: Path,
                                                               tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    done = subprocess.run(launch_command(stage, digits_shards, reference), cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Setting accelerator to CPU" not in done.stderr
    last = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] == 6 and last["deepspeed"] == "step-00000006" and last["optimizer"] is None
    assert (reference / "checkpoints" / "step-00000006").is_dir()
    assert not (reference / "checkpoints" / "step-00000005").exists()  # pruned with its step file

    output = tmp_path / "killed"
    job = subprocess.Popen(launch_command(stage, digits_shards, output), cwd=REPO, env=environment(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (output / "checkpoints" / "step-00000003.pt").exists():
        assert job.poll() is None and time.monotonic() < deadline, "the run ended or stalled before step 3"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # every rank and the launcher, wherever they are (a save included)
    job.communicate(timeout=60)

    resumed = subprocess.run(launch_command(stage, digits_shards, output, "--resume", "auto"), cwd=REPO,
                             env=environment(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr
    ours, theirs = final_model(output), final_model(reference)
    different = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
    assert not list((output / "checkpoints").glob(".step-*.tmp"))


def test_resuming_deepspeed_on_another_world_size_is_one_clear_error(digits_shards: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    first = subprocess.run(launch_command(2, digits_shards, output, "--max-train-steps", "2"), cwd=REPO,
                           env=environment(), capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    command = launch_command(2, digits_shards, output, "--resume", "auto")
    command[command.index("--num_processes") + 1] = "1"
    again = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=900)
    assert again.returncode != 0
    assert "written by 2 processes" in again.stderr and "--num_processes 2" in again.stderr
