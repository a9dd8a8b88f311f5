"""Training fidelity and wall time: our product (its command line) vs a loop built from timm's own parts.

    python benchmarks/train_vs_timm.py --json benchmarks/results/train_vs_timm.json
    python benchmarks/train_vs_timm.py --epochs 5 --seeds 0 --json /tmp/smoke.json      # a short check

Both arms train on the same WebDataset shards with the RSB A3 recipe shrunk the same way (default:
ResNet-18, 32 px, 30 epochs, global batch 128, CPU):

* ``ours``: ``python recipes/a3.py --data SHARDS --model M --img-size S --epochs E --global-batch B
  --device cpu --output RUN --seed K``; everything else is the product's default. Results are read
  from the run folder's ``summary.json`` and ``metrics.jsonl`` only, so the script keeps working
  while the package's internals change.
* ``timm``: the loop timm's ``train.py`` runs for ``--dataset wds/NAME --model M --img-size S -b B
  --epochs E --opt lamb --lr-base 8e-3 --lr-base-size 2048 --weight-decay 0.02 --sched cosine
  --warmup-epochs 5 --warmup-lr 1e-4 --min-lr 1e-6 --bce-loss --bce-target-thresh 0.2 --smoothing 0
  --mixup 0.1 --cutmix 1.0 --aa rand-m6-mstd0.5-inc1 --train-interpolation bicubic --crop-pct 0.95
  --amp --amp-dtype bfloat16 --channels-last --no-prefetcher -j 2 --seed K`` (``--device cpu``),
  written out from timm's components: ``create_dataset("wds/...")`` (timm's own WebDataset reader),
  ``create_loader`` (its train / eval transforms), ``Mixup``, ``BinaryCrossEntropy``,
  ``create_optimizer_v2`` (LAMB with timm's weight-decay groups), ``create_scheduler_v2`` (cosine,
  stepped per epoch), bf16 autocast and ``CheckpointSaver`` (train.py saves model + optimizer every
  epoch and keeps the 10 best, as we keep last/best/step files). It runs as a subprocess of this
  script (``--reference-run``).

The data is scikit-learn's digit scans (``launcher demo --no-train`` writes them as 32 px images),
sharded by the ``shardify`` command with ``--val-fraction 0.1975``: 1,442 train / 355 validation
images. Seeds run interleaved (the arm that goes first alternates). Per seed: wall time of the whole
command, best and final top-1, optimizer updates per epoch; then means, medians and the spread.

Accuracy on 355 validation images moves in steps of 0.28 points and varies by 1-2 points between
seeds; compare means over several seeds, not single runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402

VAL_FRACTION = 0.1975  # per class round(n * f): 1,442 train / 355 validation digit images
A3 = {  # RSB A3 (arXiv:2110.00476, Table 1) as timm's train.py flags; the LR is for a global batch of 2048
    "opt": "lamb", "lr_base": 8e-3, "lr_base_size": 2048, "weight_decay": 0.02, "warmup_epochs": 5,
    "warmup_lr": 1e-4, "min_lr": 1e-6, "bce_target_thresh": 0.2, "smoothing": 0.0, "mixup": 0.1,
    "cutmix": 1.0, "auto_augment": "rand-m6-mstd0.5-inc1", "crop_pct": 0.95, "interpolation": "bicubic",
}


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

def _console_script(name: str) -> str:
    """The product's console script installed next to this interpreter (else the one on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        sys.exit(f"error: the '{name}' command is not installed for {sys.executable} (pip install -e .)")
    return found


