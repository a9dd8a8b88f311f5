"""Which sample goes where: the per-epoch plan, a pure function of the data, the seed, the epoch, the
global batch and the repeat count, never of the world size, the accumulation steps or the workers.

The guarantee
    The sequence of *global* batches (which samples form global batch ``i``, in which slot ``q`` of it,
    and every random draw of each sample's augmentation) depends only on the split's sample counts,
    ``seed``, ``epoch``, the global batch ``G`` and ``aug_repeats``. A rank owns a contiguous block of
    slots and cuts it into micro-batches in slot order, so for a given micro-batch size 1 process x 2
    accumulation steps and 2 processes x 1 step see the very same micro-batches, pixel for pixel, and a
    run resumed on another shape continues with exactly the batches it would have seen.

The epoch stream
    Units (tars, or single images for a folder source) are permuted with ``(seed, epoch)`` and
    concatenated into a stream of ``N`` samples, which is then rotated by an offset drawn from
    ``(seed, epoch)`` in ``[0, N)``, so even a one-shard dataset starts elsewhere every epoch.

Epoch length
    ``U = ceil(N / G)`` updates (global batches): every sample is seen at least once per epoch. The
    ``U * G - N`` extra slots wrap around: epoch positions ``N .. U*G - 1`` read the rotated stream's
    positions ``0 .. U*G - N - 1`` a second time (like torch's ``DistributedSampler`` without
    ``drop_last``, and timm's webdataset reader, which pads each worker to whole batches).

Virtual readers (the stand-in for physical readers, like Mosaic Streaming's canonical nodes)
    ``C`` = the smallest divisor of ``G`` with ``G / C <= 256`` (1 for ``G <= 256``), ``V = G / C``.
    Slot ``q`` of every global batch belongs to reader ``v = q // C``. Reader ``v`` reads epoch
    positions ``[v U C, (v+1) U C)`` of the rotated stream sequentially (tars are streamed, never
    accessed per sample), passes them through its own shuffle buffer (``shuffle_buffer`` raw samples,
    a function of ``G`` only, seeded from ``(seed, epoch, v)``; none for a folder source, whose units are
    single images and already permuted) and sends its ``k``-th output to global batch ``k // C``, slot
    ``v C + k % C``. A global batch thus holds ``C`` samples from each of ``V`` strata of the stream.
    Sample ``q`` of batch ``i`` is augmented with seed ``mix_seed(seed, epoch, i, q)``, whoever decodes
    it. (A ``G`` with a large prime factor gives few readers, e.g. ``G = 257`` gives one: correct, but
    the epoch is then one stream through one shuffle buffer.)

Repeated augmentation (``R = aug_repeats > 1``, RSB A1/A2 use 3)
    Only the first ``S = ceil(V / R)`` readers are *sources* with their own range; reader ``v`` replays
    source ``v mod S`` (same range, same shuffle seed). The ``R`` copies of a sample therefore sit in the
    same global batch ``S C`` (about ``G / R``) slots apart, on different ranks when
    ``world_size >= R`` (like timm's ``RepeatAugSampler``), each with its own augmentation seed. About
    ``1 / R`` of the data is used per epoch (``S U C`` samples), a different part each epoch. Source ``s``
    has ``ceil((V - s) / S)`` copies: ``R`` when ``R`` divides ``V``; otherwise the last sources get
    fewer (``R - 1`` as long as ``V >= (R - 1)^2``; e.g. ``G = 2048, R = 3``: 84 sources x 3 + 2 x 2).

Spares
    A source whose range delivers fewer samples than planned (truncated, damaged or vanished shard,
    counts that were only assumed for remote URLs) continues from its spare stream: a full cycle of the
    rotated stream starting in the part this epoch does not use (with ``R = 1`` there is none: spread
    over the stream). Every reader still yields exactly ``U C`` outputs, so every rank keeps the same
    number of batches; the cost is a few duplicates in that epoch.

Physical layout (:func:`rank_slots`, :func:`worker_slots`)
    Rank ``r`` of ``w`` owns slots ``[r G / w, (r+1) G / w)``; its loader workers each own a contiguous
    sub-block of those slots. A worker reads every source overlapping its slots (a reader shared by two
    workers is read by both, each decoding only its own slots): with streamed remote shards that is
    extra network reading, never extra decoding. A reader whose range starts inside a local shard seeks
    straight to its first sample (each process learns the shards' sample offsets on its first pass over
    them); a streamed one (``pipe:``, http) is read from its start, which costs at most one shard's
    worth of extra reading per reader and epoch.

Evaluation (:func:`eval_plan`)
    With known counts, rank r reads samples ``[r N / world, (r+1) N / world)`` of the natural order
    (sizes differ by at most one), cut into batches (the last one partial) and dealt to workers in
    contiguous blocks: each validation sample exactly once across all ranks. With unknown counts
    (remote URLs with only a total), whole shards are dealt round-robin to the ranks x workers:
    still exactly once, but the ranks' loads may be uneven.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

_MASK64 = (1 << 64) - 1
MAX_READERS = 256  # virtual readers per global batch: strata of the stream, and concurrently open streams
SHUFFLE_RAWS = 2048  # raw samples in all shuffle buffers together, at least (they also hold >= 4 chunks each)


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


def chunk_size(global_batch: int) -> int:
    """``C``: the smallest divisor of the global batch that leaves at most :data:`MAX_READERS` readers."""
    return next(c for c in range(1, global_batch + 1) if global_batch % c == 0 and global_batch // c <= MAX_READERS)


def _segments_for(order: np.ndarray, bounds: np.ndarray, x: int, y: int, position: int) -> Iterator[Segment]:
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


@dataclass(frozen=True, eq=False)
class EpochPlan:
    """One epoch's reading plan; identical in every process of every shape (see the module docstring)."""

    lengths: np.ndarray
    seed: int
    epoch: int
    global_batch: int
    repeats: int = 1

    @cached_property
    def num_samples(self) -> int:
        return int(self.lengths.sum())

    @cached_property
    def updates(self) -> int:
        """``U``: global batches per epoch."""
        return math.ceil(self.num_samples / self.global_batch)

    @cached_property
    def chunk(self) -> int:
        return chunk_size(self.global_batch)

    @property
    def readers(self) -> int:
        return self.global_batch // self.chunk

    @property
    def sources(self) -> int:
        """Readers with a range of their own (all of them unless repeated augmentation)."""
        return math.ceil(self.readers / max(1, self.repeats))

    @property
    def reader_length(self) -> int:
        return self.updates * self.chunk

    @property
    def shuffle_buffer(self) -> int:
        return max(4 * self.chunk, math.ceil(SHUFFLE_RAWS / self.readers))

    def source_of(self, reader: int) -> int:
        return reader % self.sources

    def copies(self, source: int) -> int:
        return len(range(source, self.readers, self.sources))

    @cached_property
    def _layout(self) -> tuple[np.ndarray, np.ndarray, int]:
        rng = np.random.default_rng([self.seed & _MASK64, self.epoch, 0xDA7A])
        order = rng.permutation(len(self.lengths))
        bounds = np.concatenate([[0], np.cumsum(self.lengths[order])])
        return order, bounds, int(rng.integers(self.num_samples)) if self.num_samples else 0

    def unit_order(self) -> np.ndarray:
        return self._layout[0]

    @property
    def offset(self) -> int:
        """Where epoch position 0 lies in the permuted stream."""
        return self._layout[2]

    def _ring(self, x: int, count: int, position: int) -> list[Segment]:
        """Segments of ``count`` consecutive positions of the rotated stream from epoch position ``x``."""
        order, bounds, offset = self._layout
        n = self.num_samples
        segments: list[Segment] = []
        p = (offset + x) % n
        while count > 0:
            take = min(count, n - p)
            segments.extend(_segments_for(order, bounds, p, p + take, position))
            position, count, p = position + take, count - take, 0
        return segments

    def source_segments(self, source: int) -> list[Segment]:
        """What source ``source`` reads, in order: epoch positions ``[s U C, (s+1) U C)``."""
        start = source * self.reader_length
        return self._ring(start, self.reader_length, start)

    def spare_segments(self, source: int) -> list[Segment]:
        """One full cycle of the stream for a source that ran short, starting where this epoch reads least."""
        used = self.sources * self.reader_length
        unused = self.num_samples - used
        step = unused // self.sources if unused >= self.sources else self.num_samples // self.sources
        return self._ring(used + source * step, self.num_samples, -(1 + source) << 40)  # < 0: marks a spare

    def shuffle_seed(self, source: int) -> int:
        return mix_seed(self.seed, self.epoch, source, 0x5B0F)

    def sample_seed(self, batch: int, slot: int) -> int:
        return mix_seed(self.seed, self.epoch, batch, slot)


def rank_slots(rank: int, world_size: int, global_batch: int) -> range:
    per_rank = global_batch // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def worker_slots(slots: range, workers: int) -> list[range]:
    """Contiguous sub-blocks of ``slots`` (sizes differ by at most one), in worker order = slot order."""
    n = len(slots)
    return [range(slots.start + w * n // workers, slots.start + (w + 1) * n // workers) for w in range(workers)]


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
        per_worker.append(list(_segments_for(order, bounds, x, y, x)) if y > x else [])
    return per_worker, num_batches
