"""Graceful preemption: SIGUSR1 / SIGTERM -> finish the step, checkpoint, exit with a known code.

Signal handlers only set a flag. The ranks agree on it without ever stalling the GPU: after every optimizer
step each rank starts an asynchronous all-reduce of its flag on a CPU (gloo) group, and reads the result of
the previous step's all-reduce, which has long arrived. So every rank stops after the same step (one step
after the signal reached any of them) even if only one was signalled, and no collective touches the device.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

# sysexits.h EX_TEMPFAIL: "temporary failure, try again" - the SLURM scripts requeue on it.
PREEMPTED_EXIT_CODE = 75
PREEMPTED_FILE = "PREEMPTED"
HANDLED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Raised out of ``train`` after the preemption checkpoint is written."""


class PreemptionFlag:
    """Installs the handlers on enter, restores the previous ones on exit."""

    def __init__(self, group: Any = None) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._group = group
        self._pending: list[tuple[np.ndarray, Any]] = []

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> PreemptionFlag:
        for sig in HANDLED_SIGNALS:
            # Outside the main thread (e.g. a notebook worker) no handler can be installed.
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def start_agreement(self) -> None:
        """Collective: every rank calls it after every optimizer step (cheap: a CPU all-reduce in flight)."""
        if self._group is None:
            return
        # the vote is read through its numpy array, so reading it is no tensor access (see the no-sync test)
        vote = np.array([1 if self.signal_name else 0], dtype=np.int32)
        work = torch.distributed.all_reduce(torch.from_numpy(vote), op=torch.distributed.ReduceOp.MAX,
                                            group=self._group, async_op=True)
        self._pending.append((vote, work))

    def agreed(self) -> bool:
        """True on every rank, at the same step, once any rank was signalled (reads the previous step's vote)."""
        if self._group is None:
            return self.signal_name is not None
        if len(self._pending) < 2:
            return False
        vote, work = self._pending.pop(0)
        work.wait()  # finished long ago: it was started one optimizer step earlier
        return bool(vote[0])

    def drain(self) -> bool:
        """Wait for every vote in flight (at a boundary all ranks reach together); True if any rank was signalled."""
        any_signal = self.signal_name is not None
        while self._pending:
            vote, work = self._pending.pop(0)
            work.wait()
            any_signal = any_signal or bool(vote[0])
        return any_signal


def control_group() -> Any:
    """A gloo process group for control messages (never the device), or None in a single process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() == 1:
        return None
    if torch.distributed.get_backend() == "gloo":
        return torch.distributed.group.WORLD
    return torch.distributed.new_group(backend="gloo")


def write_marker(output: Path, *, step: int, epoch: int, signal_name: str | None) -> Path:
    path = Path(output) / PREEMPTED_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "epoch": epoch, "signal": signal_name or "unknown"}) + "\n")
    os.replace(tmp, path)
    return path


def clear_marker(output: Path) -> None:
    (Path(output) / PREEMPTED_FILE).unlink(missing_ok=True)
