"""Train and eval loaders: DataLoader workers that read their planned samples and emit whole uint8 batches.

Training (:class:`TrainLoader`)
    Rank ``r`` owns a contiguous block of ``G / world`` slots of every global batch
    (:mod:`launcher.data.plan`); its ``W`` workers each own a contiguous sub-block. Per global batch,
    each worker sends ONE item: its slots' images (uint8 ``[n, 3, S, S]``, built in shared memory),
    labels and read events. The DataLoader collects the workers round-robin, i.e. in slot order, so the
    main process takes ``W`` items, puts the rank's slice together and yields it as
    ``accumulation = G / (world * micro_batch)`` micro-batches of ``micro_batch`` samples in slot order.
    The batches are therefore the same for any world size, accumulation and worker count (tested
    bitwise). ``W = 0`` decodes in the main process (global RNG state preserved).

    Buffers: without ``pin_memory`` a micro-batch is a view of one worker's shared-memory batch when it
    lies inside one, else a fresh tensor. With ``pin_memory`` the slice is copied into a ring of three
    pinned buffers: a yielded micro-batch tensor stays valid until two further global batches have
    been yielded (copy it to the device before that; the engine does so at once).

    ``set_start(u)`` resumes at global batch ``u``: every reader reads past its first ``u C`` outputs
    without decoding them, so resuming is exact on any shape.

Corrupt data: an undecodable sample is replaced deterministically (see :mod:`launcher.data.readers`); a
short or damaged shard is made up for from its reader's spare stream (see :mod:`launcher.data.plan`).
Each event is counted in ``loader.stats`` once per rank and logged once per shard (or file).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from launcher.data.plan import EpochPlan, eval_plan, rank_slots, worker_slots
from launcher.data.readers import DECODE_ERRORS, SourceReader, decode_slot, read_segments
from launcher.data.sources import Dataset, ReadEvent, Split
from launcher.data.transforms import EvalTransform, TrainTransform, preserved_rng_state

log = logging.getLogger(__name__)
PIN_RING = 3  # pinned slice buffers: a yielded micro-batch stays valid for two more global batches


@dataclass
class LoaderStats:
    """Counters of skipped data, by shard (or file for folder sources)."""

    skipped: int = 0
    by_source: Counter = field(default_factory=Counter)
    reasons: list[str] = field(default_factory=list)  # the first few messages, for reports

    def add(self, event: ReadEvent) -> None:
        self.skipped += 1
        self.by_source[event.source] += 1
        if len(self.reasons) < 20:
            self.reasons.append(f"{event.source}: {event.reason}")

    def as_dict(self) -> dict:
        return {"skipped": self.skipped, "by_source": dict(self.by_source), "reasons": list(self.reasons)}


def _worker_identity(workers: int) -> tuple[int, bool]:
    info = get_worker_info()
    if info is None:
        return 0, False
    if info.num_workers != workers:
        raise RuntimeError(f"loader built for {workers} workers runs with {info.num_workers}")
    return info.id, True


def _new_batch(size: int, shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    batch = torch.empty((size, *shape), dtype=torch.uint8)
    return batch.share_memory_() if shared else batch


class TrainStream(IterableDataset):
    """One rank's slots of every global batch, one item per global batch per worker (see the module docstring)."""

    def __init__(self, split: Split, transform: TrainTransform, *, rank: int, world_size: int, global_batch: int,
                 workers: int, seed: int, repeats: int) -> None:
        self.split, self.transform = split, transform
        self.global_batch, self.seed, self.repeats = global_batch, seed, max(1, repeats)
        self.slots = rank_slots(rank, world_size, global_batch)
        self.workers = min(workers, len(self.slots))
        self.worker_slots = worker_slots(self.slots, max(1, self.workers))
        self.state = torch.zeros(2, dtype=torch.int64).share_memory_()  # [epoch, start batch]

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(self.split.lengths, self.seed, epoch, self.global_batch, self.repeats)

    def _pieces(self, plan: EpochPlan, slots: range) -> list[tuple[int, int, range]]:
        """``(reader, source, chunk offsets)`` covering ``slots``, in slot order."""
        c = plan.chunk
        pieces = []
        for reader in range(slots.start // c, (slots.stop - 1) // c + 1):
            lo, hi = max(slots.start, reader * c), min(slots.stop, (reader + 1) * c)
            pieces.append((reader, plan.source_of(reader), range(lo - reader * c, hi - reader * c)))
        return pieces

    def _reporting_sources(self, plan: EpochPlan, worker: int) -> set[int]:
        """The sources whose read events this worker reports: each once per rank, by its first worker."""
        first: dict[int, int] = {}
        for w, slots in enumerate(self.worker_slots):
            for _, source, _ in self._pieces(plan, slots):
                first.setdefault(source, w)
        return {source for source, w in first.items() if w == worker}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[ReadEvent]]]:
        worker, in_worker = _worker_identity(max(1, self.workers))
        epoch, start = (int(v) for v in self.state.tolist())
        plan = self.plan(epoch)
        slots = self.worker_slots[worker]
        pieces = self._pieces(plan, slots)
        reporting = self._reporting_sources(plan, worker)
        read_events = {source: [] for _, source, _ in pieces}
        readers = {source: SourceReader(self.split, plan, source, read_events[source]) for source in read_events}
        events: list[ReadEvent] = []
        shape = (3, *self.transform.size)
        for reader in readers.values():
            reader.skip(start * plan.chunk)
        for batch in range(start, plan.updates):
            chunks = {source: reader.take(plan.chunk) for source, reader in readers.items()}
            images, labels = _new_batch(len(slots), shape, in_worker), torch.empty(len(slots), dtype=torch.int64)
            n = 0
            with preserved_rng_state() if not in_worker else nullcontext():
                for index, source, offsets in pieces:
                    for offset in offsets:
                        seed = plan.sample_seed(batch, index * plan.chunk + offset)
                        images[n], labels[n] = decode_slot(self.transform, chunks[source], offset, readers[source],
                                                           seed, events)
                        n += 1
            for source, found in read_events.items():
                if source in reporting:
                    events += found
                found.clear()
            yield images, labels, events[:]
            events.clear()


