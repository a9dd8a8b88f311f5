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
import dataclasses
import logging
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from launcher.config import ConfigError
from launcher.models.registry import unwrap_model

log = logging.getLogger("launcher.train")

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
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap_model(model).state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Progress and seeding
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Progress:
    """Where the run is; saved in every checkpoint. ``update`` counts optimizer steps inside ``epoch``."""

    epoch: int = 0
    update: int = 0
    step: int = 0
    best_top1: float = -1.0
    best_step: int = -1
    evals_since_best: int = 0
    final: dict[str, Any] = dataclasses.field(default_factory=dict)
    wandb_id: str | None = None
    train_images: int = 0
    train_seconds: float = 0.0
    data_seconds: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Exact-resume state
# --------------------------------------------------------------------------------------------------

def _is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def resumable_state(parts: Any, accelerator: Accelerator, progress: dict[str, Any],
                    output: Path) -> dict[str, Any]:
    """Everything an identical continuation needs. Collective: every rank must call it."""
    rng = [capture_rng_state()]
    if accelerator.num_processes > 1:
        gathered: list[Any] = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(gathered, rng[0])
        rng = gathered
    optimizer_state = None
    if _is_deepspeed(accelerator):  # ZeRO partitions the optimizer state: DeepSpeed writes its own files
        accelerator.save_state(str(output / "checkpoints" / "deepspeed"))
    else:
        optimizer_state = parts.optimizer.state_dict()
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    return {
        "format_version": FORMAT_VERSION,
        "model": model_state_dict(accelerator.unwrap_model(parts.model)),
        "config": parts.config_dict,
        "classes": parts.classes,
        "epoch": progress["epoch"],
        "step": progress["step"],
        "optimizer": optimizer_state,
        "scheduler": parts.scheduler.state_dict(),
        "scaler": scaler,
        "ema": model_state_dict(parts.ema.module) if parts.ema is not None else None,
        "rng": rng,
        "progress": progress,
        "data_position": {"epoch": progress["epoch"], "update": progress["update"],
                          "micro_batch_index": progress["update"] * parts.accumulation},
        "world_size": accelerator.num_processes,
        "micro_batch": parts.micro_batch,
        "accumulation": parts.accumulation,
        "best_top1": progress["best_top1"],
        "wandb_run_id": progress["wandb_id"],
    }


def restore(state: dict[str, Any], parts: Any, accelerator: Accelerator) -> Progress:
    """Load a resumable checkpoint into the prepared parts; returns the restored progress."""
    if state.get("progress") is None or ("optimizer" not in state):
        raise ConfigError("resume: this checkpoint holds weights only (e.g. best.pt); resume from last.pt "
                          "or a step-*.pt file")
    old = state["config"]
    for key in ("model", "global_batch", "epochs", "img_size", "opt", "num_classes"):
        new = parts.config_dict.get(key)
        if old.get(key) != new:
            log.warning("resume: %s changed from %r to %r; the continuation differs from the original run",
                        key, old.get(key), new)
    accelerator.unwrap_model(parts.model).load_state_dict(state["model"])
    if _is_deepspeed(accelerator):
        accelerator.load_state(str(Path(state["config"]["output"]) / "checkpoints" / "deepspeed"))
    else:
        parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    if parts.ema is not None:
        if state.get("ema") is not None:
            parts.ema.module.load_state_dict(state["ema"])
        else:
            log.warning("resume: the checkpoint has no EMA weights; the EMA restarts from the current weights")
            parts.ema.module.load_state_dict(accelerator.unwrap_model(parts.model).state_dict())
    same_layout = (state["world_size"] == accelerator.num_processes and state["micro_batch"] == parts.micro_batch)
    rank = accelerator.process_index
    if same_layout:
        restore_rng_state(state["rng"][rank])
    else:
        log.warning("resume: world size / micro-batch changed (%d x %d -> %d x %d): training continues at the same "
                    "step with the same global batch, but data order and augmentation differ from the original",
                    state["world_size"], state["micro_batch"], accelerator.num_processes, parts.micro_batch)
        seed_everything(parts.config_dict["seed"] + rank + 1000 * state["step"])
    fields = {f.name for f in dataclasses.fields(Progress)}
    return Progress(**{k: v for k, v in state["progress"].items() if k in fields})
