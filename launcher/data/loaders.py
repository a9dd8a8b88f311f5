"""Train and eval loaders: DataLoader workers that read their planned samples and emit whole uint8 batches.

Each worker batches internally (``batch_size=None`` in the DataLoader), so the main process only
receives ready ``(images uint8 [B,3,H,W], labels int64 [B])`` tensors allocated in shared memory.

Determinism: a sample's augmentation is seeded from ``(seed, epoch, stream position)``, the shuffle
buffer from ``(seed, epoch, rank, world_size, worker)``, so the stream is a pure function of
``(seed, epoch, rank, world_size, workers, micro_batch)``. ``set_start(k)`` resumes at batch ``k``:
workers read but do not decode the samples of skipped batches, and the DataLoader's worker ids are
rotated by ``k % workers`` so that its round-robin collection yields batch ``k`` first.

Corrupt data: a sample that fails to decode is replaced by another sample of the same batch augmented
with the failed slot's own seed (batch-local, so resuming stays exact); a short or damaged shard is
made up for from the worker's spare stream (see :mod:`launcher.data.plan`). Each event is counted in
``loader.stats`` and logged once, naming the shard.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import random
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from launcher.data.plan import TrainPlan, count_batches, eval_plan, mix_seed, shuffle_buffer
from launcher.data.sources import (
    Dataset,
    RawSample,
    ReadEvent,
    Split,
    read_file_sample,
    read_tar_samples,
)
from launcher.data.transforms import (
    DecodeError,
    EvalTransform,
    TrainTransform,
    preserved_rng_state,
    seed_everything_for_sample,
)

log = logging.getLogger(__name__)
DEFAULT_SHUFFLE_BUFFER = 1000  # raw JPEGs (~100 KB each): ~100 MB per worker
_MAX_SPARE_ATTEMPTS = 1000


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


def _read_segments(split: Split, segments, events: list[ReadEvent]) -> Iterator[RawSample]:
    for segment in segments:
        if split.is_folder:  # one image per unit
            unit = segment.unit
            sample = read_file_sample(split.units[unit], split.labels[unit], split.relpaths[unit],
                                      segment.position, events)
            if sample is not None:
                yield sample
        else:
            yield from read_tar_samples(split.units[segment.unit], segment.start, segment.stop, segment.position,
                                        events)


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
    """The per-worker sample stream of one rank (used through :class:`TrainLoader`)."""

    def __init__(self, split: Split, transform: TrainTransform, *, rank: int, world_size: int, workers: int,
                 micro_batch: int, seed: int, repeats: int, shuffle_buffer: int) -> None:
        self.split, self.transform = split, transform
        self.rank, self.world_size, self.workers = rank, world_size, max(1, workers)
        self.micro_batch, self.seed, self.repeats = micro_batch, seed, max(1, repeats)
        self.buffer = 0 if split.is_folder else shuffle_buffer  # folder units are single samples: already shuffled
        self.state = torch.zeros(2, dtype=torch.int64).share_memory_()  # [epoch, start batch]

    def plan(self, epoch: int) -> TrainPlan:
        return TrainPlan(self.split.lengths, self.seed, epoch, self.rank, self.world_size, self.workers,
                         self.micro_batch, self.repeats)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[ReadEvent]]]:
        loader_id, in_worker = _worker_identity(self.workers)
        epoch, start = (int(v) for v in self.state.tolist())
        worker = (loader_id + start) % self.workers  # rotation: this loader worker yields batch `start` first
        plan = self.plan(epoch)
        events: list[ReadEvent] = []
        planned = shuffle_buffer(_read_segments(self.split, plan.worker_segments(worker), events), self.buffer,
                                 random.Random(plan.shuffle_seed(worker)))
        spares = _read_segments(self.split, plan.spare_segments(worker), events)
        stream = itertools.chain(planned, spares)
        skip = count_batches(plan.batches_per_rank, self.workers, worker, 0) - count_batches(
            plan.batches_per_rank, self.workers, worker, start)
        for index in range(count_batches(plan.batches_per_rank, self.workers, worker)):
            raws = list(itertools.islice(stream, self.micro_batch))
            if len(raws) < self.micro_batch:
                raise RuntimeError(f"no readable samples left in split {self.split.name!r} (all shards failed?)")
            if index < skip:
                continue
            images, labels = self._make_batch(raws, epoch, spares, events, in_worker)
            yield images, labels, events[:]
            events.clear()

    def _augment(self, raw: RawSample, seed: int) -> torch.Tensor:
        seed_everything_for_sample(seed)
        return self.transform(raw.data)

    def _make_batch(self, raws: list[RawSample], epoch: int, spares: Iterator[RawSample],
                    events: list[ReadEvent], in_worker: bool) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.transform.size
        images = _new_batch(len(raws), (3, *size), in_worker)
        labels = torch.empty(len(raws), dtype=torch.int64)
        seeds = [mix_seed(self.seed, epoch, raw.position) for raw in raws]
        failed: list[int] = []
        with preserved_rng_state() if not in_worker else nullcontext():
            for slot, raw in enumerate(raws):
                try:
                    images[slot] = self._augment(raw, seeds[slot])
                    labels[slot] = raw.label
                except (DecodeError, OSError, ValueError, RuntimeError) as error:
                    events.append(ReadEvent(raw.source, f"undecodable sample {raw.key}: {error}"))
                    failed.append(slot)
            good = [slot for slot in range(len(raws)) if slot not in failed]
            for slot in failed:
                donor_raw = raws[min(good, key=lambda g: abs(g - slot))] if good else None
                for _ in range(_MAX_SPARE_ATTEMPTS):
                    if donor_raw is None:
                        donor_raw = next(spares)
                    try:
                        images[slot] = self._augment(donor_raw, seeds[slot])
                        labels[slot] = donor_raw.label
                        break
                    except (DecodeError, OSError, ValueError, RuntimeError):
                        donor_raw = None
                else:
                    raise RuntimeError(f"{_MAX_SPARE_ATTEMPTS} undecodable samples in a row in {raws[0].source}")
        return images, labels


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
        stream = _read_segments(self.split, self.segments[worker], events)
        while raws := list(itertools.islice(stream, self.batch_size)):
            images = _new_batch(len(raws), (3, self.transform.size, self.transform.size), in_worker)
            labels = torch.empty(len(raws), dtype=torch.int64)
            kept = 0
            for raw in raws:
                try:
                    images[kept] = self.transform(raw.data)
                except (DecodeError, OSError, ValueError, RuntimeError) as error:
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
    """``len`` = batches per epoch on this rank (the same on every rank). Call ``set_epoch`` each epoch."""

    def __init__(self, stream: TrainStream, loader: DataLoader) -> None:
        super().__init__(loader, "train loader")
        self.stream = stream
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a resume position belongs to the epoch it was set for
        self.epoch = epoch

    def set_start(self, update: int) -> None:
        batch_index = update * self.accumulation
        if not 0 <= batch_index <= len(self):
            raise ValueError(f"start batch {batch_index} outside [0, {len(self)}]")
        self.start = batch_index

    def __len__(self) -> int:
        return self.stream.plan(self.epoch).batches_per_rank

    @property
    def updates_per_epoch(self) -> int:
        return len(self) // self.accumulation

    @property
    def batch_size(self) -> int:
        return self.stream.micro_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.stream.state.copy_(torch.tensor([self.epoch, self.start]))
        return self._consume(iter(self.loader))


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
    interpolation: str = "bicubic", workers: int = 2, seed: int = 0, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    pin_memory: bool | None = None, prefetch: int = 2, split: str = "train", draft: bool = True,
) -> TrainLoader:
    """Equal-length, deterministic, resumable train batches for one rank (see the module docstrings)."""
    _check_rank(rank, world_size, micro_batch, "micro_batch")
    source = ds.split(split)
    if source.num_samples < world_size * micro_batch:
        raise ValueError(f"split {split!r} of {ds.spec} has {source.num_samples} samples, fewer than one batch "
                         f"per rank ({world_size} x {micro_batch})")
    transform = TrainTransform(img_size, auto_augment=auto_augment, scale=scale, ratio=ratio, hflip=hflip,
                               interpolation=interpolation, draft=draft)
    stream = TrainStream(source, transform, rank=rank, world_size=world_size, workers=workers,
                         micro_batch=micro_batch, seed=seed, repeats=int(aug_repeats), shuffle_buffer=shuffle_buffer)
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    loader = TrainLoader(stream, _make_dataloader(stream, workers, pin, prefetch))
    loader.accumulation = (global_batch or world_size * micro_batch) // (world_size * micro_batch)
    loader.workers = workers
    return loader


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
