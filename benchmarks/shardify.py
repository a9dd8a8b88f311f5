"""Benchmark shardify images/s on photo-like JPEGs (~500x375, ~100 KB) against a plain loop.

    python benchmarks/shardify.py --images 4000 --json benchmarks/results/shardify.json

Three measurements on the same files (page cache warmed first, so disk speed does not count):

* ``plain_loop``: the minimum honest work in one process: read each file, fully decode it with PIL
  (validation), write its bytes with ``webdataset.ShardWriter``.
* ``shardify_1_worker``: ``shardify(..., workers=1)`` end to end (walk, decode, tar, publish).
* ``shardify_N_workers``: the same with all available cores.

Targets (issue 2): N workers >= 0.9 x N x the single-worker rate, and single-worker >= plain loop.
Each measurement is repeated ``--repeats`` times and the median run is reported (every run's rate is
in the JSON). The JSON describes the machine so numbers are comparable.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import webdataset as wds
from machine import describe_machine
from PIL import Image

from launcher.data.sample_data import make_photo_tree
from launcher.shardify import shardify

NUM_CLASSES = 8
PHOTO_QUALITY = 98  # makes the generated 500x375 JPEGs average close to 100 KB


def build_photos(root: Path, images: int) -> list[tuple[Path, int]]:
    """The photo set (reused when ``root`` already holds one of the right size)."""
    per_class = math.ceil(images / NUM_CLASSES)
    marker = root / ".complete.json"
    spec = {"per_class": per_class, "classes": NUM_CLASSES, "quality": PHOTO_QUALITY}
    if not (marker.exists() and json.loads(marker.read_text()) == spec):
        shutil.rmtree(root, ignore_errors=True)
        make_photo_tree(root, per_class=per_class, num_classes=NUM_CLASSES, quality=PHOTO_QUALITY)
        marker.write_text(json.dumps(spec))
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [(path, label) for label, name in enumerate(classes) for path in sorted((root / name).glob("*.jpg"))]


def plain_loop(files: list[tuple[Path, int]], out: Path) -> float:
    """Seconds for: read, fully decode with PIL, write bytes with webdataset.ShardWriter."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    with wds.ShardWriter(str(out / "plain-%06d.tar"), maxcount=100_000, maxsize=256e6, verbose=0) as sink:
        for index, (path, label) in enumerate(files):
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
            sink.write({"__key__": f"sample_{index:08d}", "jpg": data, "cls": label})
    return time.perf_counter() - start


def shardify_run(src: Path, out: Path, workers: int) -> float:
    """Seconds for a whole ``shardify`` call (walk, decode, write, fsync, publish) into a fresh folder."""
    shutil.rmtree(out, ignore_errors=True)  # deleting the previous round is not part of the work
    start = time.perf_counter()
    result = shardify(src, out, val_fraction=0.0, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    if result.skipped or result.kept_jpeg != sum(result.num_samples.values()):
        raise RuntimeError(f"benchmark set not stored as-is: {result.summary()}")
    return seconds


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by this process and by its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def median_rate(count: int, measure, repeats: int) -> tuple[float, list[float], dict[str, float]]:
    """Median images/s over ``repeats`` runs, every rate, and the CPU ms per image of the median run
    (main process and worker processes apart: CPU time is far less disturbed by other jobs than
    wall time, and it shows how much work the main process does)."""
    rates, cpu = [], []
    for _ in range(repeats):
        main_before, children_before = _cpu_seconds()
        rates.append(count / measure())
        main_after, children_after = _cpu_seconds()
        cpu.append({"main": round(1000 * (main_after - main_before) / count, 3),
                    "workers": round(1000 * (children_after - children_before) / count, 3)})
    median = sorted(range(repeats), key=rates.__getitem__)[repeats // 2]
    return rates[median], rates, cpu[median]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000, help="number of photos (default: %(default)s)")
    parser.add_argument("--json", default="benchmarks/results/shardify.json", help="result file")
    parser.add_argument("--workdir", default=None, help="where photos and shards go (default: a temp dir)")
    parser.add_argument("--workers", type=int, default=0, help="the 'all workers' count (0: all usable cores)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. how quiet the machine was)")
    args = parser.parse_args(argv)

    workers = args.workers or len(os.sched_getaffinity(0))
    description = describe_machine()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-shardify-"))
    print(f"building {args.images} photo-like JPEGs in {workdir / 'photos'} ...", flush=True)
    files = build_photos(workdir / "photos", args.images)
    sizes = [path.stat().st_size for path, _ in files]
    with Image.open(files[0][0]) as first:
        first_size = first.size
    for path, _ in files:  # warm the page cache so every contender reads from memory
        path.read_bytes()
    count = len(files)

    print("measuring plain loop ...", flush=True)
    plain, plain_all, plain_cpu = median_rate(count, lambda: plain_loop(files, workdir / "plain"), args.repeats)
    print(f"  {plain:,.0f} img/s", flush=True)
    print("measuring shardify, 1 worker ...", flush=True)
    single, single_all, single_cpu = median_rate(count, lambda: shardify_run(workdir / "photos", workdir / "one", 1),
                                   args.repeats)
    print(f"  {single:,.0f} img/s", flush=True)
    print(f"measuring shardify, {workers} workers ...", flush=True)
    multi, multi_all, multi_cpu = median_rate(count, lambda: shardify_run(workdir / "photos", workdir / "all", workers),
                                 args.repeats)
    print(f"  {multi:,.0f} img/s", flush=True)

    description["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    scaling = multi / single
    result = {
        "benchmark": "shardify images/s on photo-like JPEGs (stored byte for byte after a full decode)",
        "command": shlex.join(["python", "benchmarks/shardify.py", *(argv if argv is not None else sys.argv[1:])]),
        "note": args.note,
        "machine": description,
        "dataset": {"images": count, "classes": NUM_CLASSES, "mean_kb": round(statistics.mean(sizes) / 1000, 1),
                    "example_size": list(first_size), "jpeg_quality": PHOTO_QUALITY},
        "repeats": args.repeats,
        "images_per_s": {"plain_loop": round(plain, 1), "shardify_1_worker": round(single, 1),
                         f"shardify_{workers}_workers": round(multi, 1)},
        "all_runs_images_per_s": {"plain_loop": [round(r, 1) for r in plain_all],
                                  "shardify_1_worker": [round(r, 1) for r in single_all],
                                  f"shardify_{workers}_workers": [round(r, 1) for r in multi_all]},
        "cpu_ms_per_image": {"plain_loop": plain_cpu, "shardify_1_worker": single_cpu,
                             f"shardify_{workers}_workers": multi_cpu},
        "workers": workers,
        "scaling": round(scaling, 3),
        "targets": {
            f"{workers}_workers >= 0.9 x {workers} x 1_worker": {
                "required": round(0.9 * workers * single, 1), "measured": round(multi, 1),
                "pass": multi >= 0.9 * workers * single},
            "1_worker >= plain_loop": {"required": round(plain, 1), "measured": round(single, 1),
                                       "pass": single >= plain},
        },
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["images_per_s"]), f"scaling x{scaling:.2f};",
          "targets:", {name: t["pass"] for name, t in result["targets"].items()}, f"-> {out}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
