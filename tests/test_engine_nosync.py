"""An optimizer step never waits for the device: no host reads of tensors and no collectives inside a step.

On CPU there is no device to wait for, so the test counts the Python-level operations that would block the
host on a GPU (``item``, ``tolist``, ``cpu``, ``numpy``, truth value / int / float of a tensor) and calls of
``torch.distributed`` collectives, inside :meth:`Trainer.train_step` and over whole epochs. With CUDA, the
same training runs under ``torch.cuda.set_sync_debug_mode("error")`` around every step.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
               "reduce_scatter", "all_to_all", "gather", "scatter")


@contextmanager
def counting_syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Counter, Counter]]:
    """Count host reads and collectives: ``(in_step, total)``, split by whether a train step is running."""
    from launcher.train import loop

    in_step, total = Counter(), Counter()
    depth = [0]
    trainer: list[loop.Trainer] = []

    def host_bookkeeping(tensor: object) -> bool:
        # timm's Lamb keeps its step counter on the CPU by design (reading it never waits for a GPU)
        groups = trainer[0].parts.optimizer.param_groups if trainer else []
        return any(tensor is group.get("step") for group in groups)

    def counted(owner: object, name: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args: object, **kwargs: object) -> object:
            if not (args and host_bookkeeping(args[0])):
                total[name] += 1
                if depth[0]:
                    in_step[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    for name in HOST_READS:
        counted(torch.Tensor, name)
    for name in COLLECTIVES:
        counted(torch.distributed, name)
    step = loop.Trainer.train_step

    def train_step(self: loop.Trainer, *args: object) -> None:
        trainer[:] = [self]
        depth[0] += 1
        try:
            step(self, *args)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(loop.Trainer, "train_step", train_step)
    yield in_step, total


def short_run(digits_shards: Path, output: Path, updates: int, **overrides: object) -> dict:
    from launcher.train.command import load_recipe
    from launcher.train.loop import train

    cfg = dataclasses.replace(
        load_recipe("a3"), data=str(digits_shards), model="resnet18", img_size=16, test_img_size=0, epochs=2,
        warmup_epochs=1, global_batch=16, micro_batch=8, limit_train_batches=updates, workers=1, threads=2,
        log_every=1000, progress=False, val_split="", output=str(output), drop_path=0.05, precision="fp32",
        device="cpu")
    return train(dataclasses.replace(cfg, **overrides))


def test_a_training_step_makes_no_host_sync_and_no_collective(digits_shards: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {}
    for updates in (2, 5):
        with counting_syncs(monkeypatch) as (in_step, total):
            summary = short_run(digits_shards, tmp_path / f"u{updates}", updates)
        monkeypatch.undo()
        assert summary["steps"] == 2 * updates and summary["accumulation"] == 2
        assert sum(in_step.values()) == 0, f"host syncs inside optimizer steps: {dict(in_step)}"
        counts[updates] = total
    # Outside the steps the host reads at log intervals and epoch ends only: the same for 2 or 5 steps/epoch.
    assert counts[2] == counts[5], (dict(counts[2]), dict(counts[5]))
    assert counts[2]["item"] >= 1  # the counter sees the loss read at the epoch's log line


def test_the_counter_sees_a_sync_in_a_step(digits_shards: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The test above cannot pass by accident: a loss read inside the step is counted."""
    from launcher.train import loop

    step = loop.Trainer.train_step

    def syncing_step(self: loop.Trainer, batches: object, window: loop.Window) -> None:
        step(self, batches, window)
        float(window.loss)  # what a per-step loss print would do

    monkeypatch.setattr(loop.Trainer, "train_step", syncing_step)
    with counting_syncs(monkeypatch) as (in_step, _):
        short_run(digits_shards, tmp_path / "run", 2, epochs=1, warmup_epochs=0)
    assert in_step["__float__"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (set_sync_debug_mode checks device syncs)")
def test_cuda_step_passes_sync_debug_mode_error(digits_shards: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.train import loop

    step = loop.Trainer.train_step

    def strict_step(self: loop.Trainer, *args: object) -> None:
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(loop.Trainer, "train_step", strict_step)
    summary = short_run(digits_shards, tmp_path / "cuda", 3, device="cuda", precision="bf16", workers=2)
    assert summary["steps"] == 6
