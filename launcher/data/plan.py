"""Who reads which samples: the per-epoch plan that makes every rank yield the same number of batches.

Training (:class:`TrainPlan`)
    Each epoch the units (tars, or single images for a folder source) are permuted with
    ``(seed, epoch)`` only, so every rank computes the same permutation. Concatenated, they form one
    virtual stream of ``N`` samples. The epoch emits ``T = world_size * B * micro_batch`` samples with
    ``B = N // (world_size * micro_batch)`` batches per rank (drop-last, identical on every rank).
    Emitted positions ``[0, T)`` are cut into contiguous ranges, rank-major then worker
    (rank r, worker w owns the batches ``b`` of that rank with ``b % workers == w``, which is the
    order in which a DataLoader collects batches from its workers). Emitted position ``p`` reads
    sample ``p mod M`` of the virtual stream, ``M = ceil(T / repeats)``.

    * Shards fewer than ranks x workers, or of very different sizes, need nothing special: ranges
      cut through shards, so one shard may be read by several workers, each reading only its part.
      Cost: a local tar is seeked over (headers only); a streamed one (``pipe:``, http) is read from
      its start up to the range, so with very few large remote shards the I/O grows to at most
      (workers sharing a shard + 1) / 2 times its size. No sample is duplicated or lost by this.
    * The ``N - T`` (< world_size * micro_batch) samples at the end of the permuted stream are not
      used that epoch; they differ every epoch because the permutation does.
    * webdataset traps avoided by construction: no nodesplitter, no per-worker ``with_epoch``, and
      the shard order is re-drawn every epoch (``shardshuffle=N`` would repeat it).

Repeated augmentation (``repeats = R > 1``)
    The copies of distinct sample ``j`` sit at emitted positions ``j, j + M, j + 2M, ...``: ``T / R``
    apart, i.e. about ``world_size / R`` ranks apart, so with ``world_size >= R`` the copies land on
    different ranks, and otherwise on different workers or at least different batches of one rank.
    Each copy is read and decoded by its own worker and augmented with the seed of its own position.
    Guarantee: the epoch has ``T`` samples (one pass, like timm's RepeatAugSampler); when ``R``
    divides ``T`` each of the ``T / R`` distinct samples used appears exactly ``R`` times, otherwise
    the first ``T - (R - 1) M`` appear ``R`` times and the rest ``R - 1`` times. About ``1 / R`` of the
    data is read per epoch, a different part each epoch.

Spares
    A worker whose planned range delivers fewer samples than planned (truncated shard, missing
    members, counts that were only assumed for remote URLs) keeps reading a *spare* stream that starts
    in the part of the virtual stream this epoch does not use and wraps around. Its batch count never
    changes; the cost is a few duplicate samples in that epoch.

Evaluation (:func:`eval_segments`)
    With known counts, rank r reads samples ``[r N / world, (r+1) N / world)`` of the natural order
    (sizes differ by at most one), cut into batches (the last one partial) and dealt to workers in
    contiguous blocks: each validation sample exactly once across all ranks. With unknown counts
    (remote URLs with only a total), whole shards are dealt round-robin to the ranks x workers:
    still exactly once, but the ranks' loads may be uneven.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

_MASK64 = (1 << 64) - 1
T = TypeVar("T")


def mix_seed(*parts: int) -> int:
    """A 64-bit hash of integers (splitmix64 chain): the seed of one sample's augmentation."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part & _MASK64)) & _MASK64
        value = (value + 0x9E3779B97F4A7C15) & _MASK64
        z = value
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        value = z ^ (z >> 31)
    return value


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` of unit ``unit`` (``stop`` None: to its end); ``position`` of the first."""

    unit: int
    start: int
    stop: int | None
    position: int


def count_batches(total: int, workers: int, worker: int, start: int = 0) -> int:
    """How many of batches ``start <= b < total`` fall to ``worker`` (``b % workers == worker``)."""
    return len(range(worker, total, workers)) - len(range(worker, min(start, total), workers))


def _segments_for(order: np.ndarray, bounds: np.ndarray, lengths: np.ndarray, x: int, y: int, position: int):
    """Segments covering stream positions ``[x, y)`` (stream = units in ``order``, ``bounds`` = cumsum)."""
    k = int(np.searchsorted(bounds, x, side="right")) - 1
    while x < y and k < len(order):
        unit_start, unit_end = int(bounds[k]), int(bounds[k + 1])
        end = min(y, unit_end)
        if end > x:
            yield Segment(int(order[k]), x - unit_start, end - unit_start, position)
            position += end - x
            x = end
        k += 1


@dataclass(frozen=True)
class TrainPlan:
    lengths: np.ndarray
    seed: int
    epoch: int
    rank: int
    world_size: int
    workers: int
    micro_batch: int
    repeats: int = 1

    @property
    def num_samples(self) -> int:
        return int(self.lengths.sum())

    @property
    def batches_per_rank(self) -> int:
        return self.num_samples // (self.world_size * self.micro_batch)

    @property
    def emitted(self) -> int:
        return self.batches_per_rank * self.world_size * self.micro_batch

    @property
    def distinct(self) -> int:
        return max(1, math.ceil(self.emitted / max(1, self.repeats)))

    def unit_order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed & _MASK64, self.epoch, 0xDA7A])
        return rng.permutation(len(self.lengths))

    def _bounds(self, order: np.ndarray) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths[order])])

    def worker_range(self, worker: int) -> tuple[int, int]:
        """Emitted positions ``[a, b)`` of this rank's logical ``worker``."""
        per_rank = self.batches_per_rank * self.micro_batch
        before = sum(count_batches(self.batches_per_rank, self.workers, w) for w in range(worker))
        a = self.rank * per_rank + before * self.micro_batch
        return a, a + count_batches(self.batches_per_rank, self.workers, worker) * self.micro_batch

    def worker_segments(self, worker: int) -> list[Segment]:
        order = self.unit_order()
        bounds = self._bounds(order)
        a, b = self.worker_range(worker)
        segments: list[Segment] = []
        p = a
        while p < b:
            x = p % self.distinct
            end = min(b, p + self.distinct - x)
            segments.extend(_segments_for(order, bounds, self.lengths, x, x + end - p, p))
            p = end
        return segments

    def spare_segments(self, worker: int) -> Iterator[Segment]:
        """Endless spare stream for this worker, starting in the part of the stream unused this epoch."""
        order = self.unit_order()
        bounds = self._bounds(order)
        n = self.num_samples
        global_worker = self.rank * self.workers + worker
        unused = n - self.distinct
        x = (self.distinct + global_worker * max(1, unused // (self.world_size * self.workers))) % max(n, 1)
        position = -(1 + global_worker) << 40  # negative: never collides with a planned position
        while n > 0:
            for segment in _segments_for(order, bounds, self.lengths, x, n, position):
                yield segment
                position -= segment.stop - segment.start
            x = 0

    def shuffle_seed(self, worker: int) -> int:
        return mix_seed(self.seed, self.epoch, self.rank, self.world_size, worker, 0x5B0F)


def shuffle_buffer(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Classic streaming shuffle: keep ``size`` items, emit a random one as each new item arrives."""
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


def eval_plan(
    lengths: np.ndarray, lengths_known: bool, rank: int, world_size: int, workers: int, batch_size: int
) -> tuple[list[list[Segment]], int | None]:
    """Per logical worker, the segments it reads; and this rank's number of batches (None if unknown)."""
    if not lengths_known:
        global_workers = world_size * workers
        per_worker = [
            [Segment(unit, 0, None, 0) for unit in range(rank * workers + w, len(lengths), global_workers)]
            for w in range(workers)
        ]
        return per_worker, None
    n = int(lengths.sum())
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    num_batches = math.ceil((hi - lo) / batch_size)
    order = np.arange(len(lengths))
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    per_worker = []
    for w in range(workers):
        b0, b1 = w * num_batches // workers, (w + 1) * num_batches // workers
        x, y = lo + b0 * batch_size, min(lo + b1 * batch_size, hi)
        per_worker.append(list(_segments_for(order, bounds, lengths, x, y, x)) if y > x else [])
    return per_worker, num_batches
