"""Building a run's parts (data, model, batching, optimizer, schedule) and its exact-resume state.

Split from ``engine.py`` so the loop reads on its own. Everything here runs on every rank and gives
the same result on every rank, except the RNG states, which are per rank.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from launcher.config import ConfigError, TrainConfig, mixing_enabled
from launcher.train import batching
from launcher.train.accelerator import configure_deepspeed, load_step_folder, save_step_folder
from launcher.train.hardware import default_workers, local_processes
from launcher.train.state import Shape

log = logging.getLogger("launcher.train.loop")


@dataclasses.dataclass
class RunParts:
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    loss_fn: torch.nn.Module
    batch_transform: Any
    ema: Any
    train_loader: Any
    eval_loaders: dict[str, Any]
    micro_batch: int
    accumulation: int
    updates_per_epoch: int
    lr: float
    num_classes: int
    classes: list[str]
    config_dict: dict[str, Any]
    data_kind: str
    train_samples: int
    val_samples: int
    shape: Shape
    workers: int
    choices: dict[str, str]  # why each hardware-dependent number is what it is (start block)
    deepspeed: bool = False
    save_deepspeed: Any = None  # (folder, step) -> name of the step's DeepSpeed folder (collective)
    load_deepspeed: Any = None  # (checkpoint path, state) -> None (collective)

    def gather_loader_stats(self) -> dict[str, Any]:
        """Skipped data of every rank's loaders, merged (collective: every rank calls it)."""
        stats = [self.train_loader.stats.as_dict(), *(loader.stats.as_dict() for loader in self.eval_loaders.values())]
        merged: dict[str, Any] = {"skipped": 0, "by_source": {}, "reasons": []}
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        gathered: list[Any] = [stats]
        if world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, stats)
        for rank_stats in gathered:
            for one in rank_stats:
                merged["skipped"] += one["skipped"]
                for source, count in one["by_source"].items():
                    merged["by_source"][source] = merged["by_source"].get(source, 0) + count
                merged["reasons"] += [r for r in one["reasons"] if r not in merged["reasons"]][: 20 - len(merged["reasons"])]
        return merged


def _open_data(cfg: TrainConfig) -> Any:
    from launcher.data import open_dataset

    try:
        return open_dataset(cfg.data, train_split=cfg.train_split, val_split=cfg.val_split or "validation")
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ConfigError(f"data={cfg.data!r}: {exc}") from None


