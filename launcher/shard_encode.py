"""Encode images for shards in parallel: ordered results, bounded memory, identical for any worker count."""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.context
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import islice

from launcher.images import EncodedImage, ImagePolicy, ImageRejected, encode_for_shard, pil_pixel_limit

_CHUNK_MAX = 16  # images per task sent to a worker
_CHUNKS_IN_FLIGHT_PER_WORKER = 4  # bounds memory: at most workers * 4 * 16 encoded images exist at once

Encoded = EncodedImage | tuple[str, str]  # an image to store, or (reason, detail) of a rejection


def _ignore_sigint() -> None:
    # Ctrl-C is handled once, by the main process, which then shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encode_chunk(paths: list[str], policy: ImagePolicy) -> list[Encoded]:
    results: list[Encoded] = []
    with pil_pixel_limit(policy.max_pixels):
        for path in paths:
            try:
                results.append(encode_for_shard(path, policy))
            except ImageRejected as rejected:
                results.append((rejected.reason, rejected.detail))
    return results


def pool_context() -> multiprocessing.context.BaseContext:
    """fork where available: workers start in milliseconds with everything already imported and
    callers need no ``if __name__ == "__main__"`` guard (forkserver/spawn re-import the caller's main
    module in every worker). Like torch's DataLoader, which forks too; our workers only run PIL."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def encode_stream(paths: Iterable[str], total: int, policy: ImagePolicy, workers: int) -> Iterator[Encoded]:
    """Encoded images (or ``(reason, detail)``) in the order of ``paths``.

    With several workers, chunks are submitted to a process pool with a bounded number in flight and
    collected in submission order, so output is identical for any worker count. The pool is started
    right here (not at the first ``next``), so call this before starting threads such as a progress bar.
    """
    if workers == 1:
        return _encode_in_process(paths, policy)
    pool = ProcessPoolExecutor(workers, mp_context=pool_context(), initializer=_ignore_sigint)
    try:
        pool.submit(os.getpid).result()  # launches every worker now
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    return _encode_in_pool(pool, paths, total, policy, workers)


def _encode_in_process(paths: Iterable[str], policy: ImagePolicy) -> Iterator[Encoded]:
    with pil_pixel_limit(policy.max_pixels):
        for path in paths:
            try:
                yield encode_for_shard(path, policy)
            except ImageRejected as rejected:
                yield (rejected.reason, rejected.detail)


def _encode_in_pool(pool: ProcessPoolExecutor, paths: Iterable[str], total: int, policy: ImagePolicy,
                    workers: int) -> Iterator[Encoded]:
    chunk_size = max(1, min(_CHUNK_MAX, math.ceil(total / (workers * 8))))
    path_iter = iter(paths)
    pending: deque[Future[list[Encoded]]] = deque()
    try:
        while chunk := list(islice(path_iter, chunk_size)):
            if len(pending) >= workers * _CHUNKS_IN_FLIGHT_PER_WORKER:
                yield from pending.popleft().result()
            pending.append(pool.submit(_encode_chunk, chunk, policy))
        while pending:
            yield from pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
