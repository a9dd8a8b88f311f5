"""The per-epoch plan: equal batch counts, exact coverage, repeated augmentation, eval exactly once."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from launcher.data.plan import TrainPlan, count_batches, eval_plan, shuffle_buffer


def _samples(segments) -> list[tuple[int, int]]:
    return [(s.unit, i) for s in segments for i in range(s.start, s.stop)]


def _epoch(lengths, world, workers, micro, repeats=1, seed=0, epoch=0):
    """{(rank, worker): [(unit, index), ...]} and the per-rank batch counts a DataLoader would see."""
    plans = [TrainPlan(np.asarray(lengths), seed, epoch, r, world, workers, micro, repeats) for r in range(world)]
    reads = {(r, w): _samples(p.worker_segments(w)) for r, p in enumerate(plans) for w in range(workers)}
    batches = [sum(count_batches(p.batches_per_rank, workers, w) for w in range(workers)) for p in plans]
    return plans, reads, batches


@pytest.mark.parametrize("lengths", [[1000, 7, 93], [5], [3, 0, 40, 1, 1, 1, 29], [64] * 16])
@pytest.mark.parametrize("world,workers,micro", [(1, 1, 8), (2, 2, 4), (3, 4, 5), (8, 3, 2)])
def test_every_rank_gets_the_same_batches_and_no_sample_twice(lengths, world, workers, micro):
    plans, reads, batches = _epoch(lengths, world, workers, micro)
    expected = sum(lengths) // (world * micro)
    assert batches == [expected] * world
    for (_rank, worker), samples in reads.items():  # each worker reads exactly its batches' worth
        assert len(samples) == count_batches(expected, workers, worker) * micro
    everything = [s for samples in reads.values() for s in samples]
    assert len(everything) == len(set(everything)) == expected * world * micro


def test_shard_order_changes_with_epoch_and_matches_across_ranks():
    lengths = [10] * 20
    a = TrainPlan(np.asarray(lengths), 0, 0, 0, 2, 2, 4).unit_order()
    b = TrainPlan(np.asarray(lengths), 0, 0, 1, 2, 2, 4).unit_order()
    c = TrainPlan(np.asarray(lengths), 0, 1, 0, 2, 2, 4).unit_order()
    assert (a == b).all() and not (a == c).all()


@pytest.mark.parametrize("world,workers", [(4, 2), (3, 1), (1, 3), (1, 1)])
def test_repeated_augmentation_emits_each_sample_exactly_repeats_times(world, workers):
    micro, repeats = 6, 3  # T = world * B * 6 is divisible by 3: the exact case
    lengths = [50, 11, 130, 2]
    plans, reads, _ = _epoch(lengths, world, workers, micro, repeats=repeats)
    counts = Counter(s for samples in reads.values() for s in samples)
    emitted = plans[0].emitted
    assert sum(counts.values()) == emitted  # epoch length = one pass of samples
    assert set(counts.values()) == {repeats} and len(counts) == emitted // repeats
    if world >= repeats:  # the copies of one image go to different ranks
        ranks_of = {}
        for (rank, _), samples in reads.items():
            for s in samples:
                ranks_of.setdefault(s, set()).add(rank)
        assert all(len(r) == repeats for r in ranks_of.values())


def test_repeated_augmentation_when_repeats_do_not_divide():
    plans, reads, _ = _epoch([101], 1, 1, 10, repeats=3)  # T = 100, M = 34
    counts = Counter(s for samples in reads.values() for s in samples)
    assert sum(counts.values()) == 100 and Counter(counts.values()) == {3: 32, 2: 2}


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


def test_spares_start_outside_the_used_part_and_cycle():
    plan = TrainPlan(np.asarray([10, 10, 10]), 0, 0, 0, 1, 1, 4)  # uses 28 of 30
    spares = plan.spare_segments(0)
    first = [next(spares) for _ in range(4)]
    assert sum(s.stop - s.start for s in first) >= 30 and all(s.position < 0 for s in first)


def test_shuffle_buffer_is_a_seeded_permutation():
    items = list(range(100))
    a = list(shuffle_buffer(items, 10, random.Random(1)))
    assert sorted(a) == items and a != items
    assert a == list(shuffle_buffer(items, 10, random.Random(1)))
