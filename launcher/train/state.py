"""The run's state: what a checkpoint holds, how it is written (atomically, off the training path), read,
versioned and restored - on the same or on another shape (world size x micro-batch).

Files in ``<run>/checkpoints/``::

  step-00001234.pt   resumable checkpoint after optimizer step 1234 (the newest ``keep`` are kept)
  last.pt            the newest resumable checkpoint (a hard link to a step file, or the file itself)
  best.pt            weights with the best validation top-1 so far (+ config, classes, metrics)

A resumable checkpoint (``kind: "resumable"``) holds, as plain tensors / numbers / strings so that it loads
with ``torch.load(weights_only=True)``: ``model``, ``optimizer`` (None under DeepSpeed, whose own files are
named by ``deepspeed``), ``scheduler``, ``scaler``, ``ema`` (weights or None), ``bn_by_rank`` (every rank's
BatchNorm running statistics: they differ between ranks inside an epoch), ``rng`` (every rank's generators),
``progress`` (epoch, update inside it, global step, best metric, counters), ``shape`` (world size, micro-batch,
accumulation), ``config`` and ``classes``. ``best.pt`` (``kind: "weights"``) holds ``model`` (the EMA weights when
EMA is on: ``weights: "ema"``), ``config``, ``classes``, ``epoch``, ``step`` and ``metrics``.

Where training is in the data is ``(epoch, update)``; the data plan makes global batch ``update`` of ``epoch``
the same samples with the same augmentation on any shape, so a checkpoint written on N processes continues on M.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from launcher.config import ConfigError
from launcher.data.plan import mix_seed
from launcher.models.registry import unwrap_model

FORMAT_VERSION = 2
log = logging.getLogger("launcher.train")


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


@dataclasses.dataclass(frozen=True)
class Shape:
    """How a run is laid out on hardware; the optimization does not depend on it."""

    world_size: int
    micro_batch: int
    accumulation: int

    def __str__(self) -> str:
        return f"{self.world_size} process(es) x micro-batch {self.micro_batch} x accumulation {self.accumulation}"


# --------------------------------------------------------------------------------------------------
# Seeding: every random draw of training is a function of (seed, position), never of the hardware
# --------------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_micro_batch(seed: int, epoch: int, update: int, micro: int) -> None:
    """Seed the draws made on the device side of micro-batch ``micro`` of global batch ``update``.

    timm's Mixup draws from numpy's global RNG and DropPath from torch's generator; seeding both from the
    micro-batch's position makes mixup/cutmix (pairing, lambda, box) and drop-path the same whichever rank
    or accumulation step computes it, and makes a resume exact without restoring generator states.
    """
    value = mix_seed(seed, epoch, update, micro, 0x3D1C)
    np.random.seed(value & 0xFFFFFFFF)
    torch.manual_seed(value & 0x7FFFFFFFFFFFFFFF)


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch and CUDA generator states, as tensors (weights_only-safe)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": torch.tensor(py_internal, dtype=torch.int64), "python_version": int(py_version),
        "python_gauss": py_gauss, "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos), "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss),
        "numpy_name": str(np_name), "torch": torch.get_rng_state(),
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
# Building and reading the state
# --------------------------------------------------------------------------------------------------

def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict on CPU with plain torchvision/timm key names (no DDP ``module.``/compile prefixes)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap_model(model).state_dict().items()}


def cpu_copy(value: Any) -> Any:
    """A deep copy with every tensor on the CPU: the snapshot must not change while training goes on."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(cpu_copy(v) for v in value)
    return value


