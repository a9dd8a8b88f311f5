"""Host -> device copies that overlap compute: the next micro-batch is copied while this one trains.

On CUDA the copy of micro-batch k+1 is issued on a side stream (from pinned memory, so it is truly
asynchronous) before micro-batch k is handed to the step; the compute stream waits for the copy on the
device, never on the host. On the CPU the batches pass through unchanged. The time the host spends waiting
for the loader is measured here, which is what ``data_wait_fraction`` reports.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


class DevicePrefetcher:
    """Iterate ``batches`` (uint8 images, labels) as device tensors, one copy ahead."""

    def __init__(self, batches: Iterable[Batch], device: torch.device, *, keep_sources: int = 8) -> None:
        self.batches = batches
        self.device = device
        self.wait_seconds = 0.0  # host time spent waiting for the loader
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        # The loader may reuse a pinned buffer once a few more batches were taken: before taking the next
        # batch, make sure the copies of batches that far back are finished (they are, in practice).
        self._copies: deque[torch.cuda.Event] = deque()
        self._keep = keep_sources

    def _next(self, iterator: Iterator[Batch]) -> Batch | None:
        while len(self._copies) > self._keep:
            self._copies.popleft().synchronize()
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return None
        finally:
            self.wait_seconds += time.perf_counter() - start
        return batch

    def _to_device(self, batch: Batch) -> tuple[Batch, torch.cuda.Event | None]:
        images, labels = batch
        if not self.cuda:
            return (images.to(self.device), labels.to(self.device)), None
        assert self.stream is not None
        with torch.cuda.stream(self.stream):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self._copies.append(event)
        return (images, labels), event

    def __iter__(self) -> Iterator[Batch]:
        iterator = iter(self.batches)
        first = self._next(iterator)
        if first is None:
            return
        ready, copied = self._to_device(first)
        while True:
            upcoming = self._next(iterator)
            following = self._to_device(upcoming) if upcoming is not None else None
            if copied is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(copied)  # compute waits for this batch's copy, on the device only
                for tensor in ready:
                    tensor.record_stream(current)  # the allocator must not reuse it while compute reads it
            yield ready
            if following is None:
                return
            ready, copied = following
