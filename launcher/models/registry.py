"""The model names we build and the one helper that strips training wrappers off a model."""

from __future__ import annotations

from torch import nn

RESNET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def unwrap_model(model: nn.Module, keep_compiled: bool = False) -> nn.Module:
    """Strip DDP / DeepSpeed / accelerate (``.module``) and torch.compile (``._orig_mod``) wrappers.

    ``keep_compiled``: stop at a torch.compile wrapper (evaluation keeps the compiled graph). Accelerate's
    own ``unwrap_model`` does the same but imports DeepSpeed, whenever it is installed, on its first call.
    """
    while True:
        if not keep_compiled and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model
