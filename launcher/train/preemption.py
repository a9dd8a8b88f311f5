"""Graceful preemption: SIGUSR1 / SIGTERM -> finish the step, checkpoint, exit with a known code.

Signal handlers only set a flag. At every optimizer-step boundary the ranks all-reduce the flag (one
scalar, cheap), so every rank stops after the same step even if only one of them was signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import torch

# sysexits.h EX_TEMPFAIL: "temporary failure, try again" - the SLURM scripts requeue on it.
PREEMPTED_EXIT_CODE = 75
PREEMPTED_FILE = "PREEMPTED"
HANDLED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Raised out of ``train`` after the preemption checkpoint is written."""


class PreemptionFlag:
    """Installs the handlers on enter, restores the previous ones on exit."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

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

    def agreed(self, device: torch.device, distributed: bool) -> bool:
        """True on every rank if any rank was signalled (a collective: call it on all ranks together)."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        if distributed:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)


def write_marker(output: Path, *, step: int, epoch: int, signal_name: str | None) -> Path:
    path = Path(output) / PREEMPTED_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "epoch": epoch, "signal": signal_name or "unknown"}) + "\n")
    os.replace(tmp, path)
    return path


def clear_marker(output: Path) -> None:
    (Path(output) / PREEMPTED_FILE).unlink(missing_ok=True)