def _micro_batch(cfg: TrainConfig, model: torch.nn.Module, accelerator: Accelerator,
                 num_classes: int) -> tuple[int, str]:
    """The micro-batch and why: given, probed on CUDA, or what fits the host memory budget on CPU.

    Either way the largest that fits, so there is no accumulation when the per-process batch fits.
    """
    world, even = accelerator.num_processes, mixing_enabled(cfg)
    if cfg.micro_batch:
        return cfg.micro_batch, "given"
    candidates = batching.micro_batch_candidates(cfg.global_batch, world, even=even, limit=batching.MAX_PROBE_BATCH)
    if accelerator.device.type != "cuda":
        per_image = batching.saved_activation_bytes(model, img_size=cfg.img_size, autocast=accelerator.autocast,
                                                    channels_last=cfg.channels_last)
        model_bytes = 4 * sum(p.numel() * p.element_size() for p in model.parameters())  # weights, grads, 2 moments
        budget, source = batching.host_memory_budget(local_processes())
        found = batching.cpu_micro_batch(candidates, per_image, model_bytes, budget)
        why = (f"largest that fits {budget / 2**30:.1f} GiB ({source} share; "
               f"{per_image / 2**20:.1f} MiB of activations per image)")
    else:
        found = batching.probe_micro_batch(model, candidates, img_size=cfg.img_size, num_classes=num_classes,
                                           device=accelerator.device, autocast=accelerator.autocast,
                                           channels_last=cfg.channels_last)
        why = "largest that fits in GPU memory (probed)"
    if world > 1:  # the smallest process decides, so every rank accumulates the same number of steps
        value = torch.tensor([found], device=accelerator.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        found = int(value.item())
    return found, why


def _class_weights(cfg: TrainConfig, ds: Any, num_classes: int) -> torch.Tensor | None:
    if cfg.class_weights == "none":
        return None
    counts_fn = getattr(ds, "class_counts", None)
    if counts_fn is None:
        raise ConfigError("class_weights='balanced' needs per-class counts, which this data source does not provide")
    counts = counts_fn(cfg.train_split)
    values = [counts.get(name, 0) if isinstance(counts, dict) else counts[i] for i, name in enumerate(ds.classes)]
    total = sum(values)
    # sklearn's "balanced": n_samples / (n_classes * count_c); absent classes get weight 0.
    return torch.tensor([total / (num_classes * c) if c else 0.0 for c in values], dtype=torch.float32)


def build_parts(cfg: TrainConfig, accelerator: Accelerator, accelerator_precision: str = "no") -> RunParts:
    from launcher.data import BatchTransform, build_eval_loader, build_train_loader
    from launcher.models import convert_sync_batchnorm, create_resnet
    from launcher.models.optim import create_loss, create_optimizer, create_scheduler

    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    ds = _open_data(cfg)
    num_classes = cfg.num_classes or ds.num_classes
    if num_classes < ds.num_classes:
        raise ConfigError(f"num_classes={num_classes} is smaller than the {ds.num_classes} classes in {cfg.data}")

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and in every run with this seed
    model = create_resnet(cfg.model, num_classes, drop_path=cfg.drop_path, zero_init_last=cfg.zero_init_last,
                          pretrained=cfg.pretrained, trainable_layers=cfg.trainable_layers_value())
    if cfg.sync_bn and world > 1:
        model = convert_sync_batchnorm(model)
    model = model.to(device)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    # DeepSpeed broadcasts parameters as flat byte views, which channels-last weights cannot give: under it
    # the weights stay NCHW (the batches are still channels-last, so convolutions still pick NHWC kernels).
    if cfg.channels_last and not deepspeed:
        model = model.to(memory_format=torch.channels_last)

    micro, micro_why = _micro_batch(cfg, model, accelerator, num_classes)
    workers, workers_why = (cfg.workers, "given") if cfg.workers is not None else default_workers(device.type)
    accumulation = batching.accumulation_steps(cfg.global_batch, world, micro)
    if mixing_enabled(cfg) and micro % 2:
        raise ConfigError(f"micro_batch={micro} must be even when mixup/cutmix is on")
    accelerator.gradient_accumulation_steps = accumulation

    loader_kwargs: dict[str, Any] = dict(
        rank=rank, world_size=world, global_batch=cfg.global_batch, micro_batch=micro, img_size=cfg.img_size,
        auto_augment=cfg.auto_augment,
        aug_repeats=cfg.aug_repeats, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip,
        interpolation=cfg.interpolation, workers=workers, seed=cfg.seed, split=cfg.train_split,
        pin_memory=cfg.pin_memory and device.type == "cuda")
    train_samples = ds.num_samples(cfg.train_split)
    if train_samples < cfg.global_batch:
        raise ConfigError(f"the training split has {train_samples} images, fewer than one global batch "
                          f"(global_batch={cfg.global_batch}); lower --global-batch")
    train_loader = build_train_loader(ds, **loader_kwargs)
    updates = train_loader.updates_per_epoch  # ceil(samples / global batch), the same for every shape
    if cfg.limit_train_batches:
        updates = min(updates, cfg.limit_train_batches)

    eval_loaders: dict[str, Any] = {}
    val_samples = 0
    if cfg.val_split and ds.has_split(cfg.val_split):
        val_samples = ds.num_samples(cfg.val_split)
        eval_batch = cfg.eval_batch or 2 * micro
        sizes = [("val", cfg.img_size)]
        if cfg.test_img_size and cfg.test_img_size != cfg.img_size:
            sizes.append((f"val@{cfg.test_img_size}", cfg.test_img_size))
        for tag, size in sizes:
            eval_loaders[tag] = build_eval_loader(ds, rank=rank, world_size=world, batch_size=eval_batch,
                                                  img_size=size, crop_pct=cfg.crop_pct,
                                                  interpolation=cfg.interpolation, workers=workers,
                                                  split=cfg.val_split)

    lr = cfg.resolved_lr()
    optimizer = create_optimizer(model, cfg.opt, lr, cfg.weight_decay, momentum=cfg.momentum)
    scheduler = create_scheduler(optimizer, epochs=cfg.epochs, updates_per_epoch=updates,
                                 warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                                 on_updates=cfg.sched_on_updates)
    weight = _class_weights(cfg, ds, num_classes)
    loss_fn = create_loss(cfg.loss, bce_target_thresh=cfg.bce_target_thresh, smoothing=cfg.smoothing,
                          weight=weight).to(device)
    batch_transform = BatchTransform(num_classes, mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                                     mix_prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                                     mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                                     channels_last=cfg.channels_last)
    ema = None
    if cfg.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.model_ema_decay)
    if cfg.compile:
        model = torch.compile(model)
    if deepspeed:
        configure_deepspeed(accelerator, cfg, accelerator_precision, micro, accumulation)
    model, optimizer = accelerator.prepare(model, optimizer)

    config_dict = dict(cfg.to_dict(), num_classes=num_classes, micro_batch=micro, workers=workers)
    choices = {"micro_batch": micro_why, "workers": workers_why}
    return RunParts(model=model, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn,
                    batch_transform=batch_transform, ema=ema, train_loader=train_loader,
                    eval_loaders=eval_loaders, micro_batch=micro, accumulation=accumulation,
                    updates_per_epoch=updates, lr=lr, num_classes=num_classes, classes=list(ds.classes),
                    config_dict=config_dict, data_kind=str(getattr(ds, "kind", "?")),
                    train_samples=train_samples, val_samples=val_samples,
                    shape=Shape(world, micro, accumulation), workers=getattr(train_loader, "workers", workers),
                    choices=choices, deepspeed=deepspeed,
                    save_deepspeed=(lambda folder, step: save_step_folder(accelerator, folder, step)) if deepspeed else None,
                    load_deepspeed=(lambda path, state: load_step_folder(accelerator, path, state)) if deepspeed else None)


