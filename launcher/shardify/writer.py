"""Write WebDataset tars safely: temporary names while writing, one atomic publish at the end.

A run builds everything in a hidden staging folder next to the output (same filesystem, so renames
are atomic): shards are ``*.tar.tmp`` until the whole dataset is written, then renamed to their
final names (numbered in order), then ``_info.json`` is written last, then the staging folder is
renamed to the output folder. An interrupted run therefore leaves the previous output (if any) untouched and nothing complete-looking.
A lock file keeps two runs from writing the same output at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
INFO_NAME = "_info.json"
OUTPUT_FILES = (INFO_NAME, "classes.json", "report.json")
_TAR_BLOCK = 512

# Output locks this process holds. A forked worker (encoding, verifying) inherits the descriptor, and an
# flock lives as long as any descriptor of it: after a SIGKILL of the main process, its workers, still
# exiting or orphaned, would keep the output locked. Children close their copies at once.
_HELD_LOCK_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCK_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class OutputError(ValueError):
    """The output folder cannot be written as asked (the message says why and what to do)."""


def shard_prefix(name: str) -> str:
    """A file-name-safe shard prefix: dots, spaces and slashes become underscores."""
    cleaned = re.sub(r"[^\w-]+", "_", name).strip("_")
    return cleaned or "dataset"


def shard_name(prefix: str, split: str, index: int) -> str:
    return f"{prefix}-{split}-{index:06d}.tar"


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header tarfile writes for a regular file (mode 644, owner root, mtime 0).

    Written by hand next to the data instead of through ``TarFile.addfile``, which copies every
    payload through extra buffers; the bytes are identical (tested against tarfile). Fixed metadata
    makes shards byte-reproducible for a given seed.
    """
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def tar_trailer(offset: int) -> bytes:
    """End-of-archive: two zero blocks, then zeros up to a whole 10 KiB record, as tarfile does."""
    end = offset + 2 * _TAR_BLOCK
    return bytes(2 * _TAR_BLOCK + (-end % tarfile.RECORDSIZE))


def _tar_member_size(size: int) -> int:
    return _TAR_BLOCK + (size + _TAR_BLOCK - 1) // _TAR_BLOCK * _TAR_BLOCK


@dataclass
class ShardRecord:
    temp_name: str  # file in the staging folder while the run goes on (ends in .tar.tmp)
    samples: int
    bytes: int
    filename: str = ""  # final name relative to the output folder, given in order once all is written


@dataclass
class TarWriter:
    """Appends samples to ``<stem>-NNN.tar.tmp`` files in ``folder``, starting a new file when the next
    sample would pass ``max_bytes`` or the file already holds ``max_samples`` (0 = no limit)."""

    folder: Path
    stem: str
    max_bytes: int = 0
    max_samples: int = 0
    shards: list[ShardRecord] = field(default_factory=list)
    _file: io.BufferedWriter | None = None
    _samples: int = 0
    _bytes: int = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """One sample: ``members`` maps extension ("jpg", "cls", "json") to bytes, written adjacent."""
        size = sum(_tar_member_size(len(data)) for data in members.values())
        if self._file is not None and (
            (self.max_samples and self._samples >= self.max_samples)
            or (self.max_bytes and self._bytes + size > self.max_bytes)
        ):
            self._finish_shard()
        if self._file is None:
            self._start_shard()
        assert self._file is not None
        for extension, data in members.items():
            self._file.write(tar_header(f"{key}.{extension}", len(data)))
            self._file.write(data)
            self._file.write(bytes(-len(data) % _TAR_BLOCK))
        self._samples += 1
        self._bytes += size

    def close(self) -> list[ShardRecord]:
        """Finish the last file; returns every file written (not yet fsynced: see :func:`fsync_path`)."""
        if self._file is not None:
            self._finish_shard()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None

    def _temp_name(self) -> str:
        return f"{self.stem}-{len(self.shards):03d}.tar{TMP_SUFFIX}"

    def _start_shard(self) -> None:
        # Stays open across write() calls; _finish_shard or abort closes it.
        self._file = open(self.folder / self._temp_name(), "wb")  # noqa: SIM115
        self._samples = self._bytes = 0

    def _finish_shard(self) -> None:
        assert self._file is not None
        self._file.write(tar_trailer(self._file.tell()))
        size = self._file.tell()
        self._file.close()
        self.shards.append(ShardRecord(self._temp_name(), self._samples, size))
        self._file = None


