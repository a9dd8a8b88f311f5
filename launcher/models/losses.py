"""Training losses on dense soft targets, as timm's train.py wires them for the RSB recipes.

The data layer (timm Mixup semantics) already turns labels into dense targets ``[B, C]`` with label
smoothing folded in, so ``smoothing`` here only applies when a loss is called with class indices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from torch import nn

__all__ = ["LOSS_NAMES", "SoftTargetCrossEntropyLoss", "create_loss"]

LOSS_NAMES = ("bce", "ce")


class SoftTargetCrossEntropyLoss(nn.Module):
    """Cross-entropy for dense soft targets or class indices, with optional class weights.

    Without weights on dense targets it is exactly ``timm.loss.SoftTargetCrossEntropy``
    (mean over the batch of ``-sum_c t_c log p_c``). With ``weight`` it is torch's weighted
    cross-entropy for probability targets (``-sum_c w_c t_c log p_c``, mean over the batch).
    Class indices are expanded with timm's smoothing convention (off = s/C, on = 1 - s + s/C),
    which equals torch's ``label_smoothing``.
    """

    def __init__(self, smoothing: float = 0.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self._timm = SoftTargetCrossEntropy()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 1:
            return F.cross_entropy(logits, target, weight=self._weight_for(logits), label_smoothing=self.smoothing)
        if target.shape != logits.shape:
            raise ValueError(f"targets {tuple(target.shape)} do not match logits {tuple(logits.shape)}")
        if self.weight is None:
            return self._timm(logits, target)
        return F.cross_entropy(logits, target.to(logits.dtype), weight=self._weight_for(logits))

    def _weight_for(self, logits: torch.Tensor) -> torch.Tensor | None:
        return None if self.weight is None else self.weight.to(device=logits.device, dtype=logits.dtype)


def create_loss(
    name: str,
    *,
    bce_target_thresh: float | None = None,
    smoothing: float = 0.0,
    weight: torch.Tensor | None = None,
) -> nn.Module:
    """The training loss: ``"bce"`` (timm BinaryCrossEntropy, RSB: ``bce_target_thresh=0.2``) or ``"ce"``.

    Both take logits ``[B, C]`` and dense soft targets ``[B, C]`` (or class indices ``[B]``).
    bce: targets above ``bce_target_thresh`` become 1, the rest 0 (RSB's multi-label view of
    Mixup/CutMix); mean over B x C elements.
    ``weight``: optional per-class weights ``[C]`` (fine-tuning on imbalanced data).
    Validation should use plain cross-entropy on class indices, as timm does.
    """
    key = name.lower()
    if key in ("bce", "binary_cross_entropy"):
        if bce_target_thresh is not None and not 0.0 <= bce_target_thresh < 1.0:
            raise ValueError(f"bce_target_thresh must be in [0, 1), got {bce_target_thresh}")
        w = None if weight is None else torch.as_tensor(weight, dtype=torch.float32)
        return BinaryCrossEntropy(smoothing=smoothing, target_threshold=bce_target_thresh, weight=w)
    if key in ("ce", "cross_entropy", "softce"):
        return SoftTargetCrossEntropyLoss(smoothing=smoothing, weight=weight)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
