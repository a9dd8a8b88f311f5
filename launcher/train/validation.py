"""Evaluation during training: plain cross-entropy, top-1 and top-5 over a whole split, exact across ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, batch_transform: Any, accelerator: Any,
             limit: int = 0) -> dict[str, float]:
    """Loss, top-1 and top-5 (%) over ``loader``'s split, summed exactly across ranks (one collective)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    with torch.random.fork_rng(devices=[]):  # evaluating must not move the training RNG (exact resume)
        batches = iter(loader)
    for index, (images, labels) in enumerate(batches):
        if limit and index >= limit:
            break
        images = images.to(accelerator.device, non_blocking=True)
        labels = labels.to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            logits = model(batch_transform.eval(images))
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                             top[:, 0].sum().double(), top.any(dim=1).sum().double(),
                             torch.full((), len(labels), dtype=torch.float64, device=sums.device)])
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(sums)  # ranks may hold different numbers of batches
    model.train(was_training)
    loss, top1, top5, n = sums.tolist()
    n = max(n, 1.0)
    return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "samples": int(n)}