class EvalStream(IterableDataset):
    """Each validation sample exactly once across ranks x workers; batches of ``batch_size`` (last partial)."""

    def __init__(self, split: Split, transform: EvalTransform, *, rank: int, world_size: int, workers: int,
                 batch_size: int) -> None:
        self.split, self.transform = split, transform
        self.workers = max(1, workers)
        self.batch_size = batch_size
        self.segments, self.num_batches = eval_plan(split.lengths, split.lengths_known, rank, world_size,
                                                    self.workers, batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[ReadEvent]]]:
        worker, in_worker = _worker_identity(self.workers)
        events: list[ReadEvent] = []
        stream = read_segments(self.split, self.segments[worker], events)
        while raws := list(itertools.islice(stream, self.batch_size)):
            images = _new_batch(len(raws), (3, self.transform.size, self.transform.size), in_worker)
            labels = torch.empty(len(raws), dtype=torch.int64)
            kept = 0
            for raw in raws:
                try:
                    images[kept] = self.transform(raw.data)
                except DECODE_ERRORS as error:
                    events.append(ReadEvent(raw.source, f"undecodable sample {raw.key}: {error}"))
                    continue
                labels[kept] = raw.label
                kept += 1
            if kept or events:
                yield images[:kept], labels[:kept], events[:]
            events.clear()


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one core per worker: decode/resize must not oversubscribe


def _make_dataloader(stream: IterableDataset, workers: int, pin_memory: bool, prefetch: int) -> DataLoader:
    # fork starts workers in milliseconds; the inherited default can be spawn (inside a process started by
    # multiprocessing spawn) or forkserver (Python >= 3.14), which re-import torch and timm per worker.
    context = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
    return DataLoader(
        stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
        persistent_workers=workers > 0, prefetch_factor=prefetch if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None, multiprocessing_context=context if workers > 0 else None,
    )


