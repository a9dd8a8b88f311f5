"""Device, autocast precision and backend switches, resolved once per run."""

from __future__ import annotations

import os

import torch

from launcher.config import ConfigError


def resolve_device(requested: str) -> str:
    """``auto`` -> cuda if a GPU is visible, else cpu. ``cuda`` without a GPU is an error."""
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA GPU is visible; use --device cpu or auto")
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(requested: str, device: str) -> str:
    """Accelerate's mixed_precision value: 'bf16', 'fp16' or 'no'.

    auto: bf16 on CPU (channels_last + bf16 autocast about doubles ResNet throughput on recent x86
    CPUs) and on GPUs that support it (Ampere and newer); fp16 with a grad scaler on older GPUs.
    """
    if requested == "fp32":
        return "no"
    if requested == "fp16":
        if device != "cuda":
            raise ConfigError("precision='fp16' needs a CUDA GPU; use bf16 (default on CPU) or fp32")
        return "fp16"
    if requested == "bf16":
        if device == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision='bf16' is not supported by this GPU; use fp16 or auto")
        return "bf16"
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def configure_backends(device: str, *, deterministic: bool, threads: int) -> None:
    """Fast kernels by default (cudnn autotuning, TF32 matmuls), deterministic algorithms on request."""
    if threads > 0:
        torch.set_num_threads(threads)
    if device == "cpu":
        # Accelerate imports DeepSpeed whenever it is installed (unwrap_model checks for its engine), and
        # DeepSpeed then probes for an accelerator and warns "Setting accelerator to CPU" on every CPU
        # run. Naming the accelerator is DeepSpeed's own switch for that; DeepSpeed itself only runs on
        # GPUs here, and a value the user set is kept.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if device == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
