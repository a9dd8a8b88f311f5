"""Train-loader throughput: launcher.data vs torchvision ImageFolder + DataLoader vs timm create_loader.

    python benchmarks/loader.py --images DIR [--workers N] [--img-size S] --json OUT

Shards DIR with launcher.shardify (DIR is filled with photo-like JPEGs first if it does not exist), then
runs the three loaders with the same augmentation (RandomResizedCrop bicubic + flip + RandAugment),
workers, batch size and images, interleaved epoch by epoch. The first epoch of each loader is a
warm-up (worker start); the medians of the others are reported, with ``ratio_vs_imagefolder`` and
``ratio_vs_timm``. A second part times single-image decode and transform paths on one core (medians of
interleaved rounds, wall and CPU time), including both train paths without RandAugment and RandAugment
alone in timm's PIL ops and in ours, and ``per_image_ratio_vs_timm`` (ours / timm's PIL train path).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe_machine


def epoch_rate(loader) -> float:
    start, images = time.perf_counter(), 0
    for batch in loader:
        images += len(batch[0])
    return images / (time.perf_counter() - start)


def build_loaders(images: Path, shards: Path, args) -> dict:
    from timm.data import create_dataset, create_loader, create_transform
    from torchvision.datasets import ImageFolder

    from launcher.data import build_train_loader, open_dataset

    ours = build_train_loader(open_dataset(str(shards)), rank=0, world_size=1, micro_batch=args.batch,
                              img_size=args.img_size, auto_augment=args.auto_augment, workers=args.workers)
    transform = create_transform(args.img_size, is_training=True, auto_augment=args.auto_augment,
                                 interpolation="bicubic", color_jitter=None)
    folder = torch.utils.data.DataLoader(
        ImageFolder(str(images), transform=transform), batch_size=args.batch, shuffle=True, drop_last=True,
        num_workers=args.workers, persistent_workers=args.workers > 0, pin_memory=torch.cuda.is_available())
    dataset = create_dataset("", root=str(images), is_training=True)
    timm_loader = create_loader(
        dataset, input_size=(3, args.img_size, args.img_size), batch_size=args.batch, is_training=True,
        use_prefetcher=torch.cuda.is_available(), auto_augment=args.auto_augment, interpolation="bicubic",
        color_jitter=None, num_workers=args.workers, persistent_workers=args.workers > 0,
        pin_memory=torch.cuda.is_available())
    return {"launcher": ours, "imagefolder": folder, "timm": timm_loader}


def per_image_paths(files: list[Path], img_size: int, auto_augment: str | None, rounds: int = 5,
                    chunk: int = 10) -> dict:
    """Median milliseconds per image on one core for each decode / transform path and RandAugment alone.

    Each round walks the images in chunks of ``chunk``; every path runs each chunk in turn (order
    reversed every other round), from the same RNG state (so the train paths make identical crop, flip
    and RandAugment draws). Interleaving at that grain keeps a load change on a shared machine from
    landing on one path only. The median round is reported, as wall time and as CPU time of this
    process (the fairer one-core cost on a machine shared with other jobs: time spent waiting for a
    core is not counted), with the per-round CPU ratios of ours to timm's train path.
    """
    from PIL import Image
    from timm.data import create_transform
    from torchvision.io import decode_jpeg

    from launcher.data import EvalTransform, TrainTransform
    from launcher.data.randaugment import to_planar
    from launcher.data.transforms import seed_everything_for_sample

    torch.set_num_threads(1)
    datas = [f.read_bytes() for f in files]
    primary, secondary, _ = create_transform(img_size, is_training=True, auto_augment=auto_augment,
                                             interpolation="bicubic", color_jitter=None, separate=True)
    timm_train = [*primary.transforms, *secondary.transforms]  # PIL in, PIL out: no tensor / normalize
    timm_eval = create_transform(img_size, is_training=False, crop_pct=0.95, interpolation="bicubic").transforms[:2]
    crops = [primary.transforms[0](Image.open(io.BytesIO(d)).convert("RGB")) for d in datas]  # RandAugment's inputs
    planar_crops = [to_planar(np.asarray(crop)) for crop in crops]
    train = TrainTransform(img_size, auto_augment=auto_augment, draft=True)

    def pil_pipeline(transforms):
        def run(data: bytes) -> None:
            image = Image.open(io.BytesIO(data)).convert("RGB")
            for t in transforms:
                image = t(image)
            np.asarray(image)
        return run

    paths = {
        "decode_pil": (datas, lambda d: Image.open(io.BytesIO(d)).convert("RGB")),
        "decode_jpeg_torchvision": (datas, lambda d: decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8))),
        "train_timm_pil": (datas, pil_pipeline(timm_train)),
        "train_timm_pil_no_randaugment": (datas, pil_pipeline(primary.transforms)),
        "train_launcher_no_draft": (datas, TrainTransform(img_size, auto_augment=auto_augment, draft=False)),
        "train_launcher": (datas, train),
        "train_launcher_no_randaugment": (datas, TrainTransform(img_size, auto_augment=None, draft=True)),
        "rand_augment_timm_pil": (crops, secondary),
        "rand_augment_launcher": (planar_crops, train.array_augment or (lambda img: img)),
        "eval_timm_pil": (datas, pil_pipeline(timm_eval)),
        "eval_launcher": (datas, EvalTransform(img_size)),
    }
    wall: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    count = len(datas)
    for round_index in range(rounds):
        order = list(paths.items()) if round_index % 2 == 0 else list(paths.items())[::-1]
        spent = {name: [0.0, 0.0] for name in paths}
        for first in range(0, count, chunk):
            for name, (items, fn) in order:
                seed_everything_for_sample(first)
                start, start_cpu = time.perf_counter(), time.process_time()
                for item in items[first:first + chunk]:
                    fn(item)
                spent[name][0] += time.process_time() - start_cpu
                spent[name][1] += time.perf_counter() - start
        for name, (cpu_s, wall_s) in spent.items():
            cpu[name].append(cpu_s / count * 1e3)
            wall[name].append(wall_s / count * 1e3)
    return {"wall": {name: round(statistics.median(values), 3) for name, values in wall.items()},
            "cpu": {name: round(statistics.median(values), 3) for name, values in cpu.items()},
            "cpu_ratio_rounds": [round(ours / timm, 3)
                                 for ours, timm in zip(cpu["train_launcher"], cpu["train_timm_pil"])]}


def analysis(ms: dict, medians: dict) -> str:
    """Where the per-image time goes, ours against timm's PIL path, and the loader medians."""
    cpu, wall = ms["cpu"], ms["wall"]
    ours, timm = cpu["train_launcher"], cpu["train_timm_pil"]
    rounds = ms["cpu_ratio_rounds"]
    text = (f"per image on one core (CPU time): timm's PIL train path {timm:.2f} ms, ours {ours:.2f} ms "
            f"(ratio {ours / timm:.2f}, rounds {min(rounds):.2f}-{max(rounds):.2f}; wall time "
            f"{wall['train_launcher']:.2f} vs {wall['train_timm_pil']:.2f} ms, "
            f"ratio {wall['train_launcher'] / wall['train_timm_pil']:.2f}). Same crop, flip and RandAugment "
            f"draws. Without RandAugment: timm {cpu['train_timm_pil_no_randaugment']:.2f} ms, ours "
            f"{cpu['train_launcher_no_randaugment']:.2f} ms (decode {cpu['decode_jpeg_torchvision']:.2f} ms "
            f"with torchvision vs {cpu['decode_pil']:.2f} ms with PIL). RandAugment alone on 224 px crops: "
            f"timm's PIL ops {cpu['rand_augment_timm_pil']:.2f} ms, "
            f"ours {cpu['rand_augment_launcher']:.2f} ms (Rotate is Pillow's in both).")
    if medians:
        text += " Loader medians: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in medians.items()) + "."
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=True, type=Path, help="class-folder tree (created if missing)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6, help="timed epochs per loader, the first is warm-up")
    parser.add_argument("--per-class", type=int, default=128, help="images per class when creating --images")
    parser.add_argument("--auto-augment", default="rand-m7-mstd0.5-inc1")
    parser.add_argument("--json", required=True, type=Path)
    args = parser.parse_args(argv)
    load_average_start = os.getloadavg()

    from launcher.data.sample_data import make_photo_tree
    from launcher.shardify import shardify

    if not args.images.exists():
        print(f"creating photo-like JPEGs in {args.images}", flush=True)
        make_photo_tree(args.images, per_class=args.per_class)
    files = sorted(args.images.rglob("*.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        shardify(args.images, shards, val_fraction=0.0, min_shards=max(8, 2 * args.workers), progress=False)
        loaders = build_loaders(args.images, shards, args)
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for epoch in range(args.epochs):
            for name, loader in loaders.items():
                rates[name].append(round(epoch_rate(loader), 1))
                print(f"epoch {epoch} {name:12s} {rates[name][-1]:8.1f} img/s", flush=True)
        del loaders
    medians = {name: statistics.median(values[1:] if len(values) > 1 else values) for name, values in rates.items()}
    per_image_ms = per_image_paths(files[:200], args.img_size, args.auto_augment)
    result = {
        "benchmark": "train loader throughput (images/s delivered to the main process)",
        "machine": describe_machine() | {"load_average_start": load_average_start, "load_average_end": os.getloadavg()},
        "config": {"images": len(files), "img_size": args.img_size, "batch": args.batch, "workers": args.workers,
                   "auto_augment": args.auto_augment, "epochs": args.epochs, "warmup_epochs_dropped": 1,
                   "image_source": "launcher.data.sample_data.make_photo_tree (photo-like JPEGs ~500x375)",
                   "per_image": "first 200 files, one thread, 5 rounds; in each round every path runs each chunk of "
                                "10 images in turn (same seeds), median round"},
        "img_per_s": rates,
        "median_img_per_s": medians,
        "ratio_vs_imagefolder": round(medians["launcher"] / medians["imagefolder"], 3),
        "ratio_vs_timm": round(medians["launcher"] / medians["timm"], 3),
        "per_image_one_core_ms": per_image_ms["wall"],
        "per_image_one_core_cpu_ms": per_image_ms["cpu"],
        "per_image_ratio_vs_timm": {
            kind: round(per_image_ms[kind]["train_launcher"] / per_image_ms[kind]["train_timm_pil"], 3)
            for kind in ("cpu", "wall")},
        "per_image_cpu_ratio_vs_timm_rounds": per_image_ms["cpu_ratio_rounds"],
        "analysis": analysis(per_image_ms, medians),
        "command": f"python benchmarks/loader.py --images DIR --workers {args.workers} --img-size {args.img_size} "
                   f"--batch {args.batch} --epochs {args.epochs} --json OUT",
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_img_per_s", "ratio_vs_imagefolder", "ratio_vs_timm",
                                             "per_image_one_core_cpu_ms", "per_image_ratio_vs_timm",
                                             "analysis")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
