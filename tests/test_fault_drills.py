"""Fault drills: the ways runs die where our users live, each with the outcome a user needs.

- one rank SIGKILLed mid-epoch: the whole job exits non-zero within 60 s, and resuming is exact;
- the disk fills while a checkpoint is written: the previous checkpoint stays loadable, the run stops
  with one line naming the folder and the space needed;
- a truncated or corrupted last.pt: ``--resume auto`` falls back to the newest intact checkpoint and says so;
- SIGTERM while a checkpoint is being written: both checkpoints intact, the marker names the newer one;
- a shard that disappears mid-run: counted and named in summary.json, every rank finishes its epochs.
(The kill-one-rank drill through the real sbatch template is in tests/test_slurm_cluster.py.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from engine_helpers import REPO, recipe_command, run, subprocess_env

from launcher.train.checkpoints import CheckpointWriter, load_checkpoint
from launcher.train.command import CHECKPOINT_FAILED_EXIT_CODE
from launcher.train.preemption import PREEMPTED_EXIT_CODE

TINY = ["--model", "resnet18", "--img-size", "16", "--test-img-size", "0", "--warmup-epochs", "0",
        "--global-batch", "16", "--micro-batch", "8", "--precision", "fp32", "--workers", "1", "--threads", "1",
        "--log-every", "1", "--limit-eval-batches", "1", "--eval-batch", "32", "--no-progress", "--device", "cpu"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# --------------------------------------------------------------------------------------------- last.pt
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_resume_auto_falls_back_past_a_damaged_last_checkpoint(tmp_path: Path, damage: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    writer = CheckpointWriter(tmp_path, keep=3)
    for step in (10, 20, 30):
        writer.save_resumable({"model": {"w": torch.full((64,), float(step))}, "step": step}, step)
    writer.wait()
    last = tmp_path / "last.pt"  # a hard link to step-30: damaging one damages both, as on a real disk
    if damage == "truncate":
        os.truncate(last, last.stat().st_size // 2)
    else:
        last.unlink()  # a new, garbage last.pt (e.g. a copy torn by a full disk): the step file keeps its bytes
        last.write_bytes(os.urandom(1000))
    with caplog.at_level("WARNING"):
        path, state = writer.resolve_resume("auto")
    assert state is not None
    if damage == "truncate":
        assert path == tmp_path / "step-00000020.pt" and state["step"] == 20
        assert "last.pt" in caplog.text and "step-00000030.pt" in caplog.text and "falling back to step-00000020.pt" in caplog.text
    else:
        assert path == tmp_path / "step-00000030.pt" and state["step"] == 30
        assert "last.pt" in caplog.text and "falling back to step-00000030.pt" in caplog.text


def test_resume_auto_with_every_checkpoint_damaged_is_one_clear_error(tmp_path: Path) -> None:
    from launcher.train.checkpoints import CheckpointError

    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged: last.pt"):
        CheckpointWriter(tmp_path, keep=1).resolve_resume("auto")


# --------------------------------------------------------------------------- SIGTERM during a write
@pytest.mark.slow
def test_sigterm_while_a_checkpoint_is_written(digits_shards: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.train import checkpoints
    from launcher.train.command import load_recipe
    from launcher.train.loop import train
    from launcher.train.preemption import Preempted

    write = checkpoints.atomic_save
    calls = []

    def slow_write_with_sigterm(obj: dict, path: Path) -> Path:
        calls.append(Path(path).name)
        if len(calls) == 1:  # the first resumable checkpoint: SIGTERM arrives in the middle of writing it
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)
        return write(obj, path)

    monkeypatch.setattr(checkpoints, "atomic_save", slow_write_with_sigterm)
    cfg = dataclasses.replace(
        load_recipe("a3"), data=str(digits_shards), model="resnet18", img_size=16, test_img_size=0, epochs=2,
        warmup_epochs=0, global_batch=16, micro_batch=8, limit_train_batches=6, workers=1, threads=2,
        log_every=1, checkpoint_every=2, keep_checkpoints=3, progress=False, val_split="", precision="fp32",
        device="cpu", output=str(tmp_path / "run"))
    with pytest.raises(Preempted):
        train(cfg)
    marker = json.loads((tmp_path / "run" / "PREEMPTED").read_text())
    assert marker["signal"] == "SIGTERM" and marker["step"] == 3  # the step after the one being written
    folder = tmp_path / "run" / "checkpoints"
    assert load_checkpoint(folder / "step-00000002.pt")["step"] == 2  # the interrupted write completed intact
    assert load_checkpoint(folder / "last.pt")["step"] == 3
    assert not list(folder.glob(".*tmp*"))
    monkeypatch.setattr(checkpoints, "atomic_save", write)
    summary = train(dataclasses.replace(cfg, resume="auto"))
    assert summary["steps"] == 12 and summary["resumed_from"].endswith("last.pt")


# ------------------------------------------------------------------------------------------ full disk
def _mount_tmpfs(folder: Path, megabytes: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
                            capture_output=True, text=True)
    return result.returncode == 0


@pytest.mark.slow
def test_full_disk_keeps_the_previous_checkpoint_and_stops_with_one_line(digits_shards: Path,
                                                                         tmp_path: Path) -> None:
    small = tmp_path / "small-disk"
    # resnet18 + LAMB state is ~135 MB per resumable checkpoint: the first fits in 200 MB, a second does not
    if not _mount_tmpfs(small, 200):
        pytest.skip("needs root and tmpfs to make a small disk")
    try:
        output = small / "run"
        result = run(recipe_command("a3", "--data", str(digits_shards), "--output", str(output), *TINY,
                                    "--epochs", "3", "--limit-train-batches", "3", "--checkpoint-every", "2",
                                    "--keep-checkpoints", "1", "--val-split", ""), REPO)
        assert result.returncode == CHECKPOINT_FAILED_EXIT_CODE, result.stderr[-3000:]
        last_line = result.stderr.strip().splitlines()[-1]
        assert last_line.startswith("error: no space left on the device of") and str(output / "checkpoints") in last_line
        assert "needs about" in last_line and "MB free" in last_line and "previous checkpoint is intact" in last_line
        intact = load_checkpoint(output / "checkpoints" / "last.pt")
        assert intact["step"] == 2 and intact["kind"] == "resumable"
        assert not list((output / "checkpoints").glob(".*tmp*"))  # the failed write left nothing behind
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


# ------------------------------------------------------------------------------------ kill one rank
@pytest.mark.slow
def test_one_rank_killed_stops_the_job_within_60_s_and_resume_is_exact(digits_shards: Path,
                                                                        tmp_path: Path) -> None:
    import psutil

    args = [*TINY, "--epochs", "3", "--limit-train-batches", "4", "--checkpoint-every", "1", "--keep-checkpoints", "1",
            "--val-split", ""]
    reference = tmp_path / "reference"
    result = run(recipe_command("a3", "--data", str(digits_shards), "--output", str(reference), *args,
                                processes=2), REPO)
    assert result.returncode == 0, result.stderr[-3000:]

    output = tmp_path / "killed"
    command = recipe_command("a3", "--data", str(digits_shards), "--output", str(output), *args, processes=2)
    job = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (output / "checkpoints" / "step-00000005.pt").exists():  # mid-epoch 2
        assert job.poll() is None and time.monotonic() < deadline, "the run ended or stalled before step 5"
        time.sleep(0.05)
    # the ranks are the launcher's own children (their loader workers, forked, share the environment)
    ranks = [p for p in psutil.Process(job.pid).children(recursive=False) if p.environ().get("RANK") == "1"]
    assert len(ranks) == 1
    ranks[0].kill()
    killed_at = time.monotonic()
    job.communicate(timeout=120)
    assert job.returncode != 0
    assert time.monotonic() - killed_at < 60, "a surviving rank waited in a collective"

    resumed = run(recipe_command("a3", "--data", str(digits_shards), "--output", str(output), *args, "--resume", "auto",
                                 processes=2), REPO)  # what the requeued job runs
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert_same_weights(reference / "checkpoints" / "last.pt", output / "checkpoints" / "last.pt")


# ------------------------------------------------------------------------------ a shard disappears
@pytest.mark.slow
def test_a_shard_that_disappears_mid_run_is_named_and_every_rank_finishes(digits_shards: Path,
                                                                          tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards)
    output = tmp_path / "run"
    command = recipe_command("a3", "--data", str(shards), "--output", str(output), *TINY, "--epochs", "3",
                             "--limit-train-batches", "6", processes=2)
    job = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (output / "checkpoints" / "last.pt").exists():  # the end of epoch 1
        assert job.poll() is None and time.monotonic() < deadline, "the run ended or stalled before epoch 1 ended"
        time.sleep(0.05)
    victim = shards / "shards-train-000003.tar"
    victim.unlink()
    _, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 18 and summary["stop_reason"] == "completed"  # both ranks: 3 epochs x 6 steps
    assert summary["skipped_data"]["skipped"] >= 1
    assert str(victim) in summary["skipped_data"]["by_source"], summary["skipped_data"]


def test_preempted_and_checkpoint_exit_codes_differ() -> None:
    assert PREEMPTED_EXIT_CODE == 75 and CHECKPOINT_FAILED_EXIT_CODE == 74
