"""Find the images of a class-folder tree and plan the splits: what shardify reads, in what order.

Two layouts are understood:

* ``SRC/<class>/...``: one folder per class; a validation split is drawn from it (seeded, stratified).
* ``SRC/train/<class>/...`` and ``SRC/val/<class>/...`` (or ``validation``): the splits are given.

Classes are the sorted folder names (torchvision ImageFolder order). Hidden files and folders are
ignored; files nested deeper in a class folder belong to that class; symlinks are followed, but a
folder already visited for the same class (a symlink loop, or two links to one folder) is walked once.
Only paths are collected here (cheap even for millions of files); decoding happens later.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

TRAIN, VALIDATION = "train", "validation"
VALIDATION_FOLDER_NAMES = ("val", "validation")
IGNORED_SPLIT_FOLDERS = ("test",)


class SourceError(ValueError):
    """The source tree cannot be used as it is (the message names the folder and the problem)."""


@dataclass(frozen=True)
class SourceFile:
    path: str  # as walked below SRC (symlinks not resolved), so error messages show the user's path
    relpath: str  # relative to SRC, POSIX separators: what goes into each sample's .json "filename"
    label: int


@dataclass(frozen=True)
class WalkProblem:
    path: str
    reason: str
    detail: str


@dataclass
class SourcePlan:
    """The ordered work: ``splits[name]`` lists files in the order they are written (shuffled)."""

    root: Path
    layout: str  # "classes" (validation drawn by fraction) or "splits" (train/ and val/ given)
    classes: list[str]
    splits: dict[str, list[SourceFile]]
    problems: list[WalkProblem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_files(self) -> int:
        return sum(len(files) for files in self.splits.values())


def plan_source(root: str | Path, *, val_fraction: float, seed: int) -> SourcePlan:
    """Walk ``root``, assign labels, split and shuffle (all deterministic for a given seed)."""
    if not 0.0 <= val_fraction < 1.0:
        raise SourceError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"source folder not found or not a folder: {root}")
    warnings: list[str] = []
    problems: list[WalkProblem] = []
    split_roots = _split_folders(root, warnings)
    # Never re-enter SRC or a split folder from inside a class (e.g. a link "up -> .."): that would
    # file other classes' images under this one.
    roots = {_identity(folder) for folder in (root, *split_roots.values())}
    by_split: dict[str, dict[str, list[str]]] = {}
    for split, folder in split_roots.items():
        by_split[split] = _class_files(folder, roots, problems, warnings)
    classes = sorted({name for files in by_split.values() for name, paths in files.items() if paths})
    if not classes:
        where = ", ".join(str(folder) for folder in split_roots.values())
        raise SourceError(f"no class folders with files found in {where} (expected SRC/<class>/<image>)")
    for split, files in by_split.items():
        for name in sorted(files):
            if not files[name]:
                warnings.append(f"empty class folder skipped: {split_roots[split] / name}")
        missing = [name for name in classes if not files.get(name)]
        if len(split_roots) > 1 and missing:
            warnings.append(f"{split} has no images of class(es): {', '.join(missing)}")

    label_of = {name: index for index, name in enumerate(classes)}

    def source_files(paths_by_class: dict[str, list[str]]) -> dict[str, list[SourceFile]]:
        return {
            name: [SourceFile(path, Path(os.path.relpath(path, root)).as_posix(), label_of[name]) for path in paths]
            for name, paths in paths_by_class.items()
            if paths
        }

    if VALIDATION in by_split:
        layout = "splits"
        splits = {split: _flatten(source_files(files)) for split, files in by_split.items()}
    else:
        layout = "classes"
        train, validation = stratified_split(source_files(by_split[TRAIN]), val_fraction, seed)
        splits = {TRAIN: train}
        if val_fraction > 0:
            splits[VALIDATION] = validation
    if not splits[TRAIN]:
        raise SourceError(f"no training images found in {split_roots[TRAIN]}")
    if VALIDATION in splits and not splits[VALIDATION]:
        warnings.append("validation split would be empty (too few images per class); writing train only")
        del splits[VALIDATION]
    for split, files in splits.items():
        random.Random(f"{seed}:shuffle:{split}").shuffle(files)
    return SourcePlan(root, layout, classes, splits, problems, warnings)


def stratified_split(
    files_by_class: dict[str, list[SourceFile]], val_fraction: float, seed: int
) -> tuple[list[SourceFile], list[SourceFile]]:
    """Per class, ``round(n * val_fraction)`` files go to validation (at least 1 and at most n - 1
    when the class has 2+ files and the fraction is positive). Each class has its own seeded RNG, so
    adding a class does not reshuffle the others."""
    train: list[SourceFile] = []
    validation: list[SourceFile] = []
    for name in sorted(files_by_class):
        files = list(files_by_class[name])
        count = len(files)
        n_val = round(count * val_fraction)
        if val_fraction > 0 and count >= 2:
            n_val = min(max(n_val, 1), count - 1)
        elif count < 2:
            n_val = 0
        random.Random(f"{seed}:split:{name}").shuffle(files)
        validation += files[:n_val]
        train += files[n_val:]
    return train, validation


def samples_per_shard_cap(num_files: int, min_shards: int) -> int:
    """Largest shard (in samples) that still yields ``min_shards`` shards for ``num_files`` files."""
    if min_shards <= 1 or num_files <= 0:
        return 0  # no cap
    return max(1, math.ceil(num_files / min_shards))


def _flatten(files_by_class: dict[str, list[SourceFile]]) -> list[SourceFile]:
    return [item for name in sorted(files_by_class) for item in files_by_class[name]]


def _visible_dirs(folder: Path) -> list[str]:
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as error:
        raise SourceError(f"cannot list {folder}: {error.strerror or error}") from None
    return [entry.name for entry in entries if not entry.name.startswith(".") and _is_dir(entry)]


def _split_folders(root: Path, warnings: list[str]) -> dict[str, Path]:
    """{"train": folder} or {"train": ..., "validation": ...} depending on the layout of ``root``."""
    names = _visible_dirs(root)
    lowered = {name.lower(): name for name in names}
    val_names = [lowered[name] for name in VALIDATION_FOLDER_NAMES if name in lowered]
    known = {"train", *VALIDATION_FOLDER_NAMES, *IGNORED_SPLIT_FOLDERS}
    # The split layout only when every folder is a split folder: a dataset may well have a class
    # called "train" among others.
    if "train" in lowered and all(name.lower() in known for name in names):
        if len(val_names) > 1:
            raise SourceError(f"{root} has both {' and '.join(val_names)}; keep one validation folder")
        for name in names:
            if name.lower() in IGNORED_SPLIT_FOLDERS:
                warnings.append(f"ignored folder {root / name} (only train and val/validation are used)")
        folders = {TRAIN: root / lowered["train"]}
        if val_names:
            folders[VALIDATION] = root / val_names[0]
        return folders
    return {TRAIN: root}


def _identity(path: str | Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _class_files(folder: Path, roots: set[tuple[int, int]], problems: list[WalkProblem], warnings: list[str]
                 ) -> dict[str, list[str]]:
    """{class name: file paths below that class folder, in a deterministic order}."""
    loose = 0
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as error:
        raise SourceError(f"cannot list {folder}: {error.strerror or error}") from None
    files: dict[str, list[str]] = {}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if _is_dir(entry):
            files[entry.name] = walk_files(Path(entry.path), problems, warnings, skip=roots)
        else:
            loose += 1
    if loose:
        warnings.append(f"ignored {loose} file(s) directly in {folder} (images must be in class folders)")
    return files


def walk_files(top: Path, problems: list[WalkProblem], warnings: list[str],
               skip: Iterable[tuple[int, int]] = ()) -> list[str]:
    """Every non-hidden non-directory entry below ``top`` (depth first, sorted by name).

    Directories are identified by (device, inode) after following symlinks; one seen before in this
    walk (or listed in ``skip``) is not entered again, so symlink loops end. Entries that are neither
    files nor folders (dangling symlinks, FIFOs) are returned too: the decoder rejects them with a
    reason, so they show up in the report instead of vanishing.
    """
    files: list[str] = []
    visited: set[tuple[int, int]] = set(skip)
    stack = [str(top)]
    while stack:
        folder = stack.pop()
        try:
            info = os.stat(folder)
        except OSError as error:
            problems.append(WalkProblem(folder, "unreadable", f"cannot stat folder: {error.strerror}"))
            continue
        identity = (info.st_dev, info.st_ino)
        if identity in visited:
            warnings.append(f"not following {folder}: that folder was already walked (symlink loop or duplicate)")
            continue
        visited.add(identity)
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            problems.append(WalkProblem(folder, "unreadable", f"cannot list folder: {error.strerror}"))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if _is_dir(entry):
                subfolders.append(entry.path)
            else:
                files.append(entry.path)
        stack.extend(reversed(subfolders))
    return files


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False
