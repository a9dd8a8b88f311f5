"""Checkpoints: atomic writes, exact-resume state, ``torch.load(weights_only=True)`` loading.

Layout of ``<run>/checkpoints/``:
  last.pt              newest resumable checkpoint (what ``--resume auto`` reads)
  step-00001234.pt     resumable checkpoints at optimizer step 1234, the newest ``keep`` kept
  best.pt              weights with the best validation top-1 so far (+ config, classes, metrics)

Every file is a plain dict of tensors / numbers / strings / lists, so it loads with
``weights_only=True``: numpy and python RNG states are stored as int tensors, not pickled objects.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"


# --------------------------------------------------------------------------------------------------
# RNG state <-> tensors
# --------------------------------------------------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch and CUDA generator states, as tensors (weights_only-safe)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": torch.tensor(py_internal, dtype=torch.int64),
        "python_version": int(py_version),
        "python_gauss": py_gauss,
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "numpy_name": str(np_name),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    internal = tuple(int(v) for v in state["python"].tolist())
    random.setstate((state["python_version"], internal, state["python_gauss"]))
    np.random.set_state((state["numpy_name"], state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"])[: torch.cuda.device_count()])


# --------------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------------

def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``: never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def atomic_link(source: Path, target: Path) -> None:
    """Make ``target`` the same file as ``source`` (hard link when possible, else a copy), atomically."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError:
        import shutil

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
                         "(no 'model' entry): use runs/<run>/checkpoints/best.pt or last.pt")
    return state


# --------------------------------------------------------------------------------------------------
# The run's checkpoint folder
# --------------------------------------------------------------------------------------------------

class CheckpointDir:
    """Writes last/best/step checkpoints of one run; only the main process calls the write methods."""

    def __init__(self, folder: str | Path, keep: int) -> None:
        self.folder = Path(folder)
        self.keep = keep

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

    def save_resumable(self, state: dict[str, Any], step: int) -> Path:
        """Write the step checkpoint (when keeping any), point last.pt at it, prune old ones."""
        if self.keep <= 0:
            return atomic_save(state, self.last)
        path = atomic_save(state, self.step_path(step))
        atomic_link(path, self.last)
        for old in self.step_checkpoints()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def save_best(self, state: dict[str, Any]) -> Path:
        return atomic_save(state, self.best)

    def resolve_resume(self, resume: str) -> Path | None:
        """``""`` -> None; ``"auto"`` -> last.pt if present (else None: fresh start); else the given path."""
        if not resume:
            return None
        if resume == "auto":
            return self.last if self.last.is_file() else None
        return Path(resume)


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict on CPU with plain torchvision/timm key names (no DDP ``module.``/compile prefixes)."""
    from launcher.models import unwrap_model

    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap_model(model).state_dict().items()}