def bn_running_stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The BatchNorm buffers of this rank (running mean/var and counters)."""
    target = unwrap_model(model)
    return {f"{name}.{buf}": getattr(module, buf).detach().to("cpu", copy=True)
            for name, module in target.named_modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            for buf in ("running_mean", "running_var", "num_batches_tracked") if getattr(module, buf, None) is not None}


def _gather(value: Any, world: int) -> list[Any]:
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def snapshot(parts: Any, accelerator: Any, progress: Progress, *, deepspeed_dir: str | None = None) -> dict[str, Any]:
    """Everything an identical continuation needs, copied to the CPU. Collective: every rank calls it.

    Only the main process keeps the result (others get an empty dict): it alone writes files.
    """
    world = accelerator.num_processes
    rng = _gather(capture_rng_state(), world)
    bn = _gather(bn_running_stats(parts.model), world)
    if not accelerator.is_main_process:
        return {}
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    return {
        "format_version": FORMAT_VERSION,
        "kind": "resumable",
        "model": model_state_dict(parts.model),
        "optimizer": None if deepspeed_dir else cpu_copy(parts.optimizer.state_dict()),
        "deepspeed": deepspeed_dir,
        "scheduler": cpu_copy(parts.scheduler.state_dict()),
        "scaler": cpu_copy(scaler),
        "ema": model_state_dict(parts.ema.module) if parts.ema is not None else None,
        "bn_by_rank": bn,
        "rng": rng,
        "progress": dataclasses.asdict(progress),
        "shape": dataclasses.asdict(parts.shape),
        "config": parts.config_dict,
        "classes": parts.classes,
        "epoch": progress.epoch,
        "step": progress.step,
    }


def best_weights(parts: Any, progress: Progress, metrics: dict[str, float]) -> dict[str, Any]:
    """What best.pt holds: the weights that were evaluated (EMA when on), config, classes and metrics."""
    source = parts.ema.module if parts.ema is not None else parts.model
    return {"format_version": FORMAT_VERSION, "kind": "weights", "model": model_state_dict(source),
            "weights": "ema" if parts.ema is not None else "model", "config": parts.config_dict,
            "classes": parts.classes, "epoch": progress.epoch, "step": progress.step, "metrics": dict(metrics)}


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """Read older checkpoint versions: version 1 kept the shape at the top level and no BN statistics."""
    version = state.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise ConfigError(f"checkpoint format {version} is newer than this resnet-launcher ({FORMAT_VERSION}): upgrade")
    if version == 1:
        state = dict(state)
        if "progress" in state:
            state["kind"] = "resumable"
            state["shape"] = {k: state.get(k, 0) for k in ("world_size", "micro_batch", "accumulation")}
            state.setdefault("bn_by_rank", None)
            state.setdefault("deepspeed", None)
        else:
            state["kind"] = "weights"
            state["weights"] = "ema" if state.get("ema") else "model"
    return state


def restore(state: dict[str, Any], parts: Any, accelerator: Any, *, load_deepspeed: Any = None) -> Progress:
    """Load a resumable checkpoint into the prepared parts (any shape); returns the restored progress."""
    state = upgrade(state)
    if state.get("kind") != "resumable":
        raise ConfigError("resume: this checkpoint holds weights only (e.g. best.pt); resume from last.pt "
                          "or a step-*.pt file")
    old = state["config"]
    for key in ("model", "global_batch", "epochs", "img_size", "opt", "num_classes", "seed", "data"):
        if old.get(key) != parts.config_dict.get(key):
            log.warning("resume: %s changed from %r to %r; the continuation differs from the original run",
                        key, old.get(key), parts.config_dict.get(key))
    unwrap_model(parts.model).load_state_dict(state["model"])
    if state.get("deepspeed"):
        if load_deepspeed is None:
            raise ConfigError("resume: this checkpoint was written by DeepSpeed; launch with the same DeepSpeed config")
        load_deepspeed(state)
    elif state.get("optimizer") is None:
        raise ConfigError("resume: this checkpoint has no optimizer state (written by DeepSpeed?); "
                          "launch with the DeepSpeed config it was written with")
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
            parts.ema.module.load_state_dict(unwrap_model(parts.model).state_dict())
    old_shape = Shape(**state["shape"])
    rank, world = accelerator.process_index, accelerator.num_processes
    stats = state.get("bn_by_rank")
    if stats and len(stats) == world:
        unwrap_model(parts.model).load_state_dict(stats[rank], strict=False)
    elif stats:  # another world size: every rank starts from the average, as dist_bn="reduce" would give
        unwrap_model(parts.model).load_state_dict(_average(stats), strict=False)
    if old_shape.world_size == world and state.get("rng") and len(state["rng"]) == world:
        restore_rng_state(state["rng"][rank])
    fields = {f.name for f in dataclasses.fields(Progress)}
    return Progress(**{k: v for k, v in state["progress"].items() if k in fields})


def _average(stats: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for key in stats[0]:
        values = [s[key] for s in stats]
        out[key] = values[0] if not values[0].is_floating_point() else torch.stack(values).mean(0)
    return out


def saved_shape(state: dict[str, Any]) -> Shape:
    return Shape(**upgrade(state)["shape"])
