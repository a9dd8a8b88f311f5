"""The training loop on Accelerate: one recipe, any hardware, exact resume.

``train(cfg)`` runs in every process that ``accelerate launch`` / ``torchrun`` / ``python`` started.
The global batch is the contract: the micro-batch (given, or probed on CUDA) and the accumulation
steps adapt to the hardware, never the optimization. Gradients are only synchronized on the last
micro-step of an update (``accelerator.accumulate``). Side effects (files, trackers, progress bars)
happen on the main process only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from launcher.config import TrainConfig, save_config, validate
from launcher.progress import TrainProgress
from launcher.train.build import RunParts, build_parts, startup_report
from launcher.train.precision import configure_backends, resolve_device, resolve_precision
from launcher.train.preemption import (
    PREEMPTED_EXIT_CODE,
    Preempted,
    PreemptionFlag,
    clear_marker,
    write_marker,
)
from launcher.train.state import (
    CheckpointDir,
    Progress,
    load_checkpoint,
    model_state_dict,
    restore,
    resumable_state,
    seed_everything,
)
from launcher.train.tracking import (
    CURVES_FILE,
    SUMMARY_FILE,
    MetricsLog,
    drop_metrics_after,
    init_trackers,
    plot_curves,
    write_json,
)

__all__ = ["PREEMPTED_EXIT_CODE", "Preempted", "train", "evaluate"]

log = logging.getLogger("launcher.train.loop")


def default_output(cfg: TrainConfig, accelerator: Accelerator) -> Path:
    """``--output``, else runs/<name>; the time-stamped default name is decided by rank 0 for everyone."""
    if cfg.output:
        return Path(cfg.output)
    name = [cfg.name or f"{cfg.recipe}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if accelerator.num_processes > 1:
        broadcast_object_list(name, from_process=0)
    return Path("runs") / name[0]


def _setup_logging(output: Path, main: bool) -> None:
    logger = logging.getLogger("launcher")
    logger.setLevel(logging.INFO if main else logging.WARNING)
    if not any(getattr(h, "_launcher", False) for h in logger.handlers):
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        console._launcher = True  # type: ignore[attr-defined]
        logger.addHandler(console)
        logger.propagate = False
    if main:
        to_file = logging.FileHandler(output / "train.log")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        to_file._launcher = True  # type: ignore[attr-defined]
        logger.addHandler(to_file)


def _close_file_logging() -> None:
    logger = logging.getLogger("launcher")
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler):
            handler.close()
            logger.removeHandler(handler)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, parts: RunParts, accelerator: Accelerator,
             limit: int = 0) -> dict[str, float]:
    """Plain cross-entropy loss, top-1 and top-5 (%) over the whole split, summed exactly across ranks."""
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
            logits = model(parts.batch_transform.eval(images))
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                             top[:, 0].sum().double(), top.any(dim=1).sum().double(),
                             torch.tensor(len(labels), dtype=torch.float64, device=sums.device)])
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(sums)  # one collective: ranks may hold different numbers of batches
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {"loss": sums[0].item() / n, "top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n,
            "samples": int(sums[3].item())}


class Trainer:
    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, precision: str) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.precision = precision
        self.main = accelerator.is_main_process
        self.output = default_output(cfg, accelerator)
        if self.main:
            (self.output / "checkpoints").mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        _setup_logging(self.output, self.main)
        self.ckpt = CheckpointDir(self.output / "checkpoints", cfg.keep_checkpoints)
        self.progress = Progress()
        self.parts = build_parts(cfg, accelerator)
        self.model = self.parts.model
        self.metrics = MetricsLog(self.output, accelerator, self.main, cfg.report_to != "none")
        self.stop_reason = ""

    # --- setup --------------------------------------------------------------------------------------
    def start(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        resume_path = self.ckpt.resolve_resume(cfg.resume)
        resumed_from = None
        if resume_path is not None:
            state = load_checkpoint(resume_path)
            self.progress = restore(state, self.parts, acc)
            resumed_from = resume_path
        else:
            seed_everything(cfg.seed + acc.process_index)
        if self.main:
            save_config(dataclasses.replace(cfg, output=str(self.output)), self.output / "config.yaml")
            clear_marker(self.output)
            if resumed_from:
                drop_metrics_after(self.metrics.path, self.progress.step)
        run_id = init_trackers(acc, cfg.report_to, project=cfg.project, name=self.output.name,
                               output=self.output, config=cfg.to_dict(), wandb_id=self.progress.wandb_id)
        self.progress.wandb_id = run_id or self.progress.wandb_id
        for line in startup_report(cfg, self.parts, acc, self.precision, self.output, resumed_from,
                                   self.progress.step):
            log.info(line)

    # --- checkpoints --------------------------------------------------------------------------------
    def save(self) -> None:
        state = resumable_state(self.parts, self.accelerator, dataclasses.asdict(self.progress), self.output)
        if self.main:
            path = self.ckpt.save_resumable(state, self.progress.step)
            log.info("checkpoint: step %d -> %s", self.progress.step, path)
        self.accelerator.wait_for_everyone()

    def save_best(self, metrics: dict[str, float]) -> None:
        if not self.main:
            return
        source = self.parts.ema.module if self.parts.ema is not None else self.model
        self.ckpt.save_best({"model": model_state_dict(source), "config": self.parts.config_dict,
                             "classes": self.parts.classes, "epoch": self.progress.epoch,
                             "step": self.progress.step, "metrics": metrics, "ema": self.parts.ema is not None})

    # --- evaluation ---------------------------------------------------------------------------------
    def run_eval(self) -> dict[str, float] | None:
        if not self.parts.eval_loaders:
            return None
        acc, cfg = self.accelerator, self.cfg
        unwrapped = acc.unwrap_model(self.model)
        results: dict[str, dict[str, float]] = {}
        for tag, loader in self.parts.eval_loaders.items():
            results[tag] = evaluate(unwrapped, loader, self.parts, acc, cfg.limit_eval_batches)
            if self.parts.ema is not None:
                results[f"{tag}_ema"] = evaluate(self.parts.ema.module, loader, self.parts, acc,
                                                 cfg.limit_eval_batches)
        for tag, values in results.items():
            self.metrics.write("eval", self.progress.step, epoch=self.progress.epoch, tag=tag, **values)
            log.info("eval %-10s step %d: loss %.4f  top-1 %.2f%%  top-5 %.2f%%  (%d images)", tag,
                     self.progress.step, values["loss"], values["top1"], values["top5"], values["samples"])
        ranked = results["val_ema"] if self.parts.ema is not None else results["val"]
        self.progress.final = {tag: dict(values) for tag, values in results.items()}
        if ranked["top1"] > self.progress.best_top1:
            self.progress.best_top1, self.progress.best_step = ranked["top1"], self.progress.step
            self.progress.evals_since_best = 0
            self.save_best(ranked)
        else:
            self.progress.evals_since_best += 1
        if cfg.early_stop_patience and self.progress.evals_since_best >= cfg.early_stop_patience:
            self.stop_reason = f"early stop: no better top-1 in {cfg.early_stop_patience} evaluations"
        return ranked

    # --- training -----------------------------------------------------------------------------------
    def train_epoch(self, flag: PreemptionFlag) -> bool:
        """One epoch from ``progress.update``; False when the run must stop (steps limit, early stop)."""
        cfg, acc, parts, prog = self.cfg, self.accelerator, self.parts, self.progress
        loader, accum, device = parts.train_loader, parts.accumulation, acc.device
        loader.set_epoch(prog.epoch)
        loader.set_start(prog.update * accum)
        if not cfg.sched_on_updates:
            parts.scheduler.step(prog.epoch)
        self.model.train()
        with torch.random.fork_rng(devices=[]):  # a DataLoader draws its base seed from the global RNG
            batches = iter(loader)
        bar = TrainProgress(epoch=prog.epoch, epochs=cfg.epochs, update=prog.update, step=prog.step,
                            updates_per_epoch=parts.updates_per_epoch, max_steps=cfg.max_train_steps,
                            enabled=self.main and cfg.progress, write=log.info)
        window_loss = torch.zeros((), device=device)
        window_steps, window_data, window_start = 0, 0.0, time.perf_counter()
        while prog.update < parts.updates_per_epoch:
            for _ in range(accum):
                wait = time.perf_counter()
                images, labels = next(batches)
                window_data += time.perf_counter() - wait
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                with acc.accumulate(self.model):
                    inputs, targets = parts.batch_transform.train(images, labels)
                    loss = parts.loss_fn(self.model(inputs).float(), targets)
                    acc.backward(loss)
                    if cfg.clip_grad and acc.sync_gradients:
                        acc.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                    parts.optimizer.step()
                    parts.optimizer.zero_grad(set_to_none=True)
                window_loss += loss.detach() / accum
            prog.update += 1
            prog.step += 1
            window_steps += 1
            if cfg.sched_on_updates:
                parts.scheduler.step_update(prog.step)
            if parts.ema is not None:
                parts.ema.update(acc.unwrap_model(self.model), step=prog.step)
            bar.update(1)
            if prog.step % cfg.log_every == 0 or prog.update == parts.updates_per_epoch:
                elapsed = time.perf_counter() - window_start
                loss_value = acc.reduce(window_loss / window_steps, "mean").item()
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"training loss is {loss_value} at step {prog.step}; lower --lr, or try --precision fp32 / "
                        "--no-channels-last (CPU bf16 kernels have produced NaN at tiny image sizes)")
                images_done = window_steps * cfg.global_batch
                prog.train_images += images_done
                prog.train_seconds += elapsed
                prog.data_seconds += window_data
                lr = parts.optimizer.param_groups[0]["lr"]
                self.metrics.write("train", prog.step, epoch=prog.epoch + prog.update / parts.updates_per_epoch,
                                   loss=loss_value, lr=lr, img_per_s=images_done / elapsed,
                                   data_s=window_data, compute_s=elapsed - window_data)
                bar.log(loss=loss_value, lr=lr, img_per_s=images_done / elapsed, data_share=window_data / elapsed)
                window_loss.zero_()
                window_steps, window_data, window_start = 0, 0.0, time.perf_counter()
            epoch_done = prog.update == parts.updates_per_epoch
            if epoch_done:
                break
            if flag.agreed(device, acc.num_processes > 1):
                bar.close()
                self.preempt(flag)
            if cfg.eval_every_steps and prog.step % cfg.eval_every_steps == 0:
                self.run_eval()
            if cfg.checkpoint_every and prog.step % cfg.checkpoint_every == 0:
                self.save()
            if self.steps_limit_reached() or self.stop_reason:
                bar.close()
                return False
        bar.close()
        del batches
        self.end_epoch()
        if flag.agreed(device, acc.num_processes > 1):
            self.preempt(flag)
        self.steps_limit_reached()
        return not self.stop_reason

    def steps_limit_reached(self) -> bool:
        """True (and the stop reason set, unless one is already) once --max-train-steps updates are done."""
        limit = self.cfg.max_train_steps
        if not (limit and self.progress.step >= limit):
            return False
        self.stop_reason = self.stop_reason or f"max_train_steps={limit} reached"
        return True

    def end_epoch(self) -> None:
        cfg, prog = self.cfg, self.progress
        if self.accelerator.num_processes > 1 and cfg.dist_bn != "none" and not cfg.sync_bn:
            from timm.utils import distribute_bn

            distribute_bn(self.model, self.accelerator.num_processes, reduce=cfg.dist_bn == "reduce")
        prog.epoch += 1
        prog.update = 0
        if prog.epoch % cfg.eval_every == 0 or prog.epoch == cfg.epochs:
            self.run_eval()
        self.save()

    def preempt(self, flag: PreemptionFlag) -> None:
        self.save()
        if self.main:
            write_marker(self.output, step=self.progress.step, epoch=self.progress.epoch,
                         signal_name=flag.signal_name)
        log.warning("preempted by %s at step %d: checkpoint written, exiting with code %d",
                    flag.signal_name or "a signal on another rank", self.progress.step, PREEMPTED_EXIT_CODE)
        raise Preempted(f"stopped at step {self.progress.step}; resume with --resume auto")

    def run(self) -> dict[str, Any]:
        wall_start = time.time()
        self.start()
        with PreemptionFlag() as flag:
            while self.progress.epoch < self.cfg.epochs:
                if not self.train_epoch(flag):
                    break
        if self.stop_reason:
            log.info("stopping: %s", self.stop_reason)
            if self.progress.update:  # stopped mid-epoch: evaluate and checkpoint where we are
                self.run_eval()
                self.save()
        return self.finish(time.time() - wall_start)

    def finish(self, wall_s: float) -> dict[str, Any]:
        prog, cfg, parts = self.progress, self.cfg, self.parts
        final = prog.final.get("val", {})
        summary = {
            "best_top1": prog.best_top1 if prog.best_top1 >= 0 else None,
            "best_step": prog.best_step,
            "final_top1": final.get("top1"), "final_top5": final.get("top5"), "final_loss": final.get("loss"),
            "evaluations": prog.final,
            "epochs": cfg.epochs, "epochs_done": prog.epoch + prog.update / max(parts.updates_per_epoch, 1),
            "steps": prog.step, "global_batch": cfg.global_batch, "micro_batch": parts.micro_batch,
            "accumulation": parts.accumulation, "world_size": self.accelerator.num_processes,
            "lr": parts.lr, "img_per_s": prog.train_images / prog.train_seconds if prog.train_seconds else None,
            "data_wait_fraction": prog.data_seconds / prog.train_seconds if prog.train_seconds else None,
            "wall_s": wall_s, "train_s": prog.train_seconds, "model": cfg.model, "recipe": cfg.recipe,
            "img_size": cfg.img_size, "num_classes": parts.num_classes, "precision": self.precision,
            "device": str(self.accelerator.device), "stop_reason": self.stop_reason or "completed",
            "output": str(self.output),
        }
        if self.main:
            write_json(self.output / SUMMARY_FILE, summary)
            plot_curves(self.metrics.path, self.output / CURVES_FILE, title=self.output.name)
            log.info("done: best top-1 %s, final top-1 %s, %.0f img/s, %.0f s -> %s",
                     _pct(summary["best_top1"]), _pct(summary["final_top1"]), summary["img_per_s"] or 0,
                     wall_s, self.output)
        return summary


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train with ``cfg`` in this process (one of possibly many ranks); returns the run summary.

    Raises :class:`Preempted` after a SIGUSR1/SIGTERM checkpoint and :class:`ConfigError` on bad settings.
    """
    validate(cfg)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    configure_backends(device, deterministic=cfg.deterministic, threads=cfg.threads)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=precision,
                              log_with=None if cfg.report_to == "none" else cfg.report_to)
    if device == "cpu" and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        log.warning("DeepSpeed config ignored: DeepSpeed runs on GPUs only here; training with plain DDP on CPU")
    trainer = None
    try:
        trainer = Trainer(cfg, accelerator, precision)
        accelerator.project_configuration.set_directories(str(trainer.output))
        return trainer.run()
    finally:
        if trainer is not None and cfg.report_to != "none":
            accelerator.end_training()
        _close_file_logging()
        _reset_accelerate_state()


def _reset_accelerate_state() -> None:
    """Accelerate keeps process-wide singletons; reset them so ``train`` can run again in this process."""
    from accelerate.state import AcceleratorState, GradientState

    if not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)
    else:
        AcceleratorState._reset_state()
    GradientState._reset_state()

