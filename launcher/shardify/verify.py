"""`shardify verify DIR`: re-read every shard of a shardify output and check it against `_info.json`.

Checks, per shard: the file exists with the recorded size, it is a complete tar, its samples are
``<key>.jpg`` + ``<key>.cls`` + ``<key>.json`` adjacent, labels are in range and agree with the JSON,
every JPEG decodes fully to 8-bit RGB of the recorded size. Per split: shard lengths, sample counts
and per-class counts match `_info.json`, keys are unique. Shards are checked in parallel.
"""

from __future__ import annotations

import json
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.data.images import ImageRejected, decode_bytes
from launcher.progress import ProgressMeter
from launcher.shardify.encode import available_cores, pool_context
from launcher.shardify.writer import INFO_NAME

MAX_ERRORS_PER_SHARD = 20
REQUIRED_MEMBERS = ("jpg", "cls", "json")


@dataclass
class ShardCheck:
    split: str
    filename: str
    samples: int = 0
    label_counts: Counter[int] = field(default_factory=Counter)
    keys: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0

    def error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_PER_SHARD:
            self.errors.append(f"{self.filename}: {message}")


@dataclass
class VerifyResult:
    """Outcome of :func:`verify`; ``ok`` is False when any problem was found."""

    out_dir: Path
    classes: list[str]
    num_samples: dict[str, int]  # samples found per split
    class_counts: dict[str, dict[str, int]]  # found, per split then class
    shards_checked: int
    problems: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        """Per-class sample counts as a fixed-width text table."""
        splits = list(self.class_counts)
        width = max([len("class"), len("total")] + [len(name) for name in self.classes])
        header = f"{'class':<{width}}" + "".join(f" {split:>10}" for split in splits)
        lines = [header, "-" * len(header)]
        for name in self.classes:
            lines.append(f"{name:<{width}}" + "".join(f" {self.class_counts[s].get(name, 0):>10}" for s in splits))
        lines.append(f"{'total':<{width}}" + "".join(f" {self.num_samples.get(s, 0):>10}" for s in splits))
        return "\n".join(lines)


def check_shard(path: Path, split: str, num_classes: int, expected_bytes: int | None) -> ShardCheck:
    """Read one tar from start to end and check every sample in it (runs in a worker process)."""
    check = ShardCheck(split, path.name)
    try:
        size = path.stat().st_size
    except OSError as error:
        check.error(f"missing or unreadable: {error.strerror}")
        return check
    if expected_bytes is not None and size != expected_bytes:
        check.error(f"size {size:,} bytes, _info.json records {expected_bytes:,} (truncated or replaced?)")
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    check.error(f"unexpected tar entry {member.name!r}")
                    continue
                base, _, extension = member.name.rpartition("/")[2].partition(".")
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is cut short")
                if base != key:
                    if key is not None:
                        _check_sample(check, key, members, num_classes)
                    key, members = base, {}
                if extension in members:
                    check.error(f"sample {base}: duplicate member .{extension} (members not adjacent?)")
                members[extension] = data
    except (tarfile.TarError, EOFError, OSError) as error:
        check.error(f"truncated or corrupt tar: {error}")
        return check
    if key is not None:
        _check_sample(check, key, members, num_classes)
    return check


def _check_sample(check: ShardCheck, key: str, members: dict[str, bytes], num_classes: int) -> None:
    check.samples += 1
    check.keys.append(key)
    missing = [ext for ext in REQUIRED_MEMBERS if ext not in members]
    if missing:
        check.error(f"sample {key}: missing .{', .'.join(missing)}")
        return
    try:
        label = int(members["cls"].decode("ascii"))
        meta = json.loads(members["json"])
    except (UnicodeDecodeError, ValueError) as error:
        check.error(f"sample {key}: unreadable .cls/.json ({error})")
        return
    if not 0 <= label < num_classes:
        check.error(f"sample {key}: label {label} outside 0..{num_classes - 1}")
        return
    check.label_counts[label] += 1
    if meta.get("label") != label:
        check.error(f"sample {key}: .json label {meta.get('label')} differs from .cls {label}")
    try:
        image = decode_bytes(members["jpg"], max_pixels=None)
    except ImageRejected as error:
        check.error(f"sample {key}: image {error}")
        return
    if image.format not in ("JPEG", "MPO") or image.mode != "RGB":
        check.error(f"sample {key}: stored image is {image.format} {image.mode}, expected 8-bit RGB JPEG")
    if (meta.get("width"), meta.get("height")) != image.size:
        check.error(f"sample {key}: image is {image.size}, .json says {meta.get('width')}x{meta.get('height')}")


