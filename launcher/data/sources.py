"""Where samples come from: a shardify folder, an explicit list / brace pattern of tar URLs, or a
plain class-folder tree; and how the raw (still encoded) samples of one unit are read.

A split is a list of *units* with known (or assumed) sample counts. For shards a unit is one tar; for a
class-folder tree a unit is one image file (so the per-epoch unit permutation is a full sample-level
shuffle). Readers yield :class:`RawSample` (encoded bytes + label) and never decode: decoding happens
after the shuffle buffer, so skipping samples to resume mid-epoch costs I/O only.

Read errors never raise inside an epoch: a damaged or truncated tar ends that unit early and a
:class:`ReadEvent` naming the shard is recorded; the caller decides how to make up for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tarfile
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_COUNT_SUFFIX = re.compile(r"^(?P<urls>.*)\|\s*(?P<count>\d+)\s*$")
_VALIDATION_ALIASES = ("validation", "val")


class DataSourceError(ValueError):
    """A dataset spec that cannot be used; the message names the file, folder or setting."""


@dataclass(frozen=True)
class RawSample:
    data: bytes  # encoded image
    label: int
    key: str  # the sample's filename (shards: from .json, else the tar key; folder: relative path)
    source: str  # tar URL or image path, for warnings
    position: int  # position in this epoch's stream (drives the augmentation seed)


@dataclass(frozen=True)
class ReadEvent:
    source: str
    reason: str


@dataclass
class Split:
    """One split: ``units`` (tar URLs or image paths) with per-unit sample counts."""

    name: str
    units: list[str]
    lengths: np.ndarray  # samples per unit (int64); assumed equal when ``lengths_known`` is False
    lengths_known: bool
    labels: list[int] | None = None  # folder splits: the label of each file
    relpaths: list[str] | None = None  # folder splits: names relative to the root
    # local tars: byte offset of each sample's first header, learned while reading (see read_tar_samples)
    sample_offsets: dict[str, array] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_samples(self) -> int:
        return int(self.lengths.sum())

    @property
    def is_folder(self) -> bool:
        return self.labels is not None


@dataclass
class Dataset:
    """What :func:`open_dataset` returns: classes plus splits, independent of the storage kind."""

    kind: str  # "shards" | "urls" | "folder"
    spec: str
    classes: list[str]
    splits: dict[str, Split] = field(default_factory=dict)
    stored_class_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _resolve(self, split: str) -> str | None:
        if split in self.splits:
            return split
        if split in _VALIDATION_ALIASES:
            return next((name for name in _VALIDATION_ALIASES if name in self.splits), None)
        return None

    def has_split(self, split: str) -> bool:
        return self._resolve(split) is not None

    def split(self, split: str) -> Split:
        name = self._resolve(split)
        if name is None:
            raise DataSourceError(f"split {split!r} not found in {self.spec} (has: {', '.join(self.splits) or 'none'})")
        return self.splits[name]

    def num_samples(self, split: str) -> int:
        return self.split(split).num_samples

    def class_counts(self, split: str) -> dict[str, int]:
        """Samples per class name in ``split`` (from _info.json for shards, by counting for folders)."""
        source = self.split(split)
        if source.labels is not None:
            counts = np.bincount(np.asarray(source.labels, dtype=np.int64), minlength=self.num_classes)
            return {name: int(n) for name, n in zip(self.classes, counts)}
        stored = self.stored_class_counts.get(source.name)
        if stored is None:
            raise DataSourceError(f"{self.spec} records no per-class counts for split {split!r}")
        return {name: int(stored.get(name, 0)) for name in self.classes}

    def __repr__(self) -> str:
        counts = ", ".join(f"{name}={s.num_samples}" for name, s in self.splits.items())
        return f"Dataset(kind={self.kind!r}, spec={self.spec!r}, classes={self.num_classes}, {counts})"


def open_dataset(
    spec: str | Sequence[str],
    *,
    train_split: str = "train",
    val_split: str = "validation",
    classes: list[str] | int | None = None,
) -> Dataset:
    """Open a shardify folder, a tar URL list / brace pattern (``|N`` = sample count), or a class-folder tree.

    ``classes`` is only needed for remote URLs whose folder has no ``_info.json`` / ``classes.json``
    (a list of names, or the number of classes).
    """
    if not isinstance(spec, str):
        return _open_urls(list(spec), None, ",".join(spec), train_split, classes)
    path = Path(spec)
    if path.is_dir():
        if (path / "_info.json").is_file():
            return _open_shard_folder(path, train_split, val_split)
        if any(path.glob("*.tar")):
            raise DataSourceError(
                f"{path} has tar files but no _info.json: shardify did not finish there (re-run it), "
                f"or pass the shards as a pattern like '{path}/NAME-train-{{000000..000009}}.tar|COUNT'"
            )
        return _open_folder(path, val_split)
    match = _COUNT_SUFFIX.match(spec)
    urls_text, count = (match["urls"], int(match["count"])) if match else (spec, None)
    from webdataset.shardlists import expand_urls

    return _open_urls(expand_urls(urls_text.strip()), count, spec, train_split, classes)


# ---------------------------------------------------------------------------------------------- shards
def _open_shard_folder(root: Path, train_split: str, val_split: str) -> Dataset:
    info_path = root / "_info.json"
    try:
        info = json.loads(info_path.read_text())
        raw_splits = info["splits"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataSourceError(f"cannot read {info_path}: {error}") from None
    classes = info.get("classes")
    if classes is None and (root / "classes.json").is_file():
        classes = json.loads((root / "classes.json").read_text())
    if not classes:
        raise DataSourceError(f"{info_path} lists no classes and {root / 'classes.json'} is missing")
    dataset = Dataset("shards", str(root), list(classes))
    if isinstance(info.get("class_counts"), dict):
        dataset.stored_class_counts = info["class_counts"]
    for name, entry in raw_splits.items():
        try:
            filenames, lengths = entry["filenames"], entry["shard_lengths"]
        except (KeyError, TypeError):
            raise DataSourceError(f"{info_path}: split {name!r} lacks filenames/shard_lengths") from None
        if len(filenames) != len(lengths):
            raise DataSourceError(f"{info_path}: split {name!r} has {len(filenames)} files but {len(lengths)} lengths")
        units = [str(root / filename) for filename in filenames]
        for unit in units:
            check_local_shard(unit)
        dataset.splits[name] = Split(name, units, np.asarray(lengths, dtype=np.int64), True)
    if not dataset.splits:
        raise DataSourceError(f"{info_path} lists no splits")
    if not dataset.has_split(train_split) and not dataset.has_split(val_split):
        raise DataSourceError(f"{info_path} has neither {train_split!r} nor {val_split!r}")
    return dataset


def check_local_shard(path: str) -> None:
    """Fail now, naming the file, if a local shard is missing, unreadable or not a tar."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(512)
    except OSError as error:
        raise DataSourceError(f"shard {path} cannot be read: {error.strerror or error}") from None
    if len(header) < 512 or header[257:262] != b"ustar":
        raise DataSourceError(f"shard {path} is not a tar file (empty or damaged header)")


