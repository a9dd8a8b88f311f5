"""ResNet construction, pretrained weights and layer freezing, on top of timm.

timm's ResNet has exactly torchvision's state_dict key names (conv1, bn1, layer1.0.conv1, ..., fc),
so a checkpoint written here loads into ``torchvision.models.resnet50()`` or
``timm.create_model("resnet50")`` unchanged, and torchvision weights load into it.

Two RSB details come for free from timm and are pinned by tests:
stochastic depth grows linearly per block from 0 to ``drop_path`` (``drop_path_rate``), and the last
BatchNorm gamma of every residual branch starts at zero (``zero_init_last``).

Frozen stages (``trainable_layers``) keep their BatchNorm in eval mode even under ``model.train()``:
fine-tuning batches are tiny (4-32 images) and from another distribution, so letting them update the
running mean/var would overwrite the ImageNet statistics the frozen convolutions were trained with;
frozen features should see the normalisation they were trained with. The BN modules stay ordinary
BatchNorm subclasses, so the state_dict is unchanged and loads into plain torchvision/timm models.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import timm
from torch import nn

from launcher.models.pretrained import load_pretrained_state_dict, resolve_weights
from launcher.models.registry import RESNET_NAMES, unwrap_model

log = logging.getLogger(__name__)

# Stages from the head backwards: trainable_layers=N unfreezes the last N entries.
_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")


def create_resnet(
    name: str,
    num_classes: int,
    *,
    drop_path: float = 0.0,
    zero_init_last: bool = True,
    pretrained: str | os.PathLike | None = None,
    trainable_layers: int | str = "all",
) -> nn.Module:
    """Build a timm ResNet (torchvision key names) with an ``num_classes`` head.

    pretrained: None (random init), a torchvision weights name ("IMAGENET1K_V2", "DEFAULT",
    "ResNet50_Weights.IMAGENET1K_V2"), a timm name ("resnet50.a1_in1k" or just the tag "a1_in1k"),
    or a local file (.pth/.pt/.bin/.safetensors; a state_dict or a checkpoint dict with "model" or
    "state_dict"). The pretrained classifier is dropped when its shape differs from ``num_classes``;
    every other tensor must match (clear error listing missing/unexpected keys otherwise).
    Without network a download raises :class:`WeightsUnavailableError` telling how to pass a file.
    """
    if name not in RESNET_NAMES:
        raise ValueError(f"model {name!r} is not supported; choose one of {', '.join(RESNET_NAMES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
    model = timm.create_model(
        name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path,
        zero_init_last=zero_init_last,
    )
    if pretrained:
        source, state_dict = resolve_weights(name, pretrained)
        load_pretrained_state_dict(model, state_dict, source=source)
        log.info("loaded pretrained weights for %s from %s", name, source)
    set_trainable_layers(model, trainable_layers)
    return model


# --------------------------------------------------------------------------------------------------
# Freezing
# --------------------------------------------------------------------------------------------------

class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its running statistics and never updates them.

    Same parameters, buffers and state_dict as ``nn.BatchNorm2d`` (it is swapped in via
    ``__class__``), so checkpoints stay loadable into plain torchvision/timm models.
    """

    def train(self, mode: bool = True) -> FrozenStatsBatchNorm2d:
        return super().train(False)


class FrozenStatsSyncBatchNorm(nn.SyncBatchNorm):
    """SyncBatchNorm counterpart of :class:`FrozenStatsBatchNorm2d`."""

    def train(self, mode: bool = True) -> FrozenStatsSyncBatchNorm:
        return super().train(False)


_FROZEN_BN = {nn.BatchNorm2d: FrozenStatsBatchNorm2d, nn.SyncBatchNorm: FrozenStatsSyncBatchNorm}
_PLAIN_BN = {v: k for k, v in _FROZEN_BN.items()}


def _stage_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    return {
        "stem": [model.conv1, model.bn1],
        "layer1": [model.layer1], "layer2": [model.layer2], "layer3": [model.layer3],
        "layer4": [model.layer4], "fc": [model.get_classifier()],
    }


def parse_trainable_layers(value: int | str) -> int:
    """'all' -> 6 (every stage incl. stem); 1..5 as documented in :func:`set_trainable_layers`."""
    text = str(value).strip().lower()
    if text == "all":
        return len(_STAGES)
    if text.isdigit() and 1 <= int(text) <= 5:
        return int(text)
    raise ValueError(
        f"trainable_layers must be 1..5 or 'all' (1 = fc, 2 = layer4+fc, 3 = layer3+layer4+fc, "
        f"4 = layer2.., 5 = layer1.., all = also conv1/bn1), got {value!r}"
    )


def set_trainable_layers(model: nn.Module, trainable_layers: int | str) -> list[str]:
    """Freeze all but the last N stages: 1 -> fc, 2 -> layer4+fc, ..., 5 -> layer1..fc, "all".

    Frozen stages get ``requires_grad=False`` and their BatchNorm layers stay in eval mode even after
    ``model.train()`` (running statistics untouched, see the module docstring for why). Calling it
    again with a larger N unfreezes (gradual unfreezing). Returns the trainable stage names.
    """
    count = parse_trainable_layers(trainable_layers)
    target = unwrap_model(model)
    trainable = list(_STAGES[len(_STAGES) - count:])
    for stage, modules in _stage_modules(target).items():
        frozen = stage not in trainable
        for module in modules:
            for param in module.parameters():
                param.requires_grad_(not frozen)
            for sub in module.modules():
                _set_bn_frozen(sub, frozen)
    target.train(target.training)  # re-apply the current mode so frozen BNs switch to eval now
    return trainable


def _set_bn_frozen(module: nn.Module, frozen: bool) -> None:
    cls = type(module)
    if frozen and cls in _FROZEN_BN:
        module.__class__ = _FROZEN_BN[cls]
    elif not frozen and cls in _PLAIN_BN:
        module.__class__ = _PLAIN_BN[cls]
        module.train(True)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` that keeps frozen BatchNorm layers frozen."""
    frozen_names = {name for name, m in model.named_modules() if isinstance(m, FrozenStatsBatchNorm2d)}
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, module in model.named_modules():
        if name in frozen_names and type(module) is nn.SyncBatchNorm:
            module.__class__ = FrozenStatsSyncBatchNorm
            module.train(False)
    return model


# --------------------------------------------------------------------------------------------------
# Small helpers for the engine and export
# --------------------------------------------------------------------------------------------------

def model_info(model: nn.Module) -> dict[str, Any]:
    """Parameter counts and the frozen/trainable split, for logs and summaries."""
    target = unwrap_model(model)
    total = sum(p.numel() for p in target.parameters())
    trainable = sum(p.numel() for p in target.parameters() if p.requires_grad)
    frozen_bn = sum(isinstance(m, (FrozenStatsBatchNorm2d, FrozenStatsSyncBatchNorm)) for m in target.modules())
    stages = [s for s, mods in _stage_modules(target).items()
              if all(p.requires_grad for m in mods for p in m.parameters())] if hasattr(target, "layer4") else []
    return {
        "params": total,
        "trainable_params": trainable,
        "frozen_params": total - trainable,
        "frozen_bn_layers": frozen_bn,
        "trainable_stages": stages,
    }


