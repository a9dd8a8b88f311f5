"""The Accelerator of a run, DeepSpeed included, on GPUs and on CPUs (gloo).

DeepSpeed comes in through ``accelerate launch --config_file recipes/accelerate/deepspeed_zero{1,2}.yaml``
(``ACCELERATE_USE_DEEPSPEED=true``). What it takes to honour it everywhere:

* never ``Accelerator(cpu=True)`` under DeepSpeed: Accelerate would silently drop DeepSpeed;
* on CPU, the gloo backend (otherwise every rank believes it is alone) and DeepSpeed's CPU accelerator named
  before DeepSpeed is first imported (no detection warning); its shared-memory all-reduce extension, used
  only for inference, is not built (a 3-minute compile on first use);
* accelerate 1.15's DeepSpeed plugin imports transformers for a ZeRO-3 feature we do not use: skipped;
* precision: the model keeps fp32 weights and BN buffers and runs its forward under autocast (DeepSpeed's
  ``torch_autocast``), like the DDP path; DeepSpeed's own bf16 mode casts weights but not BN buffers and
  fails on CPU;
* the global gradient-norm clip is DeepSpeed's (``gradient_clipping``): ZeRO hands timm's LAMB one flat
  partition per group, so LAMB's own clip would see only its partition.

A DeepSpeed checkpoint is a step-tagged folder next to the step's ``.pt`` (which names it): written to a
temporary name by every rank, renamed when complete, so a kill at any point leaves a consistent pair.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from launcher.config import ConfigError

log = logging.getLogger("launcher.train")


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")


def create_accelerator(device: str, precision: str, log_with: str | None) -> Accelerator:
    """Plain Accelerate (DDP) unless launched with a DeepSpeed config."""
    if not deepspeed_requested():
        return Accelerator(cpu=device == "cpu", mixed_precision=precision, log_with=log_with)
    from accelerate import DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    class TransformersFreeDeepSpeedPlugin(DeepSpeedPlugin):
        def set_deepspeed_weakref(self) -> None:  # only ZeRO-3's zero.Init needs it (and transformers)
            if self.zero3_init_flag:
                super().set_deepspeed_weakref()

    handlers = []
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    # mixed precision goes through DeepSpeed's torch_autocast (configure_deepspeed), not its bf16/fp16 weights
    return Accelerator(mixed_precision="no", deepspeed_plugin=TransformersFreeDeepSpeedPlugin(),
                       kwargs_handlers=handlers, log_with=log_with)


def configure_deepspeed(accelerator: Accelerator, cfg: Any, precision: str, micro: int, accumulation: int) -> None:
    """Fill DeepSpeed's config from our batch arithmetic, precision and clipping (before ``prepare``)."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accumulation
    ds["train_batch_size"] = cfg.global_batch
    lamb = cfg.opt.startswith("lamb")
    ds["gradient_clipping"] = min(cfg.clip_grad or 1.0, 1.0) if lamb else float(cfg.clip_grad or 0.0)
    for key in ("bf16", "fp16"):
        ds.setdefault(key, {})["enabled"] = False
    if precision in ("bf16", "fp16"):
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if precision == "bf16" else "float16"}
    if lamb and ds.get("zero_optimization", {}).get("stage", 0) > 0:
        log.warning("DeepSpeed ZeRO hands LAMB flat parameter partitions: its per-layer trust ratio becomes "
                    "per-partition (measured: update norms 0.3x-2.4x of the per-layer ones). For a faithful RSB "
                    "run use plain DDP or ZeRO stage 0; with ZeRO prefer --opt adamw (docs/training.md)")


def save_step_folder(accelerator: Accelerator, folder: Path, step: int) -> str:
    """Every rank writes its ZeRO partition to a temporary folder, renamed when all are done.

    Returns the folder's name (relative to the checkpoint folder, which the step's ``.pt`` records).
    """
    name = f"step-{step:08d}"
    tmp = folder / f".{name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(folder / name, ignore_errors=True)  # the same step saved again after a resume
        os.replace(tmp, folder / name)
    accelerator.wait_for_everyone()
    return name


def load_step_folder(accelerator: Accelerator, checkpoint: Path, state: dict[str, Any]) -> None:
    folder = checkpoint.parent / state["deepspeed"]
    if not folder.is_dir():
        raise ConfigError(f"resume: {checkpoint} names the DeepSpeed folder {folder}, which is missing")
    saved_world = state["shape"]["world_size"]
    if saved_world != accelerator.num_processes:
        raise ConfigError(f"resume: this DeepSpeed checkpoint was written by {saved_world} processes and ZeRO "
                          f"partitions cannot be re-cut: launch with --num_processes {saved_world}")
    accelerator.load_state(str(folder))


def clean_step_folders(folder: Path) -> None:
    """Remove DeepSpeed folders a kill left half-written, or whose ``.pt`` was never written or was pruned."""
    for path in folder.glob(".step-*.tmp"):
        shutil.rmtree(path, ignore_errors=True)
    for path in folder.glob("step-*"):
        if path.is_dir() and not path.with_suffix(".pt").exists():
            shutil.rmtree(path, ignore_errors=True)
