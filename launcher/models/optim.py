"""Optimizer, LR schedule and LR scaling, built on timm exactly as its train.py uses them for RSB.

* Optimizer: ``timm.optim.create_optimizer_v2`` with ``filter_bias_and_bn`` groups: every trainable
  parameter with ndim <= 1 or a name ending in ".bias" (BatchNorm gamma/beta, biases) gets weight
  decay 0; for a ResNet the decayed group is exactly the conv weights + ``fc.weight``. Frozen
  parameters (``requires_grad=False``) are not handed to the optimizer at all.
* ``lamb`` is timm's ``Lamb`` (NVIDIA NvLamb): global grad-norm clipping to ``max_grad_norm`` (1.0)
  inside ``step()``, L2 weight decay added to the update before the trust ratio, and *no* trust ratio
  for groups with weight decay 0 (biases/BN get a plain Adam step). With AMP, ``GradScaler.step``
  unscales before the optimizer, so the clip sees true gradients.
* ``sgd`` is timm's: SGD with **Nesterov** momentum (``momentum`` is plain heavy-ball momentum).
  ``adamw`` is torch AdamW (decoupled decay) through timm.
* Schedule: ``CosineLRScheduler`` via ``timm.scheduler.create_scheduler_v2``. RSB stepped it per epoch
  (warmup and cosine), which is the default; ``on_updates=True`` steps it per optimizer update. The
  training loop calls ``sched.step(epoch)`` when epoch ``epoch`` starts (per-epoch mode) and
  ``sched.step_update(num_updates=global_step)`` after every optimizer update (per-update mode): the LR of
  epoch e is timm's ``step(e)`` value, as in timm's train.py. timm schedulers are stateless functions of
  the position, so a resumed run gets the same LR from the same calls.
* A warmup as long as the run or longer is shortened to ``epochs - 1`` with a warning
  (:func:`fit_warmup` says why).
"""

from __future__ import annotations

import logging
import math

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn

from launcher.models.losses import LOSS_NAMES, SoftTargetCrossEntropyLoss, create_loss

__all__ = [
    "LOSS_NAMES",
    "OPTIMIZER_NAMES",
    "SoftTargetCrossEntropyLoss",
    "create_loss",
    "create_optimizer",
    "create_scheduler",
    "fit_warmup",
    "lr_scale_rule",
    "param_groups",
    "scaled_lr",
]

log = logging.getLogger("launcher.models.optim")

OPTIMIZER_NAMES = ("lamb", "adamw", "sgd")
_LAMB_FAMILY = ("lamb", "lambc", "lambw", "lambcw")


def param_groups(model: nn.Module, weight_decay: float, filter_bias_and_bn: bool = True) -> list[dict]:
    """timm's weight-decay groups over trainable parameters only (what ``create_optimizer`` uses)."""
    if weight_decay and filter_bias_and_bn:
        no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": params, "weight_decay": weight_decay}] if params else []


def create_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    *,
    momentum: float = 0.9,
    eps: float | None = None,
    betas: tuple[float, float] | None = None,
    max_grad_norm: float | None = 1.0,
    filter_bias_and_bn: bool = True,
    foreach: bool | None = None,
) -> torch.optim.Optimizer:
    """timm optimizer ``name`` ("lamb", "adamw", "sgd", or any timm name) over the trainable params.

    ``max_grad_norm`` only applies to the LAMB family (timm's default 1.0; None disables the clip).
    ``eps``/``betas`` default to the optimizer's own (LAMB: 1e-6, (0.9, 0.999); AdamW: 1e-8).
    """
    key = name.lower()
    groups = param_groups(model, weight_decay, filter_bias_and_bn)
    if not groups:
        raise ValueError("the model has no trainable parameters (check trainable_layers)")
    kwargs: dict = {}
    if eps is not None:
        kwargs["eps"] = eps
    if betas is not None:
        kwargs["betas"] = tuple(betas)
    if key in _LAMB_FAMILY:
        kwargs["max_grad_norm"] = max_grad_norm
    if foreach is not None:
        kwargs["foreach"] = foreach
    try:
        # Groups already carry their weight decay; the optimizer-level default stays 0 as in timm.
        return create_optimizer_v2(groups, opt=key, lr=lr, weight_decay=0.0, momentum=momentum, **kwargs)
    except (AssertionError, ValueError) as exc:
        if "Invalid optimizer" in str(exc) or "Unknown" in str(exc) or "not found" in str(exc):
            raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZER_NAMES)} "
                             f"(or another timm optimizer name)") from exc
        raise


def create_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    updates_per_epoch: int,
    warmup_epochs: float,
    warmup_lr: float,
    min_lr: float,
    on_updates: bool = False,
) -> Scheduler:
    """timm ``CosineLRScheduler``: linear warmup from ``warmup_lr`` inside ``epochs``, cosine to ``min_lr``.

    Per epoch by default (RSB); ``on_updates=True`` multiplies every length by ``updates_per_epoch``
    (optimizer updates, i.e. after gradient accumulation) and steps per update. No cooldown: the cosine
    reaches ``min_lr`` at the end of ``epochs``. Constructing it sets the optimizer LR to the epoch-0 value.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if on_updates and updates_per_epoch < 1:
        raise ValueError(f"updates_per_epoch must be >= 1 for per-update scheduling, got {updates_per_epoch}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    fitted = fit_warmup(warmup_epochs, epochs)
    if fitted != warmup_epochs:
        log.warning("warmup_epochs=%g is not shorter than epochs=%d: warmup shortened to %g epoch(s), so the run "
                    "still reaches the cosine phase", warmup_epochs, epochs, fitted)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=epochs,
        warmup_epochs=fitted,
        warmup_lr=warmup_lr,
        min_lr=min_lr,
        step_on_epochs=not on_updates,
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


def fit_warmup(warmup_epochs: float, epochs: int) -> float:
    """The warmup a run of ``epochs`` gets: ``warmup_epochs``, shortened to ``epochs - 1`` if not shorter.

    timm's ``CosineLRScheduler`` accepts a warmup as long as the run or longer, and then every epoch is
    warmup: the LR only climbs, never reaches the peak and never decays (A3's 5 warmup epochs in a
    2-epoch run: 1e-4, then 1.7e-3 of a peak of 8e-3). Shortened to ``epochs - 1``, a short run (a smoke
    test, a quick fine-tune) keeps the recipe's shape: a linear warmup, then the cosine phase.
    """
    return min(warmup_epochs, max(0, epochs - 1))


def lr_scale_rule(opt_name: str) -> str:
    """timm train.py's rule: "sqrt" if the name contains "ada" or "lamb", else "linear"."""
    key = opt_name.lower()
    return "sqrt" if any(tag in key for tag in ("ada", "lamb")) else "linear"


def scaled_lr(lr: float, ref_batch: int, global_batch: int, opt_name: str) -> float:
    """Rescale an LR given for ``ref_batch`` to ``global_batch`` (timm's rule, see :func:`lr_scale_rule`).

    LAMB/Adam-family: lr * sqrt(global/ref); SGD-family (incl. "lars", as in timm): lr * global/ref.
    Returns ``lr`` unchanged when the batches are equal.
    """
    if ref_batch < 1 or global_batch < 1:
        raise ValueError(f"batch sizes must be >= 1 (ref_batch={ref_batch}, global_batch={global_batch})")
    if ref_batch == global_batch:
        return lr
    ratio = global_batch / ref_batch
    return lr * (math.sqrt(ratio) if lr_scale_rule(opt_name) == "sqrt" else ratio)
