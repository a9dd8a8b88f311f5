"""BatchTransform = normalize + timm.data.Mixup on the same inputs and numpy RNG state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup

from launcher.data import BatchTransform


def _reference_normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("seed", range(5))
def test_mixup_cutmix_equal_timm(mode, seed):
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 10, (8,))
    kwargs = dict(mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.5, mode=mode, label_smoothing=0.1)
    step = BatchTransform(10, mix_prob=1.0, **kwargs)
    np.random.seed(seed)
    x, targets = step.train(images, labels)
    reference = Mixup(prob=1.0, num_classes=10, **{k: v for k, v in kwargs.items()})
    np.random.seed(seed)
    rx = _reference_normalize(images)
    rx, rtargets = reference(rx, labels)
    assert torch.allclose(x, rx, atol=1e-5) and torch.allclose(targets, rtargets)
    np.random.seed(seed)
    if mode == "batch":
        lam, use_cutmix = reference._params_per_batch()
        if use_cutmix:
            from timm.data.mixup import cutmix_bbox_and_lam

            _, lam = cutmix_bbox_and_lam(images.shape, lam, correct_lam=True)
        from timm.data.mixup import mixup_target

        assert torch.allclose(targets, mixup_target(labels, 10, lam, 0.1))
    assert torch.allclose(targets.sum(1), torch.ones(8))


def test_no_mixing_gives_smoothed_one_hot_and_channels_last():
    step = BatchTransform(5, label_smoothing=0.1, channels_last=True)
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    x, targets = step.train(images, torch.tensor([1, 3]))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x[0, :, 0, 0], (1 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD))
    assert targets[0, 1] == pytest.approx(0.9 + 0.02) and targets[0, 0] == pytest.approx(0.02)
    assert torch.equal(step.eval(images), x)


def test_odd_batch_with_mixup_is_a_clear_error():
    with pytest.raises(ValueError, match="even"):
        BatchTransform(3, mixup_alpha=0.1).train(torch.zeros(3, 3, 4, 4, dtype=torch.uint8), torch.zeros(3).long())
