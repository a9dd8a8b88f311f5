"""Run folder bookkeeping: metrics.jsonl, trackers (wandb / tensorboard via Accelerate), summary, curves.

Only the main process writes. Every metrics line carries the global optimizer step, which is also the
step given to the trackers, so curves line up across resumes.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("launcher.train.tracking")

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
WANDB_ID_FILE = "wandb_run_id"


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def prepare_wandb_environment() -> str:
    """Offline mode unless credentials exist, so a missing login or network never blocks training."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return os.environ["WANDB_MODE"]
    if not wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
        log.info("wandb: no credentials found (WANDB_API_KEY / netrc) -> offline mode; `wandb sync` uploads later")
        return "offline"
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "60")
    return "online"


def wandb_run_id(output: Path, from_checkpoint: str | None) -> str:
    """The run id persisted in the run folder (or the checkpoint), so a resumed run continues the same run."""
    path = output / WANDB_ID_FILE
    run_id = from_checkpoint or (path.read_text().strip() if path.is_file() else "")
    if not run_id:
        import wandb

        run_id = wandb.util.generate_id()
    path.write_text(run_id + "\n")
    return run_id


def init_trackers(accelerator: Any, report_to: str, *, project: str, name: str, output: Path,
                  config: dict[str, Any], wandb_id: str | None) -> str | None:
    """Start Accelerate's tracker (main process); returns the wandb run id when wandb is used."""
    if report_to == "none":
        return None
    init_kwargs: dict[str, Any] = {}
    run_id = None
    if report_to == "wandb":
        prepare_wandb_environment()
        run_id = wandb_run_id(output, wandb_id) if accelerator.is_main_process else None
        init_kwargs["wandb"] = {"id": run_id, "resume": "allow", "name": name, "dir": str(output)}
    try:
        accelerator.init_trackers(project, config=_flat_config(config), init_kwargs=init_kwargs)
    except Exception as exc:  # a tracker must never take the run down
        if report_to != "wandb" or os.environ.get("WANDB_MODE") == "offline":
            raise
        log.warning("wandb: online start failed (%s); continuing offline", exc)
        os.environ["WANDB_MODE"] = "offline"
        accelerator.init_trackers(project, config=_flat_config(config), init_kwargs=init_kwargs)
    return run_id


def _flat_config(config: dict[str, Any]) -> dict[str, Any]:
    # TensorBoard hparams accept only scalars and strings.
    return {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in config.items()}


def setup_logging(output: Path, main: bool) -> None:
    """Messages to the console (all ranks: warnings; main: info) and, on the main process, to train.log."""
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


def close_file_logging() -> None:
    logger = logging.getLogger("launcher")
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler):
            handler.close()
            logger.removeHandler(handler)


class MetricsLog:
    """Appends JSON lines to metrics.jsonl and forwards numbers to the trackers (main process only)."""

    def __init__(self, output: Path, accelerator: Any, enabled: bool, use_trackers: bool) -> None:
        self.path = output / METRICS_FILE
        self.accelerator = accelerator
        self.enabled = enabled
        self.use_trackers = use_trackers

    def write(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.use_trackers:
            numbers = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, int | float) and k != "epoch"}
            self.accelerator.log(numbers, step=step)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill -9: skip it
                continue
    return records


def drop_metrics_after(path: Path, step: int) -> None:
    """On resume, forget lines logged after the checkpoint's step (they will be logged again)."""
    records = read_metrics(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) != len(records):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def plot_curves(metrics_path: Path, png_path: Path, title: str = "") -> Path | None:
    """Loss, accuracy and LR against the optimizer step, as a PNG (matplotlib Agg, no display needed)."""
    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    for tag in sorted({r.get("tag", "val") for r in evals}):
        rows = [r for r in evals if r.get("tag", "val") == tag]
        steps = [r["step"] for r in rows]
        ax_loss.plot(steps, [r["loss"] for r in rows], marker="o", label=f"{tag} loss")
        ax_acc.plot(steps, [r["top1"] for r in rows], marker="o", label=f"{tag} top-1")
        ax_acc.plot(steps, [r["top5"] for r in rows], marker=".", linestyle="--", label=f"{tag} top-5")
    ax_loss.set(title="loss", xlabel="optimizer step")
    ax_acc.set(title="accuracy (%)", xlabel="optimizer step")
    ax_lr.set(title="learning rate", xlabel="optimizer step")
    for ax in (ax_loss, ax_acc):
        if ax.has_data():
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
