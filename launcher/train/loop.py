"""The training loop on Accelerate: one recipe, any hardware, exact resume, no host-device sync per step.

``train(cfg)`` runs in every process that ``accelerate launch`` / ``torchrun`` / ``python`` started.
The global batch is the contract: the micro-batch and the accumulation steps adapt to the hardware, never
the optimization, and the data plan makes global batch *i* the same samples with the same augmentation on
any shape. An optimizer step (:meth:`Trainer.train_step`) never waits for the device: the loss stays on the
device and is read every ``log_every`` steps, where the NaN check happens too; preemption votes travel on a
CPU group one step behind (:mod:`launcher.train.preemption`); the next micro-batch is copied while this one
computes (:mod:`launcher.train.prefetch`); checkpoints are written by a background thread
(:mod:`launcher.train.checkpoints`). Side effects (files, trackers, progress bars) happen on the main process.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from launcher.config import TrainConfig, save_config, validate
from launcher.models.registry import unwrap_model
from launcher.progress import TrainProgress
from launcher.train.accelerator import clean_step_folders, create_accelerator
from launcher.train.build import build_parts, startup_report
from launcher.train.checkpoints import CheckpointWriter
from launcher.train.precision import configure_backends, resolve_device, resolve_precision
from launcher.train.preemption import (
    PREEMPTED_EXIT_CODE,
    Preempted,
    PreemptionFlag,
    clear_marker,
    control_group,
    write_marker,
)
from launcher.train.prefetch import DevicePrefetcher
from launcher.train.state import (
    Progress,
    best_weights,
    restore,
    saved_shape,
    seed_everything,
    seed_micro_batch,
    snapshot,
)
from launcher.train.tracking import (
    CURVES_FILE,
    SUMMARY_FILE,
    MetricsLog,
    close_file_logging,
    drop_metrics_after,
    init_trackers,
    plot_curves,
    setup_logging,
    write_json,
)
from launcher.train.validation import evaluate

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


@dataclasses.dataclass
class Window:
    """Training numbers since the last log line; the loss is a device tensor until then."""

    loss: torch.Tensor
    data_wait_at_start: float  # the prefetcher's running total of host time spent waiting for data
    steps: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)


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
        setup_logging(self.output, self.main)
        self.progress = Progress()
        self.parts = build_parts(cfg, accelerator, precision)
        keep = cfg.keep_checkpoints
        if self.parts.deepspeed and keep < 1:  # a DeepSpeed folder is found through its step file
            log.info("DeepSpeed: keeping 1 step checkpoint (--keep-checkpoints 0 would leave its folder unnamed)")
            keep = 1
        self.ckpt = CheckpointWriter(self.output / "checkpoints", keep)
        if self.parts.deepspeed and self.main:
            clean_step_folders(self.ckpt.folder)
        self.model = self.parts.model
        self.metrics = MetricsLog(self.output, accelerator, self.main, cfg.report_to != "none")
        self.stop_reason = ""
        self.resumed_from: Path | None = None
        self.extra_eval_step = -1  # the step the extra test resolution was last evaluated at

    # --- setup --------------------------------------------------------------------------------------
    def start(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        path, state = self.ckpt.resolve_resume(cfg.resume)
        notes = []
        if state is not None:
            load_ds = self.parts.load_deepspeed
            self.progress = restore(state, self.parts, acc,
                                    load_deepspeed=(lambda st: load_ds(path, st)) if load_ds else None)
            self.resumed_from = path
            old = saved_shape(state)
            if old != self.parts.shape:
                notes.append(f"resume: shape changed from {old} to {self.parts.shape}: the same global batches "
                             "continue; losses equal up to float reassociation and BatchNorm micro-batch statistics")
        else:
            seed_everything(cfg.seed + acc.process_index)
        if self.main:
            save_config(dataclasses.replace(cfg, output=str(self.output)), self.output / "config.yaml")
            clear_marker(self.output)
            if self.resumed_from:
                drop_metrics_after(self.metrics.path, self.progress.step)
        run_id = init_trackers(acc, cfg.report_to, project=cfg.project, name=self.output.name,
                               output=self.output, config=cfg.to_dict(), wandb_id=self.progress.wandb_id)
        self.progress.wandb_id = run_id or self.progress.wandb_id
        for line in startup_report(cfg, self.parts, acc, self.precision, self.output, self.resumed_from,
                                   self.progress.step) + notes:
            log.info(line)

    # --- checkpoints --------------------------------------------------------------------------------
    def save(self) -> None:
        """Snapshot the state (collective) and hand it to the writer thread; the disk is not waited for."""
        ds_dir = self.parts.save_deepspeed(self.ckpt.folder, self.progress.step) if self.parts.deepspeed else None
        state = snapshot(self.parts, self.accelerator, self.progress, deepspeed_dir=ds_dir)
        if self.main:
            path = self.ckpt.save_resumable(state, self.progress.step)
            log.info("checkpoint: step %d -> %s%s", self.progress.step, path,
                     " (writing in the background)" if self.ckpt.background else "")

    def run_eval(self, final: bool = False, primary: bool = True) -> dict[str, float] | None:
        """Evaluate at the training resolution; at the extra test resolution too at the end of the run
        (and every --test-eval-every epochs): it is reported, not used to rank checkpoints."""
        if not self.parts.eval_loaders:
            return None
        acc, cfg, parts = self.accelerator, self.cfg, self.parts
        unwrapped = unwrap_model(self.model, keep_compiled=True)
        every = cfg.test_eval_every
        extra = final or bool(every and self.progress.epoch % every == 0 and not self.progress.update)
        if extra:
            self.extra_eval_step = self.progress.step
        results: dict[str, dict[str, float]] = {}
        for tag, loader in parts.eval_loaders.items():
            if (tag != "val" and not extra) or (tag == "val" and not primary):
                continue
            results[tag] = evaluate(unwrapped, loader, parts.batch_transform, acc, cfg.limit_eval_batches)
            if parts.ema is not None:
                results[f"{tag}_ema"] = evaluate(parts.ema.module, loader, parts.batch_transform, acc,
                                                 cfg.limit_eval_batches)
        for tag, values in results.items():
            self.metrics.write("eval", self.progress.step, epoch=self.progress.epoch, tag=tag, **values)
            log.info("eval %-10s step %d: loss %.4f  top-1 %.2f%%  top-5 %.2f%%  (%d images)", tag,
                     self.progress.step, values["loss"], values["top1"], values["top5"], values["samples"])
        if not primary:
            return None
        ranked = results["val_ema"] if parts.ema is not None else results["val"]
        self.progress.final = {**self.progress.final, **{tag: dict(values) for tag, values in results.items()}}
        if ranked["top1"] > self.progress.best_top1:
            self.progress.best_top1, self.progress.best_step = ranked["top1"], self.progress.step
            self.progress.evals_since_best = 0
            if self.main:
                self.ckpt.save_best(best_weights(parts, self.progress, ranked))
        else:
            self.progress.evals_since_best += 1
        if cfg.early_stop_patience and self.progress.evals_since_best >= cfg.early_stop_patience:
            self.stop_reason = f"early stop: no better top-1 in {cfg.early_stop_patience} evaluations"
        return ranked

    # --- training -----------------------------------------------------------------------------------
    def train_step(self, batches: Any, window: Window) -> None:
        """One optimizer update over this rank's micro-batches of the current global batch. No host sync."""
        acc, parts, prog = self.accelerator, self.parts, self.progress
        first_micro = acc.process_index * parts.accumulation
        for k in range(parts.accumulation):
            images, labels = next(batches)
            seed_micro_batch(self.cfg.seed, prog.epoch, prog.update, first_micro + k)
            with acc.accumulate(self.model):
                inputs, targets = parts.batch_transform.train(images, labels)
                loss = parts.loss_fn(self.model(inputs).float(), targets)
                acc.backward(loss)
                if self.cfg.clip_grad and acc.sync_gradients and not parts.deepspeed:  # DeepSpeed clips itself
                    acc.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
                parts.optimizer.step()
                parts.optimizer.zero_grad(set_to_none=True)
            window.loss += loss.detach() / parts.accumulation
        prog.update += 1
        prog.step += 1
        window.steps += 1
        if self.cfg.sched_on_updates:
            parts.scheduler.step_update(prog.step)
        if parts.ema is not None:
            parts.ema.update(unwrap_model(self.model), step=prog.step)

    def log_window(self, window: Window, prefetcher: DevicePrefetcher, bar: Any) -> Window:
        """The one place per ``log_every`` steps where the host reads device values."""
        cfg, prog, parts = self.cfg, self.progress, self.parts
        elapsed = time.perf_counter() - window.start
        data_seconds = prefetcher.wait_seconds - window.data_wait_at_start
        loss_value = self.accelerator.reduce(window.loss / window.steps, "mean").item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"training loss is {loss_value} at step {prog.step}; lower --lr, or try --precision fp32 / "
                "--no-channels-last (CPU bf16 kernels have produced NaN at tiny image sizes)")
        images_done = window.steps * cfg.global_batch
        prog.train_images += images_done
        prog.train_seconds += elapsed
        prog.data_seconds += data_seconds
        lr = parts.optimizer.param_groups[0]["lr"]
        self.metrics.write("train", prog.step, epoch=prog.epoch + prog.update / parts.updates_per_epoch,
                           loss=loss_value, lr=lr, img_per_s=images_done / elapsed, data_s=data_seconds,
                           compute_s=elapsed - data_seconds)
        bar.log(loss=loss_value, lr=lr, img_per_s=images_done / elapsed, data_share=data_seconds / elapsed)
        if self.main:
            self.ckpt.check()  # a failed background write stops the run here, not at the end
        return Window(loss=window.loss.zero_(), data_wait_at_start=prefetcher.wait_seconds)

    def train_epoch(self, flag: PreemptionFlag) -> bool:
        """One epoch from ``progress.update``; False when the run must stop (steps limit, early stop)."""
        cfg, acc, parts, prog = self.cfg, self.accelerator, self.parts, self.progress
        loader = parts.train_loader
        loader.set_epoch(prog.epoch)
        loader.set_start(prog.update)
        if not cfg.sched_on_updates:
            parts.scheduler.step(prog.epoch)
        self.model.train()
        prefetcher = DevicePrefetcher(iter(loader), acc.device)
        batches = iter(prefetcher)
        bar = TrainProgress(epoch=prog.epoch, epochs=cfg.epochs, update=prog.update, step=prog.step,
                            updates_per_epoch=parts.updates_per_epoch, max_steps=cfg.max_train_steps,
                            enabled=self.main and cfg.progress, write=log.info)
        window = Window(loss=torch.zeros((), device=acc.device), data_wait_at_start=0.0)
        while prog.update < parts.updates_per_epoch:
            self.train_step(batches, window)
            flag.start_agreement()
            bar.update(1)
            epoch_done = prog.update == parts.updates_per_epoch
            if prog.step % cfg.log_every == 0 or epoch_done:
                window = self.log_window(window, prefetcher, bar)
            if epoch_done:
                break
            if flag.agreed():
                bar.close()
                self.preempt(flag)
            if cfg.eval_every_steps and prog.step % cfg.eval_every_steps == 0:
                self.run_eval()
            if cfg.checkpoint_every and prog.step % cfg.checkpoint_every == 0:
                self.save()
            if self.steps_limit_reached() or self.stop_reason:
                bar.close()
                flag.drain()
                return False
        bar.close()
        del batches
        signalled = flag.drain()
        self.end_epoch()
        if signalled:
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
            self.run_eval(final=prog.epoch == cfg.epochs or self.steps_limit_reached())
        self.save()

    def preempt(self, flag: PreemptionFlag) -> None:
        flag.drain()
        self.save()
        if self.main:
            self.ckpt.wait()  # the marker says "a checkpoint is there": only once it is durable
            write_marker(self.output, step=self.progress.step, epoch=self.progress.epoch,
                         signal_name=flag.signal_name)
        log.warning("preempted by %s at step %d: checkpoint written, exiting with code %d",
                    flag.signal_name or "a signal on another rank", self.progress.step, PREEMPTED_EXIT_CODE)
        self.accelerator.wait_for_everyone()
        raise Preempted(f"stopped at step {self.progress.step}; resume with --resume auto")

    def run(self) -> dict[str, Any]:
        wall_start = time.time()
        self.start()
        with PreemptionFlag(control_group()) as flag:
            while self.progress.epoch < self.cfg.epochs:
                if not self.train_epoch(flag):
                    break
        if self.stop_reason:
            log.info("stopping: %s", self.stop_reason)
            if self.progress.update:  # stopped mid-epoch: evaluate and checkpoint where we are
                self.run_eval(final=True)
                self.save()
            elif len(self.parts.eval_loaders) > 1 and self.extra_eval_step != self.progress.step:
                # stopped early at an epoch end: the test resolution's final number
                self.run_eval(final=True, primary=False)
        if self.main:
            self.ckpt.wait()
        return self.finish(time.time() - wall_start)

    def finish(self, wall_s: float) -> dict[str, Any]:
        prog, cfg, parts = self.progress, self.cfg, self.parts
        final = prog.final.get("val", {})
        skipped = parts.gather_loader_stats()
        summary = {
            "best_top1": prog.best_top1 if prog.best_top1 >= 0 else None,
            "best_step": prog.best_step,
            "final_top1": final.get("top1"), "final_top5": final.get("top5"), "final_loss": final.get("loss"),
            "evaluations": prog.final,
            "epochs": cfg.epochs, "epochs_done": prog.epoch + prog.update / max(parts.updates_per_epoch, 1),
            "steps": prog.step, "updates_per_epoch": parts.updates_per_epoch, "global_batch": cfg.global_batch,
            "micro_batch": parts.micro_batch, "accumulation": parts.accumulation,
            "world_size": self.accelerator.num_processes, "workers": parts.workers,
            "lr": parts.lr, "img_per_s": prog.train_images / prog.train_seconds if prog.train_seconds else None,
            "data_wait_fraction": prog.data_seconds / prog.train_seconds if prog.train_seconds else None,
            "wall_s": wall_s, "train_s": prog.train_seconds, "model": cfg.model, "recipe": cfg.recipe,
            "img_size": cfg.img_size, "num_classes": parts.num_classes, "precision": self.precision,
            "device": str(self.accelerator.device), "stop_reason": self.stop_reason or "completed",
            "skipped_data": skipped, "resumed_from": str(self.resumed_from) if self.resumed_from else None,
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
    accelerator = create_accelerator(device, precision, None if cfg.report_to == "none" else cfg.report_to)
    trainer = None
    try:
        trainer = Trainer(cfg, accelerator, precision)
        accelerator.project_configuration.set_directories(str(trainer.output))
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.ckpt.wait_quietly()
            if cfg.report_to != "none":
                accelerator.end_training()
        close_file_logging()
        _reset_accelerate_state()


def _reset_accelerate_state() -> None:
    """Accelerate keeps process-wide singletons; reset them so ``train`` can run again in this process."""
    from accelerate.state import AcceleratorState, GradientState

    if not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)
    else:
        AcceleratorState._reset_state()
    GradientState._reset_state()