def _child_env(threads: int = 0) -> dict[str, str]:
    """Children import the package from this checkout, whatever the environment has installed.

    ``threads``: torch's intra-op threads in both arms (OMP_NUM_THREADS); 0 leaves torch's default.
    """
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def prepare_shards(workdir: Path, image_px: int) -> Path:
    """Digit images (``launcher demo --no-train``), then ``shardify`` with the benchmark's split."""
    shards = workdir / "shards" / "digits_bench"
    if (shards / "_info.json").is_file():
        return shards
    demo = workdir / "demo"
    subprocess.run([_console_script("launcher"), "demo", "--no-train", "--quiet", "--workdir", str(demo),
                    "--image-size", str(image_px)], check=True, env=_child_env(), stdout=subprocess.DEVNULL)
    subprocess.run([_console_script("shardify"), str(demo / "digits"), "--out", str(shards),
                    "--val-fraction", str(VAL_FRACTION), "--overwrite"], check=True, env=_child_env(),
                   stdout=subprocess.DEVNULL)
    return shards


def split_sizes(shards: Path) -> dict[str, int]:
    info = json.loads((shards / "_info.json").read_text())
    return {name: int(split["num_samples"]) for name, split in info["splits"].items()}


# --------------------------------------------------------------------------------------------------
# Arm 1: the product, through its command line
# --------------------------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def run_ours(args: argparse.Namespace, shards: Path, seed: int, output: Path) -> dict[str, Any]:
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, str(REPO / "recipes" / "a3.py"), "--data", str(shards), "--model", args.model,
               "--img-size", str(args.img_size), "--epochs", str(args.epochs), "--global-batch",
               str(args.global_batch), "--device", "cpu", "--output", str(output), "--seed", str(seed)]
    if args.warmup_epochs is not None:  # only for runs shorter than the recipe's warmup
        command += ["--warmup-epochs", str(args.warmup_epochs)]
    output.parent.mkdir(parents=True, exist_ok=True)
    log_path = output.parent / f"{output.name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(command, cwd=REPO, env=_child_env(args.threads), stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: our run failed (exit {done.returncode}); see {log_path}")
    # recorded without this machine's paths: the script relative to the repository, the folders by role
    shown = {str(REPO / "recipes" / "a3.py"): "recipes/a3.py", str(shards): "SHARDS", str(output): "RUN"}
    return read_ours_run(output, wall, " ".join(["python", *(shown.get(part, part) for part in command[1:])]))


def read_ours_run(output: Path, wall: float, command: str) -> dict[str, Any]:
    """The per-seed result from a finished run folder (``summary.json`` and ``metrics.jsonl`` only)."""
    summary = json.loads((output / "summary.json").read_text())
    evals = [r for r in _read_jsonl(output / "metrics.jsonl") if r.get("kind") == "eval" and r.get("tag") == "val"]
    curve = [round(float(r["top1"]), 2) for r in evals]
    last5 = curve[-5:] or [float("nan")]
    epochs_done = float(summary.get("epochs_done") or summary["epochs"])
    return {
        "wall_s": round(wall, 1),
        "best_top1": round(float(summary.get("best_top1") or max(curve)), 2),
        "final_top1": round(float(summary.get("final_top1") or curve[-1]), 2),
        "last5_top1": round(statistics.fmean(last5), 2),
        "updates_per_epoch": round(int(summary["steps"]) / epochs_done, 2),
        "images_per_update": summary.get("global_batch"),
        "micro_batch": summary.get("micro_batch"),
        "accumulation": summary.get("accumulation"),
        "top1_per_epoch": curve,
        "command": command,
    }


# --------------------------------------------------------------------------------------------------
# Arm 2: timm's components wired as timm's train.py wires them
# --------------------------------------------------------------------------------------------------