def is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def _open_urls(
    urls: list[str], count: int | None, spec: str, train_split: str, classes: list[str] | int | None
) -> Dataset:
    if not urls:
        raise DataSourceError(f"no shards in {spec!r}")
    local = [is_local(url) for url in urls]
    if any(local) and not all(local):
        raise DataSourceError(f"{spec!r} mixes local files and remote URLs")
    folder_info = _sibling_info(urls) if all(local) else {}
    if all(local):
        for url in urls:
            if not Path(local_path(url)).exists():
                raise DataSourceError(f"shard not found: {url} (from {spec!r})")
            check_local_shard(local_path(url))
    lengths, labels_seen = _lengths_from_info(urls, folder_info), set()
    if lengths is None and all(local):
        counted = [count_tar_samples(local_path(url)) for url in urls]
        lengths = np.asarray([n for n, _ in counted], dtype=np.int64)
        labels_seen = set().union(*(found for _, found in counted))
    if lengths is not None:
        known = True
        if count is not None and count != int(lengths.sum()):
            raise DataSourceError(f"{spec!r}: the shards hold {int(lengths.sum())} samples, the pattern says {count}")
    elif count is None:
        raise DataSourceError(f"remote shards need their sample count: write the pattern as '{spec}|N'")
    else:
        known = False
        lengths = np.asarray([len(part) for part in np.array_split(np.arange(count), len(urls))], dtype=np.int64)
    names = _class_names(classes, folder_info, labels_seen, spec)
    dataset = Dataset("urls", spec, names)
    dataset.splits[train_split] = Split(train_split, list(urls), lengths, known)
    return dataset


def _sibling_info(urls: list[str]) -> dict:
    folder = Path(local_path(urls[0])).parent
    info: dict = {}
    if (folder / "_info.json").is_file():
        try:
            info = json.loads((folder / "_info.json").read_text())
        except ValueError:
            info = {}
    if "classes" not in info and (folder / "classes.json").is_file():
        info["classes"] = json.loads((folder / "classes.json").read_text())
    return info


def _lengths_from_info(urls: list[str], info: dict) -> np.ndarray | None:
    by_name: dict[str, int] = {}
    for entry in info.get("splits", {}).values():
        by_name.update(zip(entry.get("filenames", []), entry.get("shard_lengths", [])))
    names = [Path(local_path(url)).name for url in urls]
    if by_name and all(name in by_name for name in names):
        return np.asarray([by_name[name] for name in names], dtype=np.int64)
    return None


