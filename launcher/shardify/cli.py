"""Command line of `shardify SRC` and `shardify verify DIR` (console script ``shardify``; also ``python -m launcher.shardify``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.progress import check_environment
from launcher.shardify.pipeline import (
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_VERIFY_FAILED,
    ShardifyError,
    ShardifyOptions,
    shardify,
    verify,
)


def _positive_or_none(text: str) -> int | None:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value or None


def build_parser() -> argparse.ArgumentParser:
    defaults = ShardifyOptions()
    parser = argparse.ArgumentParser(
        prog="shardify",
        description="Convert a class-folder image tree (SRC/<class>/..., or SRC/train/<class>/... plus "
                    "SRC/val/<class>/...) into shuffled WebDataset shards with an _info.json that timm "
                    "reads (--dataset wds/NAME --data-dir OUT). `shardify verify DIR` re-checks an output.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="folder with one subfolder per class (or train/ and val/)")
    parser.add_argument("--out", help="output folder (default: shards/<name of SRC>); must be outside SRC")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                        help="share of each class held out for validation when SRC has no val/ folder "
                             "(seeded, stratified; 0 = no validation split) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the split and of the sample order across shards (default: %(default)s)")
    parser.add_argument("--shard-size", type=float, default=defaults.shard_size_mb, metavar="MB",
                        help="start a new shard before one passes this size, 0 = no limit (default: %(default)s)")
    parser.add_argument("--shard-count", type=int, default=defaults.shard_count, metavar="N",
                        help="at most N samples per shard, 0 = no limit (default: %(default)s)")
    parser.add_argument("--min-shards", type=int, default=defaults.min_shards, metavar="N",
                        help="cut each split into at least N shards when it has N images or more, so "
                             "data-loader workers and ranks all get shards (default: %(default)s)")
    parser.add_argument("--quality", type=int, default=defaults.quality,
                        help="JPEG quality of converted images; JPEGs needing no change are stored "
                             "byte for byte (default: %(default)s)")
    parser.add_argument("--max-side", type=_positive_or_none, default=None, metavar="PX",
                        help="downscale images whose longer side exceeds PX (re-encodes them); faster "
                             "training-time decoding, but caps the resolution for later use (default: off)")
    parser.add_argument("--max-pixels", type=_positive_or_none, default=defaults.max_pixels, metavar="N",
                        help="reject images with more than N pixels as decompression bombs, 0 = no limit "
                             "(default: %(default)s, Pillow's limit)")
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help="decoding processes, 0 = all available cores (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output (only once the new one is complete)")
    parser.add_argument("--strict", action="store_true",
                        help="fail (exit 3, publish nothing) as soon as any file has to be skipped")
    parser.add_argument("--verify", action="store_true", help="run `shardify verify` on the result")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def build_verify_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardify verify",
        description="Re-read every shard of a shardify output: counts against _info.json, every image "
                    "decoded, labels checked; prints a per-class table.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", metavar="DIR", help="a shardify output folder (holding _info.json)")
    parser.add_argument("--workers", type=int, default=0, help="processes, 0 = all available cores")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _log(message: str) -> None:
    print(f"shardify: {message}", file=sys.stderr, flush=True)


def run_verify(out_dir: str | Path, *, workers: int = 0, progress: bool = True) -> int:
    try:
        result = verify(out_dir, workers=workers or None, progress=progress)
    except (OSError, ValueError) as error:
        _log(f"error: {error}")
        return EXIT_VERIFY_FAILED
    print(result.table())
    total = sum(result.num_samples.values())
    if result.ok:
        print(f"verify: OK, {total:,} samples in {result.shards_checked} shards of {result.out_dir}, "
              f"every image decoded ({result.seconds:.1f} s)")
        return EXIT_OK
    for problem in result.problems[:50]:
        _log(f"problem: {problem}")
    if len(result.problems) > 50:
        _log(f"... {len(result.problems) - 50} more problems")
    print(f"verify: FAILED, {len(result.problems)} problem(s) in {result.out_dir}")
    return EXIT_VERIFY_FAILED


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        check_environment()
    except ValueError as error:
        _log(f"error: {error}")
        return EXIT_USAGE
    if argv[:1] == ["verify"]:
        verify_args = build_verify_parser().parse_args(argv[1:])
        return run_verify(verify_args.dir, workers=verify_args.workers, progress=not verify_args.quiet)
    args = build_parser().parse_args(argv)
    options = ShardifyOptions(
        val_fraction=args.val_fraction, seed=args.seed, shard_size_mb=args.shard_size,
        shard_count=args.shard_count, min_shards=args.min_shards, quality=args.quality,
        max_side=args.max_side, max_pixels=args.max_pixels, workers=args.workers,
        overwrite=args.overwrite, strict=args.strict, progress=not args.quiet,
    )
    try:
        result = shardify(args.src, args.out, options)
    except ShardifyError as error:
        _log(f"error: {error}")
        return error.exit_code
    except KeyboardInterrupt:
        _log("interrupted; nothing was published")
        return EXIT_INTERRUPTED
    for warning in result.warnings[:10]:
        _log(f"warning: {warning}")
    if len(result.warnings) > 10:
        _log(f"... {len(result.warnings) - 10} more warnings in {result.out_dir / 'report.json'}")
    for item in result.skipped[:10]:
        _log(f"skipped {item.path}: {item.reason} ({item.detail})")
    if len(result.skipped) > 10:
        _log(f"... {len(result.skipped) - 10} more skipped files in {result.out_dir / 'report.json'}")
    print(result.summary())
    if args.verify:
        verified = run_verify(result.out_dir, workers=args.workers, progress=not args.quiet)
        if verified != EXIT_OK:
            return verified
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
