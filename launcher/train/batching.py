"""Global batch = micro-batch x accumulation x world size: the arithmetic and the micro-batch probe."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable

import torch
from torch import nn

from launcher.config import ConfigError

log = logging.getLogger("launcher.train.batching")

CPU_MICRO_BATCH = 32  # big enough for good CPU kernels, small enough for a laptop's memory
MAX_PROBE_BATCH = 1024


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def per_rank_batch(global_batch: int, world_size: int) -> int:
    if global_batch % world_size:
        raise ConfigError(f"global_batch={global_batch} is not divisible by the number of processes "
                          f"(world size {world_size})")
    return global_batch // world_size


def micro_batch_candidates(global_batch: int, world_size: int, *, even: bool, limit: int) -> list[int]:
    """Micro-batches that divide the per-rank batch (largest first), even when mixup pairs samples."""
    per_rank = per_rank_batch(global_batch, world_size)
    found = [d for d in divisors(per_rank) if d <= limit and (not even or d % 2 == 0)]
    if not found:
        raise ConfigError(f"no even micro-batch divides the per-process batch {per_rank} "
                          f"(global_batch={global_batch}, world size {world_size}); mixup/cutmix needs even batches")
    return sorted(found, reverse=True)


def accumulation_steps(global_batch: int, world_size: int, micro_batch: int) -> int:
    """Gradient-accumulation steps; the error names the three numbers when they do not fit."""
    if global_batch % (micro_batch * world_size):
        raise ConfigError(f"global_batch={global_batch} is not divisible by micro_batch={micro_batch} x "
                          f"world size {world_size} = {micro_batch * world_size}")
    return global_batch // (micro_batch * world_size)


def default_cpu_micro_batch(global_batch: int, world_size: int, *, even: bool) -> int:
    return micro_batch_candidates(global_batch, world_size, even=even, limit=CPU_MICRO_BATCH)[0]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def probe_micro_batch(
    model: nn.Module,
    candidates: list[int],
    *,
    img_size: int,
    num_classes: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    channels_last: bool,
) -> int:
    """Largest candidate whose forward + backward fits in GPU memory (tried largest first).

    The model's weights, BN statistics and RNG are left exactly as they were: probing must not change
    the run (a resumed run probes again).
    """
    saved = copy.deepcopy(model.state_dict())
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for batch in candidates:
                try:
                    x = torch.randn(batch, 3, img_size, img_size, device=device)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with autocast():
                        out = model(x)
                    target = torch.randint(0, num_classes, (batch,), device=device)
                    nn.functional.cross_entropy(out.float(), target).backward()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    log.info("micro-batch probe: %d fits", batch)
                    return batch
                except RuntimeError as exc:
                    if not _is_oom(exc):
                        raise
                    log.info("micro-batch probe: %d is out of memory, backing off", batch)
                finally:
                    x = out = None  # noqa: F841 - drop references before emptying the cache
                    model.zero_grad(set_to_none=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    finally:
        model.load_state_dict(saved)
        model.train(was_training)
    raise ConfigError(f"even micro_batch={candidates[-1]} does not fit in GPU memory at img_size={img_size}; "
                      "use a smaller model or image size")


def saved_activation_bytes(model: nn.Module, *, img_size: int, autocast: Callable[[], contextlib.AbstractContextManager],
                           channels_last: bool, batch: int = 2) -> int:
    """Bytes autograd keeps for the backward pass of one image, measured on a small batch.

    Counted exactly with saved-tensor hooks (each storage once), so the estimate follows the model, the
    resolution and the precision. Weights, BN statistics and RNG are left as they were.
    """
    device = next(model.parameters()).device
    saved = copy.deepcopy(model.state_dict())
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x = torch.zeros(batch, 3, img_size, img_size, device=device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                model(x)
    finally:
        model.load_state_dict(saved)
        model.train(was_training)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = sum(size for ptr, size in storages.items() if ptr not in params)
    return max(1, activations // batch)


def host_memory_budget(local_processes: int, fraction: float = 0.5) -> tuple[int, str]:
    """Bytes of host memory one training process may plan for: a share of what is free now.

    The cgroup limit (containers, SLURM jobs) counts when it is tighter than the machine's free memory.
    """
    import psutil

    available = psutil.virtual_memory().available
    source = "free RAM"
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit_text = open(limit_file).read().strip()  # noqa: SIM115 - tiny sysfs read
            usage = int(open(usage_file).read().strip())  # noqa: SIM115
        except (OSError, ValueError):
            continue
        if limit_text.isdigit() and int(limit_text) - usage < available:
            available, source = max(0, int(limit_text) - usage), "cgroup memory limit"
        break
    return int(available * fraction / max(1, local_processes)), source


def cpu_micro_batch(candidates: list[int], per_image: int, model_bytes: int, budget: int) -> int:
    """Largest candidate whose activations (+50 % for the backward's working buffers) and model state fit."""
    for batch in candidates:  # largest first
        if batch * per_image * 3 // 2 + model_bytes <= budget:
            return batch
    return candidates[-1]
