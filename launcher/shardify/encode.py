"""Encode and write shards in parallel: each worker turns one block of the shuffled file list into
tar files by itself, so the main process only coordinates and N workers run N times as fast.

A block is a contiguous slice of a split's shuffled order, cut by sample count (from ``--shard-count``,
``--min-shards`` and an estimate of the stored size per sample). Its content depends only on the plan,
never on which worker wrote it or when, so the output is identical for any worker count. Memory is one
image per worker.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.context
import os
import random
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.data.images import EncodedImage, ImagePolicy, ImageRejected, encode_for_shard, pil_pixel_limit
from launcher.shardify.writer import ShardRecord, TarWriter

_PROGRESS_POLL_S = 0.2
_SIZE_SAMPLE = 256  # files stat'ed to estimate the stored size of a sample
_TAR_OVERHEAD = 5 * 512  # three member headers plus the padded .cls and .json


@dataclass(frozen=True)
class BlockTask:
    split: str
    block: int  # position of this block within its split
    first_index: int  # index of items[0] in the split's shuffled order (sample key = split_<index>)
    items: list[tuple[str, str, int]]  # (path, path relative to SRC, label)
    folder: str  # staging folder
    stem: str  # temporary file names: <stem>-NNN.tar.tmp
    classes: list[str]
    policy: ImagePolicy
    max_bytes: int
    strict: bool


@dataclass
class BlockResult:
    split: str
    block: int
    shards: list[ShardRecord]
    label_counts: Counter[int] = field(default_factory=Counter)
    kept: int = 0  # JPEGs stored byte for byte
    skipped: list[tuple[int, str, str, str]] = field(default_factory=list)  # (index, relpath, reason, detail)


def write_block(task: BlockTask, on_image: Callable[[], None] = lambda: None) -> BlockResult:
    """Encode every file of ``task`` in order and append it to the block's tar files.

    With ``task.strict`` the block stops at its first rejected file.
    """
    writer = TarWriter(Path(task.folder), task.stem, task.max_bytes)
    result = BlockResult(task.split, task.block, [])
    try:
        with pil_pixel_limit(task.policy.max_pixels):
            for offset, (path, relpath, label) in enumerate(task.items):
                index = task.first_index + offset
                try:
                    encoded = encode_for_shard(path, task.policy)
                except ImageRejected as rejected:
                    result.skipped.append((index, relpath, rejected.reason, rejected.detail))
                    on_image()
                    if task.strict:
                        break
                    continue
                writer.write(f"{task.split}_{index:08d}", _members(encoded, relpath, label, task.classes))
                result.label_counts[label] += 1
                result.kept += encoded.kept
                on_image()
        result.shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    return result


def _members(encoded: EncodedImage, relpath: str, label: int, classes: list[str]) -> dict[str, bytes]:
    meta = {"filename": relpath, "class": classes[label], "label": label,
            "width": encoded.width, "height": encoded.height}
    return {"jpg": encoded.data, "cls": str(label).encode("ascii"), "json": json.dumps(meta).encode("utf-8")}


def plan_blocks(split: str, items: list[tuple[str, str, int]], *, samples_per_block: int, prefix: str,
                folder: str, classes: list[str], policy: ImagePolicy, max_bytes: int, strict: bool
                ) -> list[BlockTask]:
    """Cut one split's ordered items into consecutive blocks of ``samples_per_block`` (0: one block)."""
    size = samples_per_block or max(1, len(items))
    return [BlockTask(split=split, block=block, first_index=start, items=items[start:start + size],
                      folder=folder, stem=f"{prefix}-{split}-block{block:06d}", classes=classes,
                      policy=policy, max_bytes=max_bytes, strict=strict)
            for block, start in enumerate(range(0, len(items), size))]


def estimate_sample_bytes(paths: list[str], seed: int) -> int:
    """Stored bytes per sample, estimated from the sizes of up to 256 seeded-random source files."""
    chosen = random.Random(f"{seed}:size").sample(paths, min(_SIZE_SAMPLE, len(paths)))
    sizes = []
    for path in chosen:
        try:
            sizes.append(os.stat(path).st_size)
        except OSError:
            continue
    mean = sum(sizes) / len(sizes) if sizes else 100_000
    return int(mean) + _TAR_OVERHEAD


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset / cgroup CPU sets where the OS reports them)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def pool_context() -> multiprocessing.context.BaseContext:
    """fork where available: workers start in milliseconds with everything already imported and
    callers need no ``if __name__ == "__main__"`` guard (forkserver/spawn re-import the caller's main
    module in every worker). Like torch's DataLoader, which forks too; our workers only run PIL."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


# Set in each worker process by its initializer: a counter shared with the main process.
_worker_progress: Any = None


def _init_worker(progress: Any) -> None:
    global _worker_progress
    _worker_progress = progress
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the main process


def _bump_progress() -> None:
    with _worker_progress.get_lock():
        _worker_progress.value += 1


def _write_block_in_worker(task: BlockTask) -> BlockResult:
    return write_block(task, _bump_progress)


class BlockRunner:
    """Runs blocks in-process (one worker) or in a process pool started at construction, i.e. before
    the caller starts threads such as a progress bar (forking a threaded process is fragile)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._progress: Any = None
        if workers > 1:
            context = pool_context()
            self._progress = context.Value("q", 0)
            self._pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                             initargs=(self._progress,))
            self._pool.submit(os.getpid).result()  # launches every worker now

    def __enter__(self) -> BlockRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def run(self, tasks: list[BlockTask], on_images: Callable[[int], None]) -> Iterator[BlockResult]:
        """Results as blocks finish (any order); ``on_images(n)`` reports n more files processed."""
        if self._pool is None:
            for task in tasks:
                yield write_block(task, lambda: on_images(1))
            return
        pending: set[Future[BlockResult]] = {self._pool.submit(_write_block_in_worker, t) for t in tasks}
        seen = 0
        try:
            while pending:
                done, pending = wait(pending, timeout=_PROGRESS_POLL_S, return_when=FIRST_COMPLETED)
                now = self._progress.value
                on_images(now - seen)
                seen = now
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()
