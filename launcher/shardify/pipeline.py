"""`shardify SRC`: class folders -> WebDataset shards that timm and webdataset read directly.

Steps: walk SRC and plan the splits (:mod:`launcher.data.folders`), shuffle the file list with the seed,
decode/convert images in a process pool in bounded, ordered chunks (memory does not grow with the
dataset), append them to tars under temporary names, then publish atomically with ``_info.json`` last
(:mod:`launcher.shardify.writer`). ``shardify verify DIR`` re-reads everything (:mod:`launcher.shardify.verify`).

Python API::

    from launcher.shardify import shardify, verify
    result = shardify("imgs", "shards/imgs", val_fraction=0.1, workers=4)   # -> ShardifyResult
    check = verify("shards/imgs")                                          # -> VerifyResult
"""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from launcher import __version__
from launcher.data.folders import SourceError, SourceFile, SourcePlan, plan_source, samples_per_shard_cap
from launcher.data.images import DEFAULT_MAX_PIXELS, DEFAULT_QUALITY, ImagePolicy
from launcher.progress import ProgressMeter
from launcher.shardify.encode import (
    BlockResult,
    BlockRunner,
    available_cores,
    estimate_sample_bytes,
    plan_blocks,
)
from launcher.shardify.verify import VerifyResult, verify
from launcher.shardify.writer import (
    OutputError,
    OutputStaging,
    ShardRecord,
    fsync_path,
    shard_name,
    shard_prefix,
)

__all__ = ["ShardifyOptions", "ShardifyResult", "ShardifyError", "SkippedFile", "VerifyResult", "shardify", "verify"]

EXIT_OK = 0  # every file was stored
EXIT_SKIPPED = 1  # output written, but some files were skipped (listed in report.json)
EXIT_USAGE = 2  # bad arguments, unusable source, output exists / is inside SRC / is locked
EXIT_STRICT = 3  # --strict and a file had to be skipped: nothing was published
EXIT_FAILED = 4  # nothing usable (a split lost every image) or an I/O error: nothing was published
EXIT_VERIFY_FAILED = 5  # `shardify verify` (or --verify) found a problem
EXIT_INTERRUPTED = 130  # Ctrl-C: nothing was published

EXIT_CODES_HELP = f"""exit codes:
  {EXIT_OK}    every image was stored
  {EXIT_SKIPPED}    output written, but some files were skipped (each listed with its reason in report.json)
  {EXIT_USAGE}    usage or configuration error (bad option, unusable SRC, output exists without
       --overwrite, output inside SRC, another run writing the same output)
  {EXIT_STRICT}    --strict and a file had to be skipped: nothing was published
  {EXIT_FAILED}    a split lost all its images, or writing failed: nothing was published
  {EXIT_VERIFY_FAILED}    verification found a problem (`shardify verify DIR`, or --verify)
  {EXIT_INTERRUPTED}  interrupted: nothing was published
An existing output is only replaced once the new one is complete."""

TOOL_NAME = "resnet-launcher shardify"


class ShardifyError(Exception):
    """A run that cannot finish; ``exit_code`` says which kind (see EXIT_CODES_HELP)."""

    exit_code = EXIT_FAILED


class ConfigError(ShardifyError):
    exit_code = EXIT_USAGE


class StrictFailure(ShardifyError):
    exit_code = EXIT_STRICT