class _LoaderBase:
    def __init__(self, loader: DataLoader, stats_name: str) -> None:
        self.loader = loader
        self.stats = LoaderStats()
        self._name = stats_name

    def _consume(self, iterator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, events in iterator:
            for event in events:
                if self.stats.by_source[event.source] == 0:
                    log.warning("%s: skipped data in %s: %s", self._name, event.source, event.reason)
                self.stats.add(event)
            yield images, labels


class TrainLoader(_LoaderBase):
    """This rank's micro-batches: ``len`` = ``updates_per_epoch x accumulation`` (the same on every rank).

    Call ``set_epoch`` every epoch; ``set_start(u)`` to begin at global batch ``u`` of the epoch.
    """

    def __init__(self, stream: TrainStream, loader: DataLoader, *, micro_batch: int, pin_memory: bool,
                 early_next_epoch: bool = False) -> None:
        super().__init__(loader, "train loader")
        self.early_next_epoch = early_next_epoch and stream.workers > 0
        self.stream = stream
        self.micro_batch = micro_batch
        self.accumulation = len(stream.slots) // micro_batch
        self.updates_per_epoch = stream.plan(0).updates  # depends on the sample count and global batch only
        self.pin_memory = pin_memory
        self.epoch = 0
        self.start = 0
        self._ring: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._next_epoch: tuple[tuple[int, int], Iterator[tuple[torch.Tensor, torch.Tensor]]] | None = None

    @property
    def workers(self) -> int:
        """Loader workers actually used (the request, clamped to this rank's slots per global batch)."""
        return self.stream.workers

    @property
    def batch_size(self) -> int:
        return self.micro_batch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a resume position belongs to the epoch it was set for
        self.epoch = epoch

    def set_start(self, update: int) -> None:
        if not 0 <= update <= self.updates_per_epoch:
            raise ValueError(f"start update {update} outside [0, {self.updates_per_epoch}]")
        self.start = update

    def __len__(self) -> int:
        return self.updates_per_epoch * self.accumulation

    @property
    def next_epoch_started(self) -> bool:
        """Whether the workers already work on the epoch after the one last read to its end."""
        return self._next_epoch is not None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        started, self._next_epoch = self._next_epoch, None
        if started is not None and started[0] == (self.epoch, self.start):
            items = started[1]
        else:  # (a started epoch that is not wanted is drained by the DataLoader's reset)
            items = self._start(self.epoch, self.start)
        return self._micro_batches(items, self.start)

    def _start(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Set the workers going on ``epoch`` from global batch ``start`` (they read this at their start)."""
        self.stream.state.copy_(torch.tensor([epoch, start]))
        with torch.random.fork_rng(devices=[]):  # a DataLoader draws its base seed from the global RNG
            return self._consume(iter(self.loader))

    def _micro_batches(self, items: Iterator[tuple[torch.Tensor, torch.Tensor]],
                       start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        parts_per_batch = max(1, self.stream.workers)
        for update in range(start, self.updates_per_epoch):
            parts = list(itertools.islice(items, parts_per_batch))
            if len(parts) < parts_per_batch:
                raise RuntimeError(f"train loader: workers stopped at global batch {update} of "
                                   f"{self.updates_per_epoch}")
            if self.pin_memory:
                yield from self._split(self._into_ring(parts, update), None)
            else:
                yield from self._split(None, parts)
        if next(items, None) is not None:
            raise RuntimeError("train loader: workers yielded more batches than planned")
        if self.early_next_epoch:
            # The epoch's last micro-batches are in hand: the workers start on the next epoch now, while
            # the step, the evaluation and the checkpoint run, instead of after them (the batches do not
            # depend on when they are made).
            self._next_epoch = ((self.epoch + 1, 0), self._start(self.epoch + 1, 0))

    def _into_ring(self, parts: list[tuple[torch.Tensor, torch.Tensor]],
                   update: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._ring:
            pin = torch.cuda.is_available()  # without a GPU, plain memory (what DataLoader's pin_memory does too)
            shape, size = parts[0][0].shape[1:], len(self.stream.slots)
            self._ring = [(torch.empty((size, *shape), dtype=torch.uint8, pin_memory=pin),
                           torch.empty(size, dtype=torch.int64, pin_memory=pin)) for _ in range(PIN_RING)]
        images, labels = self._ring[update % PIN_RING]
        torch.cat([p[0] for p in parts], out=images)
        torch.cat([p[1] for p in parts], out=labels)
        return images, labels

    def _split(self, whole: tuple[torch.Tensor, torch.Tensor] | None,
               parts: list[tuple[torch.Tensor, torch.Tensor]] | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Micro-batches in slot order: slices of ``whole``, or of ``parts`` (a view when one part holds it)."""
        m = self.micro_batch
        if whole is not None:
            for a in range(self.accumulation):
                yield whole[0][a * m:(a + 1) * m], whole[1][a * m:(a + 1) * m]
            return
        bounds = list(itertools.accumulate((len(p[1]) for p in parts), initial=0))
        for a in range(self.accumulation):
            lo, hi = a * m, (a + 1) * m
            pieces = [(p, max(lo, b0) - b0, min(hi, b1) - b0)
                      for p, b0, b1 in zip(parts, bounds, bounds[1:]) if b0 < hi and b1 > lo]
            if len(pieces) == 1:
                (images, labels), x, y = pieces[0]
                yield images[x:y], labels[x:y]
            else:
                yield (torch.cat([p[0][x:y] for p, x, y in pieces]), torch.cat([p[1][x:y] for p, x, y in pieces]))


class EvalLoader(_LoaderBase):
    def __init__(self, stream: EvalStream, loader: DataLoader) -> None:
        super().__init__(loader, "eval loader")
        self.stream = stream

    def __len__(self) -> int:
        if self.stream.num_batches is None:
            raise TypeError("number of eval batches unknown (remote shards without per-shard counts)")
        return self.stream.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._consume(iter(self.loader))


def _check_rank(rank: int, world_size: int, batch: int, name: str) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size} is not a valid pair")
    if batch < 1:
        raise ValueError(f"{name} must be >= 1, got {batch}")


def build_train_loader(
    ds: Dataset, *, rank: int, world_size: int, micro_batch: int, img_size: int, global_batch: int | None = None,
    auto_augment: str | None = "rand-m7-mstd0.5-inc1", aug_repeats: int = 0,
    scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5,
    interpolation: str = "bicubic", workers: int = 2, seed: int = 0, pin_memory: bool | None = None,
    prefetch: int = 2, split: str = "train", draft: bool = True, early_next_epoch: bool | None = None,
) -> TrainLoader:
    """Equal-length, deterministic, resumable train micro-batches for one rank (see the module docstrings).

    The global batches depend on ``global_batch`` (default ``world_size x micro_batch``, no accumulation),
    ``seed``, the epoch, ``aug_repeats`` and the data, not on ``world_size``, ``micro_batch`` or ``workers``.
    ``early_next_epoch`` (default: when CUDA is available) sets the workers going on the next epoch as soon
    as one is read: on a GPU node the cores are idle during evaluation and checkpointing; where the CPU
    trains, they are the compute, and working ahead only slows the step (2-core CPU, 30 epochs: +10 %).
    """
    _check_rank(rank, world_size, micro_batch, "micro_batch")
    global_batch = world_size * micro_batch if global_batch is None else global_batch
    if global_batch < 1 or global_batch % (world_size * micro_batch):
        raise ValueError(f"global_batch={global_batch} is not divisible by micro_batch={micro_batch} x "
                         f"world_size={world_size} = {micro_batch * world_size}")
    if workers < 0 or prefetch < 1:
        raise ValueError(f"workers={workers} must be >= 0 and prefetch={prefetch} >= 1")
    source = ds.split(split)
    if source.num_samples < global_batch:
        raise ValueError(f"split {split!r} of {ds.spec} has {source.num_samples} samples, fewer than one global "
                         f"batch ({global_batch})")
    transform = TrainTransform(img_size, auto_augment=auto_augment, scale=scale, ratio=ratio, hflip=hflip,
                               interpolation=interpolation, draft=draft)
    stream = TrainStream(source, transform, rank=rank, world_size=world_size, global_batch=global_batch,
                         workers=workers, seed=seed, repeats=int(aug_repeats))
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    # the DataLoader does not pin: the slice is assembled into pinned buffers here, one copy either way
    early = torch.cuda.is_available() if early_next_epoch is None else early_next_epoch
    return TrainLoader(stream, _make_dataloader(stream, stream.workers, False, prefetch), micro_batch=micro_batch,
                       pin_memory=pin, early_next_epoch=early)


def build_eval_loader(
    ds: Dataset, *, rank: int, world_size: int, batch_size: int, img_size: int, crop_pct: float = 0.95,
    interpolation: str = "bicubic", workers: int = 2, split: str = "validation", pin_memory: bool | None = None,
    prefetch: int = 2,
) -> EvalLoader:
    """Every sample of ``split`` exactly once across all ranks; ranks may get different counts."""
    _check_rank(rank, world_size, batch_size, "batch_size")
    transform = EvalTransform(img_size, crop_pct=crop_pct, interpolation=interpolation)
    stream = EvalStream(ds.split(split), transform, rank=rank, world_size=world_size, workers=workers,
                        batch_size=batch_size)
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return EvalLoader(stream, _make_dataloader(stream, workers, pin, prefetch))
