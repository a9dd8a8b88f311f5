"""`launcher demo`: the whole product on a small built-in dataset, offline, in a few minutes on a CPU.

Steps: make the scikit-learn digits image tree -> shardify it -> verify the shards -> train a shrunk A3
recipe (ResNet-18 at 32 px, LAMB + warmup/cosine, BCE) on the shards -> print the evaluation -> write the
run's report.html (curves, confusion matrix, per-class scores, the worst validation images).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

from launcher.config import ConfigError
from launcher.data.sample_data import make_digits_tree
from launcher.shardify import EXIT_VERIFY_FAILED, ShardifyError, shardify, verify


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launcher demo", description=__doc__)
    parser.add_argument("--workdir", default="runs/demo", help="where the demo writes everything (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the generated digit images in px")
    parser.add_argument("--workers", type=int, default=0, help="shardify processes, 0 = all cores")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs of the shrunk A3 run")
    parser.add_argument("--no-train", action="store_true", help="stop after the shards are verified")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir = Path(args.workdir)
    images = workdir / "digits"
    shards = workdir / "shards" / "digits"

    print(f"[1/4] image tree: {images}")
    if not images.is_dir():
        partial = workdir / "digits.partial"  # renamed when complete, so a killed demo never reuses half a tree
        shutil.rmtree(partial, ignore_errors=True)
        tree = make_digits_tree(partial, size=args.image_size)
        partial.rename(images)
        print(f"      wrote {tree.num_images} digit images in {len(tree.classes)} class folders")
    else:
        print("      already there, reused")

    print(f"[2/4] shardify -> {shards}")
    try:
        result = shardify(images, shards, overwrite=True, workers=args.workers, progress=not args.quiet)
    except ShardifyError as error:
        print(f"demo: shardify failed: {error}", file=sys.stderr)
        return error.exit_code
    print(f"      {result.summary()}")

    print("[3/4] verify")
    check = verify(shards, workers=args.workers or None, progress=not args.quiet)
    print(check.table())
    if not check.ok:
        for problem in check.problems:
            print(f"      problem: {problem}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    print(f"      {sum(check.num_samples.values())} samples verified in {shards}")
    if args.no_train:
        return 0

    print("[4/4] train: A3 recipe shrunk to ResNet-18 at 32 px (same engine, same code path as a cluster run)")
    try:
        summary = train_demo(shards, workdir / "train", epochs=args.epochs)
    except ConfigError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 2
    print(f"demo: OK, validation top-1 {summary['final_top1']:.1f}% (best {summary['best_top1']:.1f}%, "
          f"chance 10%) after {summary['epochs']} epochs, {summary['img_per_s']:.0f} img/s; "
          f"run folder {summary['output']}")
    from launcher.inference.report import write_report_after_training

    write_report_after_training(summary["output"], device="auto", workers=1, progress=not args.quiet,
                                prefix="demo: ")
    return 0


def train_demo(shards: Path, output: Path, *, epochs: int) -> dict:
    """The A3 recipe with only what a 2-core CPU and 8x8 digit scans need changed.

    Heavy augmentation (mixup/cutmix, RandAugment, flips: a flipped digit is another digit) needs far more
    epochs than a demo has, so it is off; optimizer, schedule, loss and engine are the recipe's.
    """
    from launcher.train.command import load_recipe
    from launcher.train.loop import train

    cfg = dataclasses.replace(
        load_recipe("a3"), data=str(shards), model="resnet18", img_size=32, test_img_size=0,
        epochs=epochs, warmup_epochs=1, global_batch=32, micro_batch=32, lr=8e-3, lr_ref_batch=0,
        mixup=0.0, cutmix=0.0, auto_augment=None, hflip=0.0, limit_train_batches=20, workers=1,
        output=str(output), resume="",
    )
    return train(cfg)


if __name__ == "__main__":
    sys.exit(main())