def _class_names(classes: list[str] | int | None, info: dict, labels: set[int], spec: str) -> list[str]:
    if isinstance(classes, int):
        return [str(index) for index in range(classes)]
    if classes is not None:
        return list(classes)
    if info.get("classes"):
        return list(info["classes"])
    if labels:
        return [str(index) for index in range(max(labels) + 1)]
    raise DataSourceError(f"cannot tell the classes of {spec!r}: pass classes=[...] or the number of classes")


def count_tar_samples(path: str) -> tuple[int, set[int]]:
    """Samples in a local tar (consecutive members sharing a key) and the labels of their .cls members."""
    samples, labels, last_key = 0, set(), None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if key != last_key:
                    samples, last_key = samples + 1, key
                if ext == "cls":
                    handle = tar.extractfile(member)
                    if handle is not None:
                        labels.add(int(handle.read().strip() or -1))
    except (tarfile.TarError, OSError, ValueError) as error:
        raise DataSourceError(f"shard {path} cannot be read: {error}") from None
    return samples, labels


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's grouping rule: key = path up to the first dot of the basename, ext = the rest."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def read_tar_samples(
    url: str, start: int, stop: int | None, first_position: int, events: list[ReadEvent],
    offsets: array | None = None,
) -> Iterator[RawSample]:
    """Samples ``start <= i < stop`` of one tar in file order (``stop`` None = to the end).

    ``offsets`` (local files): the byte offset of sample ``i``'s first header at index ``i``, for a prefix
    of the tar's samples; this read seeks straight to the nearest known sample at or before ``start`` and
    extends the prefix as it goes. Many readers start inside the same shard at every epoch, and a tar
    has no index: without it each would parse every header before its start (for 128 readers over a few
    thousand samples, most of an epoch's first batch). A read error or a shard shorter than ``stop``
    records a :class:`ReadEvent` and ends the iteration early.
    """
    local = is_local(url)
    known = offsets if local and offsets is not None else None
    resume_at = min(start, len(known) - 1) if known else -1  # the sample read first: seek to its header
    yielded = 0
    index = resume_at - 1 if resume_at >= 0 else -1
    key: str | None = None
    parts: dict[str, bytes] = {}

    def finish() -> RawSample | None:
        image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
        if image is None or "cls" not in parts:
            events.append(ReadEvent(url, f"sample {key} lacks an image or .cls member"))
            return None
        try:
            label = int(parts["cls"].strip())
        except ValueError:
            events.append(ReadEvent(url, f"sample {key} has a bad .cls {parts['cls'][:20]!r}"))
            return None
        name = key or ""
        if "json" in parts:
            with contextlib.suppress(ValueError, AttributeError):
                name = json.loads(parts["json"]).get("filename", name)
        return RawSample(image, label, name, url, first_position + yielded)

    try:
        with _open_stream(url) as stream:
            if resume_at > 0:
                stream.seek(known[resume_at])
            with tarfile.open(fileobj=stream, mode="r:" if local else "r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    member_key, ext = split_member_name(member.name)
                    if member_key != key:
                        if key is not None and index >= start and (sample := finish()) is not None:
                            yield sample
                            yielded += 1
                        index, key, parts = index + 1, member_key, {}
                        if known is not None and index == len(known):
                            known.append(member.offset)
                        if stop is not None and index >= stop:
                            return
                    if index >= start:
                        handle = tar.extractfile(member)
                        parts[ext] = handle.read() if handle is not None else b""
        if key is not None and index >= start and (sample := finish()) is not None:
            yield sample
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        events.append(ReadEvent(url, f"damaged or truncated shard after {max(index, 0)} samples: {error}"))
        return
    if stop is not None and index + 1 < stop:
        events.append(ReadEvent(url, f"shard ended after {index + 1} samples, expected {stop} (truncated?)"))


def _open_stream(url: str):
    if is_local(url):
        return open(local_path(url), "rb")  # noqa: SIM115 - closed by the caller's with-block
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def read_file_sample(path: str, label: int, key: str, position: int, events: list[ReadEvent]) -> RawSample | None:
    try:
        with open(path, "rb") as handle:
            return RawSample(handle.read(), label, key, path, position)
    except OSError as error:
        events.append(ReadEvent(path, f"cannot read image: {error.strerror or error}"))
        return None


# ---------------------------------------------------------------------------------------------- folder
def _open_folder(root: Path, val_split: str) -> Dataset:
    from launcher.data.folders import SourceError, plan_source

    try:
        plan = plan_source(root, val_fraction=0.0, seed=0)
    except SourceError as error:
        raise DataSourceError(str(error)) from None
    dataset = Dataset("folder", str(root), list(plan.classes))
    for name, files in plan.splits.items():
        files = sorted(files, key=lambda f: f.relpath)  # listing order, independent of shardify's shuffle
        split_name = val_split if name == "validation" else name
        dataset.splits[split_name] = Split(
            split_name,
            [f.path for f in files],
            np.ones(len(files), dtype=np.int64),
            True,
            labels=[f.label for f in files],
            relpaths=[f.relpath for f in files],
        )
    return dataset
