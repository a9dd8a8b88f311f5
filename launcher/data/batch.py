"""The on-device batch step: uint8 images -> normalized float (+ Mixup/CutMix with dense targets).

Mixing is timm's :class:`timm.data.Mixup` itself (per-batch choice, switch probability, reversed-batch
partner, area-corrected CutMix lambda, label smoothing), applied to the normalized float batch on the
images' device, as timm's ``train.py --no-prefetcher`` path does. It draws from numpy's global RNG,
exactly like timm, so the engine's saved RNG state covers it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from timm.data.mixup import mixup_target


class BatchTransform:
    """``train(images_u8, labels) -> (x, targets [B, C])`` and ``eval(images_u8) -> x``."""

    def __init__(
        self,
        num_classes: int,
        *,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        label_smoothing: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.channels_last = channels_last
        self._scale = [255.0 * s for s in std]
        self._shift = [255.0 * m for m in mean]
        self._constants: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mixup: Mixup | None = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mix_prob,
                               switch_prob=switch_prob, mode=mode, label_smoothing=label_smoothing,
                               num_classes=num_classes)

    @property
    def mixup_enabled(self) -> bool:
        return self.mixup is not None and self.mixup.mixup_enabled

    def _normalize(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        key = (images.device, dtype)
        if key not in self._constants:
            shift = torch.tensor(self._shift, device=images.device, dtype=dtype).view(1, 3, 1, 1)
            scale = torch.tensor(self._scale, device=images.device, dtype=dtype).view(1, 3, 1, 1)
            self._constants[key] = shift, scale
        shift, scale = self._constants[key]
        x = images.to(dtype).sub_(shift).div_(scale)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def eval(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._normalize(images, dtype)

    def train(self, images: torch.Tensor, labels: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._normalize(images, dtype)
        labels = labels.to(x.device, non_blocking=True)
        if self.mixup is not None and self.mixup.mixup_enabled:
            if len(x) % 2:
                raise ValueError(f"Mixup/CutMix needs an even micro-batch, got {len(x)}")
            return self.mixup(x, labels)  # timm's public call: draws, mixes in place, dense targets
        return x, mixup_target(labels, self.num_classes, 1.0, self.label_smoothing)
