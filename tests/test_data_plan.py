"""The per-epoch plan: a function of data, seed, epoch, global batch and repeats; coverage; eval exactly once."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from launcher.data.plan import EpochPlan, chunk_size, eval_plan, rank_slots, worker_slots
from launcher.data.readers import shuffle_buffer


def _samples(segments) -> list[tuple[int, int]]:
    return [(s.unit, i) for s in segments for i in range(s.start, s.stop)]


def _stream(lengths, order) -> list[tuple[int, int]]:
    return [(int(u), i) for u in order for i in range(lengths[u])]


@pytest.mark.parametrize("global_batch,chunk", [(1, 1), (16, 1), (256, 1), (258, 2), (1000, 4), (2048, 8),
                                                (4096, 16), (257, 257), (514, 257)])
def test_chunk_is_the_smallest_divisor_leaving_at_most_256_readers(global_batch, chunk):
    assert chunk_size(global_batch) == chunk


@pytest.mark.parametrize("lengths", [[1000, 7, 93], [5, 3], [3, 0, 40, 1, 1, 1, 29], [64] * 16, [130]])
@pytest.mark.parametrize("global_batch", [1, 4, 7, 8])
def test_sources_read_the_rotated_stream_once_plus_the_wrap_around_filler(lengths, global_batch):
    plan = EpochPlan(np.asarray(lengths), seed=3, epoch=1, global_batch=global_batch)
    n = sum(lengths)
    assert plan.updates == -(-n // global_batch) and plan.sources == plan.readers == global_batch
    reads = [_samples(plan.source_segments(s)) for s in range(plan.sources)]
    assert all(len(r) == plan.reader_length for r in reads)
    everything = [x for r in reads for x in r]
    # the rotated stream: epoch position p reads stream position (offset + p) mod N, in order
    stream = _stream(lengths, plan.unit_order())
    assert everything == [stream[(plan.offset + p) % n] for p in range(plan.updates * global_batch)]
    counts = Counter(everything)  # every sample at least once; U*G - N of them (the filler) twice
    filler = plan.updates * global_batch - n
    assert len(counts) == n and dict(Counter(counts.values())) == {k: v for k, v in {1: n - filler, 2: filler}.items() if v}


def test_order_and_offset_change_with_epoch_and_seed_only():
    lengths = np.asarray([10] * 20)
    a, again = EpochPlan(lengths, 0, 0, 8), EpochPlan(lengths, 0, 0, 8)
    other_batch = EpochPlan(lengths, 0, 0, 16)
    b, c = EpochPlan(lengths, 0, 1, 8), EpochPlan(lengths, 1, 0, 8)
    assert (a.unit_order() == again.unit_order()).all() and a.offset == again.offset
    assert (a.unit_order() == other_batch.unit_order()).all() and a.offset == other_batch.offset
    assert not (a.unit_order() == b.unit_order()).all() and not (a.unit_order() == c.unit_order()).all()
    one_shard = [EpochPlan(np.asarray([500]), 0, e, 8).offset for e in range(4)]
    assert len(set(one_shard)) == 4  # even one shard starts elsewhere every epoch


@pytest.mark.parametrize("global_batch,repeats,copies", [(12, 3, {3}), (2048, 3, {3, 2}), (8, 2, {2}), (5, 4, {3, 2})])
def test_repeated_augmentation_sources_and_copies(global_batch, repeats, copies):
    plan = EpochPlan(np.asarray([40_000]), 0, 0, global_batch, repeats)
    per_source = [plan.copies(s) for s in range(plan.sources)]
    assert sum(per_source) == plan.readers and set(per_source) == copies
    assert [plan.source_of(v) for v in range(plan.readers)] == [v % plan.sources for v in range(plan.readers)]
    used = [x for s in range(plan.sources) for x in _samples(plan.source_segments(s))]
    assert len(used) == len(set(used)) == plan.sources * plan.reader_length  # distinct: about 1/R of the data


def test_augmentation_seeds_differ_per_slot_batch_and_epoch():
    plans = [EpochPlan(np.asarray([100]), 0, e, 8) for e in (0, 1)]
    seeds = {p.sample_seed(i, q) for p in plans for i in range(3) for q in range(8)}
    assert len(seeds) == 2 * 3 * 8


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 3), (4, 2), (8, 1)])
def test_ranks_and_workers_own_contiguous_slot_blocks_in_order(world, workers):
    blocks = [block for r in range(world) for block in worker_slots(rank_slots(r, world, 16), workers)]
    assert [q for block in blocks for q in block] == list(range(16))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


@pytest.mark.parametrize("repeats", [1, 3])
def test_spares_start_in_the_unused_part_and_cycle_the_whole_stream(repeats):
    lengths = np.asarray([10, 10, 10, 7])
    plan = EpochPlan(lengths, 0, 0, 4, repeats)
    used = {x for s in range(plan.sources) for x in _samples(plan.source_segments(s))}
    for s in range(plan.sources):
        spares = _samples(plan.spare_segments(s))
        assert sorted(spares) == sorted(_stream(lengths, range(4))) and all(
            seg.position < 0 for seg in plan.spare_segments(s))
        if repeats > 1:
            assert spares[0] not in used


@pytest.mark.parametrize("lengths", [[7, 6], [1], [13, 0, 4, 9]])
@pytest.mark.parametrize("world,workers,batch", [(2, 2, 4), (3, 1, 5), (2, 3, 1)])
def test_eval_sees_every_sample_exactly_once(lengths, world, workers, batch):
    seen = []
    for rank in range(world):
        per_worker, num_batches = eval_plan(np.asarray(lengths), True, rank, world, workers, batch)
        rank_samples = [s for segments in per_worker for s in _samples(segments)]
        assert num_batches == -(-len(rank_samples) // batch)
        seen += rank_samples
    assert sorted(seen) == [(u, i) for u, n in enumerate(lengths) for i in range(n)]


def test_eval_with_unknown_counts_deals_whole_shards_once():
    units = []
    for rank in range(2):
        per_worker, num_batches = eval_plan(np.ones(5, dtype=np.int64), False, rank, 2, 2, 4)
        units += [s.unit for segments in per_worker for s in segments if s.stop is None]
        assert num_batches is None
    assert sorted(units) == [0, 1, 2, 3, 4]


def test_shuffle_buffer_is_a_seeded_permutation():
    items = list(range(100))
    a = list(shuffle_buffer(items, 10, random.Random(1)))
    assert sorted(a) == items and a != items
    assert a == list(shuffle_buffer(items, 10, random.Random(1)))