@dataclass(frozen=True)
class ShardifyOptions:
    val_fraction: float = 0.1  # share of each class drawn for validation when SRC has no val/ folder
    seed: int = 0  # drives the train/validation split and the order of samples across shards
    shard_size_mb: float = 256.0  # a shard stops before passing this many MB (0: no size limit)
    shard_count: int = 0  # at most this many samples per shard (0: no count limit)
    min_shards: int = 8  # split into at least this many shards when there are enough images
    quality: int = DEFAULT_QUALITY  # JPEG quality for converted images
    max_side: int | None = None  # downscale images whose longer side is larger (None: keep size)
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images are rejected as decompression bombs
    workers: int = 0  # processes decoding images (0: all available cores)
    overwrite: bool = False
    strict: bool = False  # any skipped file fails the run (exit 3) before anything is published
    progress: bool = True  # a bar on a terminal, periodic lines in a log (launcher.progress)

    def policy(self) -> ImagePolicy:
        return ImagePolicy(quality=self.quality, max_side=self.max_side, max_pixels=self.max_pixels)

    def resolved_workers(self) -> int:
        return self.workers or available_cores()

    def validate(self) -> None:
        checks = [
            (0.0 <= self.val_fraction < 1.0, f"--val-fraction must be in [0, 1), got {self.val_fraction}"),
            (self.shard_size_mb >= 0, f"--shard-size must be >= 0 MB, got {self.shard_size_mb}"),
            (self.shard_count >= 0, f"--shard-count must be >= 0, got {self.shard_count}"),
            (self.min_shards >= 1, f"--min-shards must be >= 1, got {self.min_shards}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        try:
            self.policy()
        except ValueError as error:
            raise ConfigError(str(error)) from None


@dataclass(frozen=True)
class SkippedFile:
    path: str  # relative to SRC
    reason: str  # one of launcher.data.images.REASONS
    detail: str


@dataclass
class ShardifyResult:
    out_dir: Path
    classes: list[str]
    num_samples: dict[str, int]
    num_shards: dict[str, int]
    class_counts: dict[str, dict[str, int]]
    skipped: list[SkippedFile]
    kept_jpeg: int  # stored byte for byte
    converted: int  # re-encoded (other format, rotation, alpha, max-side, ...)
    bytes_written: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_SKIPPED if self.skipped else EXIT_OK

    @property
    def images_per_s(self) -> float:
        return (sum(self.num_samples.values()) + len(self.skipped)) / max(self.seconds, 1e-9)

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(item.reason for item in self.skipped).most_common())

    def summary(self) -> str:
        per_split = " + ".join(f"{n:,} {split}" for split, n in self.num_samples.items())
        shards = sum(self.num_shards.values())
        line = (f"shardify: {per_split} images of {len(self.classes)} classes -> {self.out_dir} "
                f"({shards} shards, {self.bytes_written / 1e6:,.1f} MB) in {self.seconds:.1f} s "
                f"({self.images_per_s:,.0f} img/s); {self.kept_jpeg:,} JPEGs stored as-is, "
                f"{self.converted:,} converted; ")
        if not self.skipped:
            return line + "nothing skipped"
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped_by_reason().items())
        return line + f"skipped {len(self.skipped):,} ({reasons}), see {self.out_dir / 'report.json'}"


def _check_paths(src: Path, out: Path) -> None:
    real_src, real_out = src.resolve(), out.resolve()
    if real_out == real_src or real_src in real_out.parents:
        raise ConfigError(f"output {out} is inside the source folder {src}; choose an --out outside it")
    if real_out in real_src.parents:
        raise ConfigError(f"source {src} is inside the output folder {out}; choose another --out")


def default_out(src: str | Path) -> Path:
    return Path("shards") / Path(src).resolve().name


def shardify(src: str | Path, out: str | Path | None = None, options: ShardifyOptions | None = None,
             **overrides: object) -> ShardifyResult:
    """Convert the class-folder tree ``src`` into shards in ``out`` (default ``shards/<basename of src>``).

    ``options`` fields can also be given as keyword arguments. Raises :class:`ShardifyError` (with an
    ``exit_code``) when nothing is published; skipped files do not raise (see ``result.skipped``).
    """
    start = time.perf_counter()
    options = replace(options or ShardifyOptions(), **overrides)  # type: ignore[arg-type]
    options.validate()
    src = Path(src)
    out = Path(out) if out is not None else default_out(src)
    if not src.is_dir():
        raise ConfigError(f"source folder not found: {src}")
    _check_paths(src, out)
    try:
        plan = plan_source(src, val_fraction=options.val_fraction, seed=options.seed)
    except SourceError as error:
        raise ConfigError(str(error)) from None
    skipped = [SkippedFile(_relative(p.path, src), p.reason, p.detail) for p in plan.problems]
    if options.strict and skipped:
        raise StrictFailure(f"--strict: {skipped[0].path}: {skipped[0].reason}: {skipped[0].detail}")
    try:
        with OutputStaging(out, overwrite=options.overwrite) as staging:
            result, shards = _write(plan, staging, options, skipped)
            result.seconds = time.perf_counter() - start
            staging.publish([record for records in shards.values() for record in records],
                            _extra_files(plan, result), _info(plan, result, shards, options))
    except OutputError as error:
        raise ConfigError(str(error)) from None
    except OSError as error:
        raise ShardifyError(f"writing {out} failed: {error}") from None
    result.seconds = time.perf_counter() - start
    return result


def _relative(path: str, src: Path) -> str:
    return Path(os.path.relpath(path, src)).as_posix()