def _check_shard_task(args: tuple[Path, str, int, int | None]) -> ShardCheck:
    return check_shard(*args)


def verify(out_dir: str | Path, *, workers: int | None = None, progress: bool = True) -> VerifyResult:
    """Re-read and check a whole shardify output folder; see the module docstring for what is checked.

    Raises ``FileNotFoundError``/``ValueError`` if ``_info.json`` is missing or unreadable; everything
    else found wrong is listed in the result's ``problems``.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    info_path = out_dir / INFO_NAME
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} not found: not a (complete) shardify output")
    try:
        info: dict[str, Any] = json.loads(info_path.read_text(encoding="utf-8"))
        classes: list[str] = list(info["classes"])
        splits: dict[str, dict[str, Any]] = dict(info["splits"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{info_path} is not a shardify _info.json: {error}") from None
    problems: list[str] = []
    classes_file = out_dir / "classes.json"
    try:
        if json.loads(classes_file.read_text(encoding="utf-8")) != classes:
            problems.append(f"{classes_file.name} differs from the classes in {INFO_NAME}")
    except (OSError, ValueError) as error:
        problems.append(f"{classes_file.name}: {error}")
    tasks = []
    for split, entry in splits.items():
        filenames, lengths = entry.get("filenames", []), entry.get("shard_lengths", [])
        sizes = entry.get("shard_bytes") or [None] * len(filenames)
        if len(filenames) != len(lengths) or sum(lengths) != entry.get("num_samples"):
            problems.append(f"{INFO_NAME}: split {split} has inconsistent filenames/shard_lengths/num_samples")
        tasks += [(out_dir / name, split, len(classes), size) for name, size in zip(filenames, sizes)]
    workers = max(1, min(workers or available_cores(), len(tasks) or 1))
    checks: list[ShardCheck] = []
    with ProgressMeter(len(tasks), "verify", "shard", enabled=progress) as bar:
        if workers == 1:
            for task in tasks:
                checks.append(_check_shard_task(task))
                bar.update(1)
        else:
            with ProcessPoolExecutor(workers, mp_context=pool_context()) as pool:
                for check in pool.map(_check_shard_task, tasks):
                    checks.append(check)
                    bar.update(1)

    found_counts: dict[str, Counter[int]] = {split: Counter() for split in splits}
    found_samples = dict.fromkeys(splits, 0)
    keys_seen: dict[str, set[str]] = {split: set() for split in splits}
    expected_lengths = {(split, name): n for split, e in splits.items()
                        for name, n in zip(e.get("filenames", []), e.get("shard_lengths", []))}
    for check in checks:
        problems += check.errors
        if check.error_count > len(check.errors):
            problems.append(f"{check.filename}: ... and {check.error_count - len(check.errors)} more problems")
        expected = expected_lengths.get((check.split, check.filename))
        if expected is not None and check.samples != expected:
            problems.append(f"{check.filename}: {check.samples} samples, {INFO_NAME} records {expected}")
        found_counts[check.split].update(check.label_counts)
        found_samples[check.split] += check.samples
        duplicates = keys_seen[check.split].intersection(check.keys)
        if duplicates:
            problems.append(f"{check.filename}: keys also in another shard: {sorted(duplicates)[:5]}")
        keys_seen[check.split].update(check.keys)
    class_counts = {split: {classes[i]: found_counts[split].get(i, 0) for i in range(len(classes))}
                    for split in splits}
    recorded = info.get("class_counts", {})
    for split in splits:
        if split in recorded and recorded[split] != class_counts[split]:
            diff = [name for name in classes if recorded[split].get(name, 0) != class_counts[split][name]]
            problems.append(f"split {split}: per-class counts differ from {INFO_NAME} for {', '.join(diff[:10])}")
    return VerifyResult(out_dir, classes, found_samples, class_counts, len(checks), problems,
                        time.perf_counter() - start)
