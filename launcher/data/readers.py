"""The virtual readers of :mod:`launcher.data.plan` at work: sequential reading, shuffle buffer, spares, and
the decoding of one worker's slots with a deterministic stand-in for an undecodable sample.

A :class:`SourceReader` turns one source's planned range into its output stream: the raw (encoded)
samples of the range, read in order, through the source's seeded shuffle buffer, then its endless
spare stream. The stream is a function of the data alone, so every process that instantiates the same
source (two workers sharing a reader, the ranks holding the copies of repeated augmentation, a
resumed run) sees the same outputs, and skipping outputs costs reading only, no decoding.

Undecodable samples: slot ``q``'s sample is replaced by the nearest other output of its reader's chunk
(ties: the earlier one), then by the reader's following outputs, whichever decodes first, augmented
with slot ``q``'s own seed. The choice depends on the data only, never on which worker decodes it.
"""

from __future__ import annotations

import itertools
import random
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import torch

from launcher.data.plan import EpochPlan, Segment
from launcher.data.sources import RawSample, ReadEvent, Split, read_file_sample, read_tar_samples
from launcher.data.transforms import DecodeError, TrainTransform, seed_everything_for_sample

T = TypeVar("T")
DECODE_ERRORS = (DecodeError, OSError, ValueError, RuntimeError)
MAX_REPLACEMENTS = 1000


def read_segments(split: Split, segments: Iterable[Segment], events: list[ReadEvent]) -> Iterator[RawSample]:
    for segment in segments:
        if split.is_folder:  # one image per unit
            unit = segment.unit
            sample = read_file_sample(split.units[unit], split.labels[unit], split.relpaths[unit],
                                      segment.position, events)
            if sample is not None:
                yield sample
        else:
            url = split.units[segment.unit]
            yield from read_tar_samples(url, segment.start, segment.stop, segment.position, events,
                                        split.sample_offsets.setdefault(url, array("q")))


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


class SourceReader:
    """The output stream of one source: its range, shuffled, then spares (endless). Read events go to ``events``."""

    def __init__(self, split: Split, plan: EpochPlan, source: int, events: list[ReadEvent]) -> None:
        self.split, self.plan, self.source, self.events = split, plan, source, events
        size = 0 if split.is_folder else plan.shuffle_buffer  # folder units are single samples: already shuffled
        planned = shuffle_buffer(read_segments(split, plan.source_segments(source), events), size,
                                 random.Random(plan.shuffle_seed(source)))
        self._stream = itertools.chain(planned, self._spares())
        self._ahead: deque[RawSample] = deque()

    def _spares(self) -> Iterator[RawSample]:
        while True:
            found = 0
            for raw in read_segments(self.split, self.plan.spare_segments(self.source), self.events):
                found += 1
                yield raw
            if not found:
                raise RuntimeError(f"no readable samples left in split {self.split.name!r}: every shard failed "
                                   f"({'; '.join(e.reason for e in self.events[-3:]) or 'no details'})")

    def take(self, count: int) -> list[RawSample]:
        """The next ``count`` outputs."""
        self.ahead(count - 1)
        return [self._ahead.popleft() for _ in range(count)]

    def skip(self, count: int) -> None:
        """Read past ``count`` outputs (to resume mid-epoch): I/O only, nothing is decoded."""
        while self._ahead and count:
            self._ahead.popleft()
            count -= 1
        for _ in itertools.islice(self._stream, count):
            pass

    def ahead(self, index: int) -> RawSample:
        """The output ``index`` places after the last one taken, without taking it."""
        while len(self._ahead) <= index:
            self._ahead.append(next(self._stream))
        return self._ahead[index]


def _augment(transform: TrainTransform, raw: RawSample, seed: int) -> torch.Tensor:
    seed_everything_for_sample(seed)
    return transform(raw.data)


def decode_slot(transform: TrainTransform, chunk: Sequence[RawSample], index: int, reader: SourceReader, seed: int,
                events: list[ReadEvent]) -> tuple[torch.Tensor, int]:
    """Augmented image and label for output ``index`` of ``chunk`` (taken last from ``reader``)."""
    raw = chunk[index]
    try:
        return _augment(transform, raw, seed), raw.label
    except DECODE_ERRORS as error:
        events.append(ReadEvent(raw.source, f"undecodable sample {raw.key}: {error}"))
    in_chunk = sorted((i for i in range(len(chunk)) if i != index), key=lambda i: (abs(i - index), i))
    donors = itertools.chain((chunk[i] for i in in_chunk), (reader.ahead(k) for k in itertools.count()))
    for donor in itertools.islice(donors, MAX_REPLACEMENTS):
        try:
            return _augment(transform, donor, seed), donor.label
        except DECODE_ERRORS:
            continue
    raise RuntimeError(f"{MAX_REPLACEMENTS} undecodable samples in a row after {raw.key} in {raw.source}")