def build_reference(shards: Path, *, model_name: str, img_size: int, global_batch: int, epochs: int, seed: int,
                    workers: int, warmup_epochs: int | None = None) -> dict[str, Any]:
    """Model, loaders, mixup, losses, optimizer and schedule, each made by timm as train.py makes it."""
    import timm
    import torch
    from timm.data import Mixup, create_dataset, create_loader, resolve_data_config
    from timm.loss import BinaryCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import random_seed

    device = torch.device("cpu")
    num_classes = len(json.loads((shards / "classes.json").read_text()))
    random_seed(seed, 0)
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    model = model.to(device=device, memory_format=torch.channels_last)
    data_config = resolve_data_config({"input_size": (3, img_size, img_size), "crop_pct": A3["crop_pct"],
                                       "interpolation": A3["interpolation"]}, model=model)
    dataset_train = create_dataset(f"wds/{shards.name}", root=str(shards), split="train", is_training=True,
                                   batch_size=global_batch, seed=seed)
    dataset_eval = create_dataset(f"wds/{shards.name}", root=str(shards), split="validation", is_training=False,
                                  batch_size=global_batch)
    loader_train = create_loader(
        dataset_train, input_size=data_config["input_size"], batch_size=global_batch, is_training=True,
        re_prob=0.0, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0, color_jitter=0.4,
        auto_augment=A3["auto_augment"], interpolation=A3["interpolation"], mean=data_config["mean"],
        std=data_config["std"], num_workers=workers, distributed=False, pin_memory=False, device=device,
        use_prefetcher=False)
    loader_eval = create_loader(
        dataset_eval, input_size=data_config["input_size"], batch_size=global_batch, is_training=False,
        interpolation=data_config["interpolation"], mean=data_config["mean"], std=data_config["std"],
        num_workers=workers, distributed=False, crop_pct=data_config["crop_pct"], pin_memory=False,
        device=device, use_prefetcher=False)
    mixup = Mixup(mixup_alpha=A3["mixup"], cutmix_alpha=A3["cutmix"], prob=1.0, switch_prob=0.5, mode="batch",
                  label_smoothing=A3["smoothing"], num_classes=num_classes)
    lr = A3["lr_base"] * math.sqrt(global_batch / A3["lr_base_size"])  # train.py's rule for lamb / ada*
    optimizer = create_optimizer_v2(model, opt=A3["opt"], lr=lr, weight_decay=A3["weight_decay"])
    updates_per_epoch = len(loader_train)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=epochs,
        warmup_epochs=A3["warmup_epochs"] if warmup_epochs is None else warmup_epochs,
        warmup_lr=A3["warmup_lr"], min_lr=A3["min_lr"], step_on_epochs=True, updates_per_epoch=updates_per_epoch)
    return {"model": model, "dataset_train": dataset_train, "loader_train": loader_train,
            "loader_eval": loader_eval, "mixup": mixup,
            "train_loss": BinaryCrossEntropy(target_threshold=A3["bce_target_thresh"]),
            "eval_loss": torch.nn.CrossEntropyLoss(), "optimizer": optimizer, "scheduler": scheduler,
            "updates_per_epoch": updates_per_epoch, "lr": lr, "data_config": data_config}


