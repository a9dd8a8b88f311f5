"""Checkpoint files of a run: atomic writes on a background thread, bounded disk use, and a resume that falls
back to the newest intact checkpoint. What a checkpoint holds is :mod:`launcher.train.state`.

Writing costs the training the copy of the state to the CPU (``state.snapshot``), not the disk: the main
process hands the copy to one writer thread and goes on. At most one write is in flight; the next save waits
for it, so memory and disk stay bounded. Every file goes to a temporary name in the same folder, is fsynced
and renamed: a kill, a full disk or a SIGTERM during a write leaves the previous checkpoint intact. A write
error (e.g. no space left) is raised at the next save or at the end of the run, as one line naming the folder
and the space needed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("launcher.train")

LAST = "last.pt"
BEST = "best.pt"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file or folder."""


def state_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state: about the size the file will have."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(state_bytes(v) for v in obj)
    return 0


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``: never a torn file.

    A disk too small for the file fails before writing, or during it, with one line naming the folder and
    the space needed; the temp file is removed and the file it would have replaced is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    needed = state_bytes(obj)
    _check_space(path, needed)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch's zip writer reports a failed write as a RuntimeError
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        _check_space(path, needed)  # after removing the partial file: is the disk too small for this one?
        raise CheckpointError(f"cannot write checkpoint {path}: {getattr(error, 'strerror', None) or error}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def _check_space(path: Path, needed: int) -> None:
    free = shutil.disk_usage(path.parent).free
    if free < needed * 1.02 + (1 << 20):  # the file holds the tensors plus a little framing
        raise CheckpointError(
            f"no space left on the device of {path.parent} for {path.name}: it needs about {needed / 1e6:.0f} MB "
            f"free ({free / 1e6:.0f} MB are); the previous checkpoint is intact"
        )


def atomic_link(source: Path, target: Path) -> None:
    """Make ``target`` the same file as ``source`` (hard link when possible, else a copy), atomically."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) on CPU; clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / foreign / pickled-object files
        raise ValueError(f"checkpoint {path} cannot be loaded safely: {exc}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"checkpoint {path} is not a resnet-launcher checkpoint, so not a training checkpoint "
                         "(no 'model' entry): use a run folder or runs/<run>/checkpoints/best.pt or last.pt")
    return state


class CheckpointWriter:
    """The checkpoint folder of one run; only the main process writes. Writes run on one background thread."""

    def __init__(self, folder: str | Path, keep: int, background: bool = True) -> None:
        self.folder = Path(folder)
        self.keep = keep
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_written: Path | None = None

    @property
    def last(self) -> Path:
        return self.folder / LAST

    @property
    def best(self) -> Path:
        return self.folder / BEST

    def step_path(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}.pt"

    def step_checkpoints(self) -> list[Path]:
        return sorted(self.folder.glob("step-*.pt"))

    # --- writing --------------------------------------------------------------------------------------
    def save_resumable(self, state: dict[str, Any], step: int, after: Any = None) -> Path:
        """Queue the resumable ``state`` of ``step``; ``after()`` runs on the writer once it is durable."""
        path = self.step_path(step) if self.keep > 0 else self.last
        self._submit(lambda: self._write_resumable(state, path, after))
        return path

    def save_best(self, state: dict[str, Any]) -> Path:
        self._submit(lambda: atomic_save(state, self.best))
        return self.best

    def _write_resumable(self, state: dict[str, Any], path: Path, after: Any) -> None:
        atomic_save(state, path)
        if path != self.last:
            atomic_link(path, self.last)
            for old in self.step_checkpoints()[: -self.keep]:
                old.unlink(missing_ok=True)
                shutil.rmtree(old.with_suffix(""), ignore_errors=True)  # its DeepSpeed folder, if any
        self.last_written = path
        if after is not None:
            after()

    def _submit(self, job: Any) -> None:
        self.wait()  # one write in flight at most: bounded memory and disk
        if not self.background:
            job()
            return

        def run() -> None:
            try:
                job()
            except BaseException as error:  # surfaced on the training thread by wait()
                self._error = error

        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Block until the pending write is on disk; raise its error, if any (once)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()

    def wait_quietly(self) -> None:
        """At the end, whatever happened: let the pending write finish; log (not raise) its error."""
        try:
            self.wait()
        except CheckpointError as error:
            log.error("%s", error)

    def check(self) -> None:
        """Raise a failed background write's error without waiting (cheap: call it often)."""
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, CheckpointError):
                raise CheckpointError(str(error)) from None
            raise CheckpointError(f"writing a checkpoint in {self.folder} failed: {error}") from error

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- reading --------------------------------------------------------------------------------------
    def resolve_resume(self, resume: str) -> tuple[Path | None, dict[str, Any] | None]:
        """``""`` -> nothing; a path -> that file, loaded; ``"auto"`` -> the newest intact resumable checkpoint.

        ``auto`` tries last.pt, then the step files newest first, and says which file it fell back to when
        a newer one is truncated or damaged.
        """
        if not resume:
            return None, None
        if resume != "auto":
            return Path(resume), load_checkpoint(resume)
        candidates = [self.last] if self.last.is_file() else []
        candidates += [p for p in reversed(self.step_checkpoints()) if p not in candidates]
        damaged: list[str] = []
        for path in candidates:
            try:
                state = load_checkpoint(path)
            except (ValueError, FileNotFoundError, OSError) as error:
                damaged.append(f"{path.name} ({str(error).splitlines()[0][:160]})")
                continue
            if damaged:
                log.warning("resume: %s damaged; falling back to %s (step %s)", ", ".join(damaged), path.name,
                            state.get("step"))
            return path, state
        if damaged:
            raise CheckpointError(f"resume auto: every checkpoint in {self.folder} is damaged: {', '.join(damaged)}")
        return None, None
