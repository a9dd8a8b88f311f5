"""`launcher demo`: the whole product on a small built-in dataset, offline, in a few minutes on a CPU.

Steps: make the scikit-learn digits image tree -> shardify it -> verify the shards -> print a summary.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from launcher.sample_data import make_digits_tree
from launcher.shardify import EXIT_VERIFY_FAILED, ShardifyError, shardify, verify


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launcher demo", description=__doc__)
    parser.add_argument("--workdir", default="runs/demo", help="where the demo writes everything (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the generated digit images in px")
    parser.add_argument("--workers", type=int, default=0, help="shardify processes, 0 = all cores")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir = Path(args.workdir)
    images = workdir / "digits"
    shards = workdir / "shards" / "digits"

    print(f"[1/3] image tree: {images}")
    if not images.is_dir():
        partial = workdir / "digits.partial"  # renamed when complete, so a killed demo never reuses half a tree
        shutil.rmtree(partial, ignore_errors=True)
        tree = make_digits_tree(partial, size=args.image_size)
        partial.rename(images)
        print(f"      wrote {tree.num_images} digit images in {len(tree.classes)} class folders")
    else:
        print("      already there, reused")

    print(f"[2/3] shardify -> {shards}")
    try:
        result = shardify(images, shards, overwrite=True, workers=args.workers, progress=not args.quiet)
    except ShardifyError as error:
        print(f"demo: shardify failed: {error}", file=sys.stderr)
        return error.exit_code
    print(f"      {result.summary()}")

    print("[3/3] verify")
    check = verify(shards, workers=args.workers or None, progress=not args.quiet)
    print(check.table())
    if not check.ok:
        for problem in check.problems:
            print(f"      problem: {problem}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    print(f"demo: OK, {sum(check.num_samples.values())} samples verified in {shards}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