def reference_train_epoch(parts: dict[str, Any], epoch: int, num_updates: int) -> tuple[int, int]:
    """train.py's ``train_one_epoch`` (no prefetcher): mixup on the batch, bf16 autocast, one update per batch."""
    import torch

    model, optimizer = parts["model"], parts["optimizer"]
    model.train()
    images = 0
    for inputs, target in parts["loader_train"]:
        inputs, target = parts["mixup"](inputs, target)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = parts["train_loss"](model(inputs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        num_updates += 1
        images += len(inputs)
        parts["scheduler"].step_update(num_updates=num_updates)
    return num_updates, images


def reference_validate(parts: dict[str, Any]) -> float:
    """train.py's ``validate``: top-1 (%) over the validation split with timm's eval transform."""
    import torch

    model = parts["model"]
    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for inputs, target in parts["loader_eval"]:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output = model(inputs)
            correct += int((output.float().argmax(dim=1) == target).sum())
            seen += len(target)
    return 100.0 * correct / max(seen, 1)


def reference_run(shards: Path, *, model_name: str, img_size: int, global_batch: int, epochs: int, seed: int,
                  workers: int, checkpoint_dir: Path, warmup_epochs: int | None = None) -> dict[str, Any]:
    from timm.utils import CheckpointSaver

    parts = build_reference(shards, model_name=model_name, img_size=img_size, global_batch=global_batch,
                            epochs=epochs, seed=seed, workers=workers, warmup_epochs=warmup_epochs)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    saver = CheckpointSaver(model=parts["model"], optimizer=parts["optimizer"], checkpoint_dir=str(checkpoint_dir),
                            recovery_dir=str(checkpoint_dir), decreasing=False, max_history=10)  # train.py's
    curve: list[float] = []
    images_per_epoch: list[int] = []
    num_updates = 0
    for epoch in range(epochs):
        parts["dataset_train"].set_epoch(epoch)
        num_updates, images = reference_train_epoch(parts, epoch, num_updates)
        images_per_epoch.append(images)
        curve.append(round(reference_validate(parts), 2))
        parts["scheduler"].step(epoch + 1)
        saver.save_checkpoint(epoch, metric=curve[-1])
    return {"best_top1": max(curve), "final_top1": curve[-1], "last5_top1": round(statistics.fmean(curve[-5:]), 2),
            "updates_per_epoch": parts["updates_per_epoch"],
            "images_per_update": global_batch, "images_per_epoch": images_per_epoch[0], "lr": parts["lr"],
            "top1_per_epoch": curve}


def run_timm(args: argparse.Namespace, shards: Path, seed: int, output: Path) -> dict[str, Any]:
    shutil.rmtree(output, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    result_path = output.with_suffix(".json")
    result_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--reference-run", "--data", str(shards),
               "--model", args.model, "--img-size", str(args.img_size), "--epochs", str(args.epochs),
               "--global-batch", str(args.global_batch), "--timm-workers", str(args.timm_workers),
               "--seeds", str(seed), "--json", str(result_path), "--checkpoint-dir", str(output)]
    if args.warmup_epochs is not None:
        command += ["--warmup-epochs", str(args.warmup_epochs)]
    start = time.perf_counter()
    with open(output.with_suffix(".log"), "w") as log:
        done = subprocess.run(command, cwd=REPO, env=_child_env(args.threads), stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: the timm reference run failed (exit {done.returncode}); see {output.with_suffix('.log')}")
    return {"wall_s": round(wall, 1), **json.loads(result_path.read_text())}


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------

def run_settings(args: argparse.Namespace, shards: Path, arm: str, seed: int) -> dict[str, Any]:
    return {"arm": arm, "seed": seed, "data": str(shards), "model": args.model, "img_size": args.img_size,
            "epochs": args.epochs, "global_batch": args.global_batch, "warmup_epochs": args.warmup_epochs,
            "threads": args.threads, "timm_workers": args.timm_workers if arm == "timm" else None}


def run_arm(args: argparse.Namespace, shards: Path, arm: str, seed: int) -> dict[str, Any]:
    """Train one arm for one seed; with ``--reuse``, return a finished run's record with the same settings."""
    output = args.workdir / "runs" / f"{arm}-seed{seed}"
    record_path = output.parent / f"{output.name}.run.json"
    settings = run_settings(args, shards, arm, seed)
    if args.reuse and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("settings") == settings:
            return {**record["result"], "reused": True}
    result = {"ours": run_ours, "timm": run_timm}[arm](args, shards, seed, output)
    record_path.write_text(json.dumps({"settings": settings, "result": result}) + "\n")
    return result


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": len(runs)}
    for key in ("best_top1", "final_top1", "last5_top1", "wall_s"):
        values = [r[key] for r in runs]
        out[key] = {"mean": round(statistics.fmean(values), 2), "median": round(statistics.median(values), 2),
                    "min": min(values), "max": max(values),
                    "stdev": round(statistics.stdev(values), 2) if len(values) > 1 else None}
    out["updates_per_epoch"] = sorted({r["updates_per_epoch"] for r in runs})
    return out


def difference(ours: list[dict[str, Any]], timm: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """Mean of ours minus mean of timm, with the standard error of that difference (unpaired)."""
    if len(ours) < 2 or len(timm) < 2:
        return None
    a, b = [r[key] for r in ours], [r[key] for r in timm]
    stderr = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return {"ours_minus_timm": round(statistics.fmean(a) - statistics.fmean(b), 2), "stderr": round(stderr, 2)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="existing shard folder (default: digits made in --workdir)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "train_vs_timm",
                        help="shards, run folders and logs (default: %(default)s)")
    parser.add_argument("--image-px", type=int, default=32, help="side of the generated digit images")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=32, help="train and eval resolution")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--warmup-epochs", type=int, help="both arms (default: the recipe's 5; set it for short runs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--timm-workers", type=int, default=2, help="loader workers of the timm loop")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in both arms (OMP_NUM_THREADS; 0 = torch's default). On a CPU shared "
                             "with other jobs, 1 avoids threads waiting for each other")
    parser.add_argument("--arms", nargs="+", choices=("ours", "timm"), default=["ours", "timm"])
    parser.add_argument("--reuse", action="store_true",
                        help="take a seed's result from --workdir when a run with the same settings finished there "
                             "(its wall time is the one measured then)")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. what else ran)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "train_vs_timm.json")
    parser.add_argument("--reference-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-dir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reference_run:  # child process: one seed of the timm loop, result to --json
        result = reference_run(args.data, model_name=args.model, img_size=args.img_size,
                               global_batch=args.global_batch, epochs=args.epochs, seed=args.seeds[0],
                               workers=args.timm_workers, checkpoint_dir=args.checkpoint_dir,
                               warmup_epochs=args.warmup_epochs)
        args.json.write_text(json.dumps(result) + "\n")
        return 0

    shards = (args.data or prepare_shards(args.workdir, args.image_px)).resolve()
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in args.arms}
    for index, seed in enumerate(args.seeds):
        order = args.arms if index % 2 == 0 else list(reversed(args.arms))
        for arm in order:
            result = run_arm(args, shards, arm, seed)
            runs[arm].append({"seed": seed, **result})
            print(f"{arm:5s} seed {seed}: best {result['best_top1']:.2f}  final {result['final_top1']:.2f}  "
                  f"{result['updates_per_epoch']:g} updates/epoch  {result['wall_s']:.0f} s", flush=True)
            report = build_report(args, shards, runs, load_before)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")  # after every run: partial results survive
    for arm, values in report["summary"].items():
        print(f"{arm:5s} mean best {values['best_top1']['mean']:.2f} (median {values['best_top1']['median']:.2f}), "
              f"mean final {values['final_top1']['mean']:.2f}, median wall {values['wall_s']['median']:.0f} s")
    print(f"-> {args.json}")
    return 0