def _samples_per_block(files: list[SourceFile], options: ShardifyOptions) -> int:
    """Samples per shard: the tightest of --shard-count, --min-shards and --shard-size (estimated from
    source file sizes; the byte limit is still enforced exactly while writing)."""
    limits = [options.shard_count, samples_per_shard_cap(len(files), options.min_shards)]
    if options.shard_size_mb and files:
        per_sample = estimate_sample_bytes([item.path for item in files], options.seed)
        limits.append(max(1, int(options.shard_size_mb * 1e6) // per_sample))
    limits = [n for n in limits if n]
    return min(limits) if limits else 0


def _write(plan: SourcePlan, staging: OutputStaging, options: ShardifyOptions, skipped: list[SkippedFile]
           ) -> tuple[ShardifyResult, dict[str, list[ShardRecord]]]:
    """Encode every planned file into shards (still under temporary names) with all workers."""
    prefix = shard_prefix(staging.out.name)
    tasks = [task for split, files in plan.splits.items()
             for task in plan_blocks(split, [(f.path, f.relpath, f.label) for f in files],
                                     samples_per_block=_samples_per_block(files, options), prefix=prefix,
                                     folder=str(staging.staging), classes=plan.classes,
                                     policy=options.policy(), max_bytes=int(options.shard_size_mb * 1e6),
                                     strict=options.strict)]
    results: dict[tuple[str, int], BlockResult] = {}
    with BlockRunner(min(options.resolved_workers(), len(tasks))) as runner:
        # Threads only now that the worker processes exist.
        syncer = ThreadPoolExecutor(1, thread_name_prefix="shard-fsync")
        syncs: list[Future[None]] = []
        bar = ProgressMeter(plan.num_files, "shardify", "img", enabled=options.progress)
        try:
            for block in runner.run(tasks, bar.update):
                results[(block.split, block.block)] = block
                # Flush finished shards to disk in the background while encoding goes on.
                syncs += [syncer.submit(fsync_path, staging.staging / shard.temp_name) for shard in block.shards]
                if block.skipped:
                    bar.set_postfix(skipped=sum(len(r.skipped) for r in results.values()))
                    if options.strict:
                        _, relpath, reason, detail = block.skipped[0]
                        raise StrictFailure(f"--strict: {relpath}: {reason}: {detail}")
            for sync in syncs:
                sync.result()  # re-raises a failed flush (disk full, I/O error)
            bar.close()
        finally:
            bar.close(completed=False)  # after an error: no "done" line
            syncer.shutdown(wait=True)

    # Everything is written: number the shards and gather the counts in plan order.
    shards: dict[str, list[ShardRecord]] = {split: [] for split in plan.splits}
    counts: dict[str, Counter[int]] = {split: Counter() for split in plan.splits}
    kept = 0
    for task in tasks:
        block = results[(task.split, task.block)]
        for record in block.shards:
            record.filename = shard_name(prefix, task.split, len(shards[task.split]))
            shards[task.split].append(record)
        counts[task.split].update(block.label_counts)
        kept += block.kept
        skipped += [SkippedFile(relpath, reason, detail) for _, relpath, reason, detail in block.skipped]
    num_samples = {split: sum(counts[split].values()) for split in plan.splits}
    empty = [split for split, n in num_samples.items() if n == 0]
    if empty:
        reasons = ", ".join(f"{n} {r}" for r, n in Counter(s.reason for s in skipped).most_common())
        raise ShardifyError(f"no usable image left in split {', '.join(empty)}: every file was skipped ({reasons})")
    result = ShardifyResult(
        out_dir=staging.out,
        classes=plan.classes,
        num_samples=num_samples,
        num_shards={split: len(records) for split, records in shards.items()},
        class_counts={split: {name: counts[split][label] for label, name in enumerate(plan.classes)}
                      for split in plan.splits},
        skipped=skipped,
        kept_jpeg=kept,
        converted=sum(num_samples.values()) - kept,
        bytes_written=sum(record.bytes for records in shards.values() for record in records),
        seconds=0.0,
        warnings=plan.warnings,
    )
    return result, shards


def _info(plan: SourcePlan, result: ShardifyResult, shards: dict[str, list[ShardRecord]],
          options: ShardifyOptions) -> dict[str, object]:
    """`_info.json`: timm's ReaderWds fields under "splits" (it ignores the rest) plus our own."""
    recorded_options = {key: value for key, value in asdict(options).items()
                        if key not in ("workers", "overwrite", "progress")}
    return {
        "splits": {split: {"name": split,
                           "num_samples": result.num_samples[split],
                           "filenames": [record.filename for record in records],
                           "shard_lengths": [record.samples for record in records],
                           "shard_bytes": [record.bytes for record in records]}
                   for split, records in shards.items()},
        "classes": plan.classes,
        "class_counts": result.class_counts,
        "options": {**recorded_options, "layout": plan.layout},
        "source": str(plan.root.resolve()),
        "tool": {"name": TOOL_NAME, "version": __version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _extra_files(plan: SourcePlan, result: ShardifyResult) -> dict[str, object]:
    report = {
        "source": str(plan.root.resolve()),
        "counts": {"files": plan.num_files + len(plan.problems), "stored": sum(result.num_samples.values()),
                   "kept_jpeg": result.kept_jpeg, "converted": result.converted, "skipped": len(result.skipped)},
        "skipped_by_reason": result.skipped_by_reason(),
        "skipped": [asdict(item) for item in result.skipped],
        "warnings": plan.warnings,
    }
    return {"classes.json": plan.classes, "report.json": report}

