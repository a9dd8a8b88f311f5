"""GPU check: how fast does one GPU train a ResNet, with synthetic data on the device and end to end from shards?

    python benchmarks/gpu_check.py                      # one H100/H200: at most ~8 minutes
    python benchmarks/gpu_check.py --smoke              # CPU, seconds-sized: the same code paths (CI)

For resnet50 at 224 px (A2 settings), resnet50 at 160 px (A3) and resnet18 at 160 px, bf16 + channels_last:

- ``synthetic``: uint8 batches already on the device -> our batch step (normalize, mixup/cutmix), the model,
  BCE, timm LAMB: the model's ceiling on this GPU, with ``torch.compile`` off and on;
- ``end_to_end``: the product's own training loop (``launcher train --recipe a2/a3``) on a shard set this
  script builds (photo-like JPEGs, about 500x375), every loader worker the machine allows, compile off (and
  on for one case), reading throughput and the data-wait share from the run's metrics;
- ``ratio`` = end-to-end / synthetic: 1.0 means the input pipeline keeps the GPU fed.

It needs only torch, torchvision, timm and accelerate plus pure-Python wheels (webdataset, braceexpand) and
this repository on PYTHONPATH. Results go to JSON with the machine described (benchmarks/machine.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

# (name, recipe, model, train px, micro-batch) - the micro-batch fills an 80 GB GPU without accumulation
CASES = [("resnet50@224 (A2)", "a2", "resnet50", 224, 256), ("resnet50@160 (A3)", "a3", "resnet50", 160, 256),
         ("resnet18@160 (A3)", "a3", "resnet18", 160, 512)]
SMOKE_CASES = [("resnet18@32 (A3, smoke)", "a3", "resnet18", 32, 8)]


def photo_like_jpegs(root: Path, count: int, classes: int, seed: int = 0) -> None:
    """Smooth random scenes with edges and texture, JPEG quality 90: decode cost like real photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index in range(count):
        height, width = int(rng.integers(330, 420)), int(rng.integers(440, 560))
        coarse = rng.random((height // 32 + 2, width // 32 + 2, 3)) * 255
        image = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
        folder = root / f"class_{index % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{index:05d}.jpg", quality=90)


def build_shards(work: Path, count: int, classes: int) -> Path:
    from launcher.shardify import shardify

    images, shards = work / "images", work / "shards"
    if not (shards / "_info.json").exists():
        photo_like_jpegs(images, count, classes)
        shardify(images, shards, val_fraction=0.05, overwrite=True, progress=False)
    return shards


def synthetic_rate(model_name: str, img_size: int, micro: int, *, compile_model: bool, seconds: float,
                   device: torch.device, min_steps: int) -> dict:
    """Images/s of the training step alone, on batches that are already on the device."""
    from launcher.data.batch import BatchTransform
    from launcher.models import create_resnet
    from launcher.models.losses import create_loss
    from launcher.models.optim import create_optimizer

    torch.manual_seed(0)
    model = create_resnet(model_name, 1000).to(device).to(memory_format=torch.channels_last)
    optimizer = create_optimizer(model, "lamb", 5e-3, 0.02)
    loss_fn = create_loss("bce", bce_target_thresh=0.2)
    step_batch = BatchTransform(1000, mixup_alpha=0.1, cutmix_alpha=1.0, channels_last=True)
    if compile_model:
        # a fresh compile per case: after another model's graph, dynamo would guess dynamic shapes and
        # compile a slower, shape-generic graph (seen on an H200: 190 s and 20 % below eager)
        torch._dynamo.reset()
    forward = torch.compile(model) if compile_model else model
    images = torch.randint(0, 256, (micro, 3, img_size, img_size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 1000, (micro,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step() -> None:
        x, targets = step_batch.train(images.clone(), labels)
        with autocast:
            loss = loss_fn(forward(x).float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    started = time.perf_counter()
    for _ in range(3):  # warm-up: cudnn autotuning, compilation
        step()
    sync()
    warmup_s = time.perf_counter() - started
    steps, start, windows = 0, time.perf_counter(), []
    window, window_start = 5, time.perf_counter()
    while steps < min_steps or time.perf_counter() - start < seconds:
        step()
        steps += 1
        if steps % window == 0 or steps == min_steps:
            sync()
            now = time.perf_counter()
            windows.append(window * micro / (now - window_start) if steps % window == 0 else
                           (steps % window) * micro / (now - window_start))
            window_start = now
    sync()
    # the median of 5-step windows, so a one-off hiccup (another process, a clock change) does not count
    return {"img_per_s": round(statistics.median(windows), 1), "steps": steps, "windows": len(windows),
            "warmup_s": round(warmup_s, 1)}


def end_to_end_rate(recipe: str, model: str, img_size: int, micro: int, shards: Path, out: Path, *,
                    compile_model: bool, steps: int, device: str) -> dict:
    """The product's training loop from shards: throughput and data-wait share after the first window."""
    command = [sys.executable, "-m", "launcher.cli", "train", "--recipe", recipe, "--data", str(shards),
               "--output", str(out), "--model", model, "--img-size", str(img_size), "--test-img-size", "0",
               "--global-batch", str(micro), "--micro-batch", str(micro), "--epochs", "1000", "--warmup-epochs", "0",
               "--max-train-steps", str(steps), "--log-every", str(max(1, min(5, steps // 4))), "--val-split", "", "--keep-checkpoints", "0",
               "--device", device, "--precision", "bf16", "--aug-repeats", "0", "--no-progress",
               "--checkpoint-every", str(10 * steps)]
    if compile_model:
        command.append("--compile")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               WANDB_MODE="disabled", LAUNCHER_PROGRESS="off")
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.log").write_text(result.stdout + result.stderr)  # the whole story when a run fails
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r for r in records if r.get("kind") == "train"][1:]  # the first window holds worker start-up
    seconds = sum(r["data_s"] + r["compute_s"] for r in windows)
    summary = json.loads((out / "summary.json").read_text())
    return {"img_per_s": round(statistics.median(r["img_per_s"] for r in windows), 1) if windows else None,
            "data_wait_fraction": round(sum(r["data_s"] for r in windows) / seconds, 3) if seconds else None,
            "workers": summary.get("workers"), "steps": summary.get("steps"), "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of every code path (CI)")
    parser.add_argument("--json", default=None, help="result file (default: benchmarks/results/gpu_check.json; "
                                                     "smoke: a temporary file)")
    parser.add_argument("--seconds", type=float, default=12.0, help="timed seconds per synthetic measurement")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per end-to-end run")
    parser.add_argument("--images", type=int, default=3000, help="images in the generated shard set")
    parser.add_argument("--budget", type=float, default=450.0, help="stop starting measurements after this many s")
    parser.add_argument("--workdir", default=None, help="where the shards are built (default: a temp folder)")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this text")
    args = parser.parse_args(argv)
    from machine import describe_machine

    started = time.perf_counter()
    if args.smoke:
        device, cases, seconds, steps, count = torch.device("cpu"), SMOKE_CASES, 0.0, 3, 48
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --smoke on a CPU)", file=sys.stderr)
            return 2
        device, cases, seconds, steps, count = torch.device("cuda"), CASES, args.seconds, args.steps, args.images
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cases = [case for case in cases if args.only in case[0]]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-"))
    shards = build_shards(work, count, classes=10)
    result: dict = {"benchmark": "training img/s on one device: synthetic (on-device data) vs end to end (shards)",
                    "machine": describe_machine(), "smoke": args.smoke, "cases": [], "skipped": []}
    print(f"gpu_check: shards ready in {time.perf_counter() - started:.0f} s: {shards}", flush=True)
    for index, (name, recipe, model, img_size, micro) in enumerate(cases):
        case: dict = {"case": name, "model": model, "img_size": img_size, "micro_batch": micro}
        for compile_model in (False, True):
            if time.perf_counter() - started > args.budget:
                result["skipped"].append(f"{name} compile={compile_model}: time budget")
                continue
            key = "compile" if compile_model else "eager"
            # smoke: the product's --compile path end to end is what must work; one compile is enough on a CPU
            synthetic_compile = compile_model and not args.smoke
            case[f"synthetic_{key}"] = synthetic_rate(model, img_size, micro, compile_model=synthetic_compile,
                                                      seconds=seconds, device=device, min_steps=2 if args.smoke else 20)
            if compile_model and index > 0 and not args.smoke:
                continue  # end to end with compile for the first case only: compiling costs a minute per run
            case[f"end_to_end_{key}"] = end_to_end_rate(recipe, model, img_size, micro, shards,
                                                        work / f"run-{index}-{key}", compile_model=compile_model,
                                                        steps=steps, device=device.type)
            synthetic = case[f"synthetic_{key}"]["img_per_s"]
            e2e = case[f"end_to_end_{key}"].get("img_per_s")
            case[f"ratio_{key}"] = round(e2e / synthetic, 3) if e2e and synthetic else None
            print(f"gpu_check: {name} {key}: synthetic {synthetic} img/s, end to end {e2e} img/s, "
                  f"data wait {case[f'end_to_end_{key}'].get('data_wait_fraction')}", flush=True)
        result["cases"].append(case)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.json) if args.json else (work / "gpu_check.json" if args.smoke else HERE / "results" / "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"gpu_check: wrote {out} ({result['wall_s']} s)")
    failed = [c["case"] for c in result["cases"] for k, v in c.items() if isinstance(v, dict) and "error" in v]
    if failed:
        print(f"gpu_check: failed runs in {', '.join(sorted(set(failed)))}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