def build_report(args: argparse.Namespace, shards: Path, runs: dict[str, list[dict[str, Any]]],
                 load_before: float) -> dict[str, Any]:
    sizes = split_sizes(shards)
    report: dict[str, Any] = {
        "benchmark": "RSB A3 shrunk: our CLI vs timm's components wired as train.py, same shards, CPU",
        # a load average read before reused runs says nothing about them
        "machine": describe_machine() | {"load_average_1min_before_runs": round(load_before, 2) if any(
            not r.get("reused") for values in runs.values() for r in values) else None},
        "config": {"data": f"scikit-learn digits, {args.image_px} px, shardify --val-fraction {VAL_FRACTION:g}"
                   if args.data is None else str(args.data),
                   "train_images": sizes.get("train"), "validation_images": sizes.get("validation"),
                   "model": args.model, "img_size": args.img_size, "epochs": args.epochs,
                   "global_batch": args.global_batch,
                   "warmup_epochs": A3["warmup_epochs"] if args.warmup_epochs is None else args.warmup_epochs,
                   "seeds": args.seeds, "timm_workers": args.timm_workers,
                   "threads": args.threads or "torch default", "timm_recipe": A3},
        "note": args.note,
        "summary": {arm: aggregate(values) for arm, values in runs.items() if values},
    }
    if "ours" in runs and "timm" in runs:
        report["difference"] = {key: difference(runs["ours"], runs["timm"], key)
                                for key in ("best_top1", "final_top1", "last5_top1")}
    report["runs"] = runs
    return report


if __name__ == "__main__":
    sys.exit(main())