def startup_report(cfg: TrainConfig, parts: RunParts, accelerator: Accelerator, precision: str, output: Path,
                   resumed_from: Path | None, step: int) -> list[str]:
    """The resolved numbers, in one readable block."""
    from launcher.models import model_info
    from launcher.models.optim import fit_warmup

    info = model_info(parts.model)
    world = accelerator.num_processes
    total_updates = cfg.epochs * parts.updates_per_epoch
    sched = "per update" if cfg.sched_on_updates else "per epoch"
    mix = f"mixup {cfg.mixup:g} / cutmix {cfg.cutmix:g}" if mixing_enabled(cfg) else "no mixup/cutmix"
    thresh = f", target threshold {cfg.bce_target_thresh:g}" if cfg.loss == "bce" and cfg.bce_target_thresh else ""
    # Accelerate calls a single process "NO" (no distribution); say what it means
    backend = "single process" if world == 1 else accelerator.distributed_type.value
    if world > 1 and torch.distributed.is_initialized():
        backend += f", {torch.distributed.get_backend()}"
    evals = "none (no validation split)"
    if parts.eval_loaders:
        evals = f"val every {cfg.eval_every} epoch(s)"
        for tag in parts.eval_loaders:
            if tag != "val":
                every = f"every {cfg.test_eval_every} epochs and " if cfg.test_eval_every else ""
                evals += f", {tag} {every}at the end"
    return [
        f"resnet-launcher train: recipe {cfg.recipe}, {cfg.model} ({info['params'] / 1e6:.1f}M params, "
        f"{info['trainable_params'] / 1e6:.1f}M trainable), {parts.num_classes} classes",
        f"  data        {cfg.data} ({parts.data_kind}): {parts.train_samples} train / {parts.val_samples} "
        f"validation images; {parts.workers} loader workers per process ({parts.choices['workers']})",
        f"  hardware    {accelerator.device.type} x {world} process(es) ({backend}); precision {precision}, "
        f"channels_last {'on' if cfg.channels_last else 'off'}, compile {'on' if cfg.compile else 'off'}",
        f"  batch       global {cfg.global_batch} = micro {parts.micro_batch} x accumulation "
        f"{parts.accumulation} x world {world}; micro-batch {parts.choices['micro_batch']}",
        f"  schedule    {cfg.epochs} epochs x {parts.updates_per_epoch} updates (ceil({parts.train_samples} / "
        f"{cfg.global_batch}): every image at least once per epoch) = {total_updates} updates; "
        f"warmup {fit_warmup(cfg.warmup_epochs, cfg.epochs):g} epochs from {cfg.warmup_lr:g}, cosine to "
        f"{cfg.min_lr:g}, stepped {sched}",
        f"  lr          {parts.lr:.4g} ({cfg.lr_rule()})",
        f"  optimizer   {cfg.opt}, weight decay {cfg.weight_decay:g} (none on BN/bias); loss {cfg.loss}{thresh}, "
        f"smoothing {cfg.smoothing:g}; {mix}; drop-path {cfg.drop_path:g}; EMA {'on' if cfg.model_ema else 'off'}",
        f"  augment     {cfg.img_size}px, RandAugment {cfg.auto_augment or 'off'}, repeats {cfg.aug_repeats}; "
        f"eval {evals} (crop {cfg.crop_pct:g}, {cfg.interpolation})",
        "  checkpoints every epoch" + (f" and every {cfg.checkpoint_every} steps" if cfg.checkpoint_every else "")
        + f", written in the background; keeps {cfg.keep_checkpoints} step files + last.pt + best.pt",
        f"  output      {output}" + (f"; resumed from {resumed_from} at step {step}" if resumed_from else ""),
    ]