def fsync_path(path: Path) -> None:
    """Flush one written file, or a folder's entries, to disk (files: off the encoding path, on a thread)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` via a temporary file + fsync + rename: readers see all of it or nothing."""
    temporary = path.with_name(path.name + TMP_SUFFIX)
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def looks_like_shard_output(folder: Path, prefix_pattern: str = r".+") -> bool:
    """True if ``folder`` holds only what shardify writes (safe to replace with --overwrite)."""
    shard = re.compile(prefix_pattern + r"-[^-]+-\d{6}\.tar(\.tmp)?")
    for entry in os.scandir(folder):
        if entry.name in OUTPUT_FILES or shard.fullmatch(entry.name) or entry.name.endswith(TMP_SUFFIX):
            continue
        return False
    return True


class OutputStaging:
    """Owns the output location for one run: lock, staging folder, publish (see the module docstring).

    Use as a context manager; leaving it without :meth:`publish` removes the staging folder.
    """

    def __init__(self, out: Path, *, overwrite: bool) -> None:
        self.out = out
        self.overwrite = overwrite
        parent = out.parent
        self.staging = parent / f".{out.name}.shardify-partial"
        self.old = parent / f".{out.name}.shardify-old"
        self._lock_path = parent / f".{out.name}.shardify-lock"
        self._lock_fd: int | None = None
        self.published = False

    def __enter__(self) -> OutputStaging:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputError(f"cannot create output folder {self.out.parent}: {error.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise OutputError(f"another shardify run is writing {self.out} right now") from None
        _HELD_LOCK_FDS.add(self._lock_fd)
        try:
            self._recover_previous_run()
            self._check_existing_output()
            self.staging.mkdir()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.published:
            shutil.rmtree(self.staging, ignore_errors=True)
        self._unlock()

    def _recover_previous_run(self) -> None:
        # We hold the lock, so leftovers belong to a run that died: a partial build is garbage; an old
        # output moved aside but never replaced is the only complete copy and goes back in place.
        if self.staging.exists():
            shutil.rmtree(self.staging)
        if self.old.exists():
            if self.out.exists():
                shutil.rmtree(self.old)
            else:
                os.rename(self.old, self.out)

    def _check_existing_output(self) -> None:
        out = self.out
        if not out.exists() and not out.is_symlink():
            return
        if not out.is_dir() or out.is_symlink():
            raise OutputError(f"output {out} exists and is not a folder; choose another --out")
        if not any(os.scandir(out)):
            return
        if not self.overwrite:
            raise OutputError(f"output {out} already exists; pass --overwrite to replace it")
        if not looks_like_shard_output(out):
            raise OutputError(
                f"output {out} holds files shardify did not write; refusing to replace it even with "
                "--overwrite (remove it yourself or choose another --out)"
            )

    def publish(self, shards: list[ShardRecord], extra_files: dict[str, Any], info: dict[str, Any]) -> None:
        """Rename the shards to their final names, write ``extra_files`` then ``_info.json``, and move
        the finished folder into place (replacing an old output only now that the new one is complete)."""
        for record in shards:
            os.rename(self.staging / record.temp_name, self.staging / record.filename)
        for name, payload in extra_files.items():
            write_json_atomic(self.staging / name, payload)
        write_json_atomic(self.staging / INFO_NAME, info)
        fsync_path(self.staging)
        if self.out.exists():
            if any(os.scandir(self.out)):
                os.rename(self.out, self.old)
            else:
                self.out.rmdir()
        os.rename(self.staging, self.out)
        self.published = True
        fsync_path(self.out.parent)
        shutil.rmtree(self.old, ignore_errors=True)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            # The (empty, hidden) lock file stays: unlinking it would let two runs lock different inodes.
            _HELD_LOCK_FDS.discard(self._lock_fd)
            os.close(self._lock_fd)
            self._lock_fd = None
