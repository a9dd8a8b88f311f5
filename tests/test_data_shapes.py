"""One run, any shape: the global batches (samples, slots, augmented pixels) do not depend on the world size,
the accumulation steps or the loader workers; resuming on another shape continues them exactly."""

from __future__ import annotations

import collections
import itertools

import pytest
import torch
import webdataset as wds
from data_shards_helper import global_batches, indices, shape_loaders, write_shards

from launcher.data import build_train_loader, open_dataset
from launcher.data.plan import EpochPlan

PLAIN = dict(img_size=8, auto_augment=None, hflip=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # keeps the colour code
# (world size, micro-batch, workers) for global batch 8: accumulation 2, 1, 1, 4, 2, 1
SHAPES_8 = [(1, 4, 0), (2, 4, 1), (2, 4, 3), (1, 2, 2), (4, 1, 1), (8, 1, 0)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("toy"), [41, 3, 17], num_classes=4)


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("tex"), [30, 10, 24], num_classes=3, fmt="jpg", noisy=True)


def _equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, rx) and torch.equal(y, ry) for (x, y), (rx, ry) in zip(a, b))


def _sample_index(lengths: list[int], plan: EpochPlan, p: int) -> int:
    """The helper's sample index at epoch position ``p`` (shards hold consecutive indices)."""
    stream = [sum(lengths[:u]) + i for u in plan.unit_order() for i in range(lengths[u])]
    return stream[(plan.offset + p) % len(stream)]


def _run(ds, shape: tuple[int, int, int], global_batch: int, **kwargs) -> list:
    world, micro, workers = shape
    return global_batches(shape_loaders(ds, world=world, micro=micro, global_batch=global_batch, workers=workers,
                                        **kwargs))


def test_same_global_batches_for_every_world_size_accumulation_and_worker_count(toy):
    ds = open_dataset(str(toy))
    reference = shape_loaders(ds, world=1, micro=8, global_batch=8, workers=0, **PLAIN)
    shapes = [shape_loaders(ds, world=w, micro=m, global_batch=8, workers=n, **PLAIN) for w, m, n in SHAPES_8]
    epochs = []
    for epoch in (0, 1):
        expected = global_batches(reference, epoch=epoch)
        assert len(expected) == 8  # ceil(61 / 8)
        for (world, micro, workers), loaders in zip(SHAPES_8, shapes):
            assert _equal(global_batches(loaders, epoch=epoch), expected), (epoch, world, micro, workers)
        epochs.append(indices(expected))
    assert epochs[0] != epochs[1]  # another order next epoch
    counts = collections.Counter(i for batch in epochs[0] for i in batch)
    assert sorted(counts) == list(range(61))  # every sample at least once ...
    plan = EpochPlan(ds.split("train").lengths, 0, 0, 8)
    filler = {_sample_index([41, 3, 17], plan, p) for p in range(61, 64)}  # ... and 3 wrap around to the start
    assert {i for i, n in counts.items() if n == 2} == filler and max(counts.values()) == 2


def test_augmented_pixels_are_identical_on_real_digits_across_shapes(digits_shards):
    """RandAugment, crop and flip on real scans: bitwise equal batches, including an epoch's wrap-around end."""
    ds = open_dataset(str(digits_shards))
    kwargs = dict(global_batch=16, img_size=32, auto_augment="rand-m7-mstd0.5-inc1", seed=5)
    updates = -(-ds.num_samples("train") // 16)
    shapes = [shape_loaders(ds, world=w, micro=m, workers=n, **kwargs)
              for w, m, n in [(1, 8, 0), (2, 8, 2), (4, 2, 1)]]  # accumulation 2, 1, 2
    for epoch, start in ((0, 0), (1, updates - 2)):
        runs = [global_batches(loaders, epoch=epoch, start=start, limit=2) for loaders in shapes]
        assert all(_equal(run, runs[0]) for run in runs[1:]), (epoch, start)
        assert not torch.equal(runs[0][0][0], runs[0][1][0])


def test_set_start_on_another_shape_yields_the_rest_of_the_uninterrupted_run(textured):
    ds = open_dataset(str(textured))
    kwargs = dict(global_batch=8, img_size=16, seed=3)
    reference = global_batches(shape_loaders(ds, world=1, micro=4, workers=0, **kwargs), epoch=2)
    assert len(reference) == 8
    for start, (world, micro, workers) in ((3, (2, 2, 2)), (5, (4, 2, 1)), (8, (2, 4, 0))):
        loaders = shape_loaders(ds, world=world, micro=micro, workers=workers, **kwargs)
        assert _equal(global_batches(loaders, epoch=2, start=start), reference[start:]), (start, world)


@pytest.mark.parametrize("world,micro", [(3, 4), (1, 12), (6, 2)])
def test_repeated_copies_share_a_global_batch_on_different_ranks(tmp_path_factory, world, micro):
    lengths = [40, 9, 23]
    ds = open_dataset(str(write_shards(tmp_path_factory.mktemp("rep"), lengths, num_classes=4)))
    batches = indices(_run(ds, (world, micro, 2), 12, aug_repeats=3, **PLAIN))
    assert len(batches) == 6  # epoch length = ceil(72 / 12) whatever the repeats
    for batch in batches:  # slots q, q + 4, q + 8 (G / R apart): on 3 different ranks when world >= 3
        assert batch[0:4] == batch[4:8] == batch[8:12]
    counts = collections.Counter(i for batch in batches for i in batch)
    assert set(counts.values()) == {3} and len(counts) == 24  # a third of the data, each sample 3 times


def test_pinned_ring_gives_the_same_batches_and_keeps_each_valid_for_two_more(toy):
    """``pin_memory``: slices assembled in a ring of 3 buffers (plain memory without a GPU, same code path)."""
    ds = open_dataset(str(toy))
    plain = build_train_loader(ds, rank=0, world_size=2, micro_batch=2, global_batch=8, workers=2, **PLAIN)
    ring = build_train_loader(ds, rank=0, world_size=2, micro_batch=2, global_batch=8, workers=2, pin_memory=True,
                              **PLAIN)
    expected = [(x.clone(), y.clone()) for x, y in plain]
    held = []  # the tensors as yielded, not copies
    for index, (x, y) in enumerate(ring):
        assert torch.equal(x, expected[index][0]) and torch.equal(y, expected[index][1])
        held.append((x, y))
        oldest = max(0, index // 2 - 2) * 2  # micro-batches of the global batch two before this one
        assert all(torch.equal(hx, expected[i][0]) for i, (hx, _) in enumerate(held[oldest:], oldest))
    assert len(held) == len(expected) == 16


def test_workers_are_clamped_to_the_rank_slots(toy):
    loader = build_train_loader(open_dataset(str(toy)), rank=1, world_size=2, micro_batch=2, global_batch=8,
                                workers=9, **PLAIN)
    assert loader.workers == 4 and loader.accumulation == 2 and len(loader) == 16


@pytest.mark.parametrize("max_readers", [256, 2])  # chunk 1 (stand-in: the reader's next output) or chunk 4
def test_undecodable_sample_is_replaced_the_same_way_on_every_shape(tmp_path, monkeypatch, max_readers):
    monkeypatch.setattr("launcher.data.plan.MAX_READERS", max_readers)
    root = write_shards(tmp_path, [12, 9], num_classes=4)
    intact = indices(_run(open_dataset(str(root)), (1, 8, 0), 8, **PLAIN))
    where = [(b, q) for b, batch in enumerate(intact) for q, i in enumerate(batch) if i == 5]
    tar = root / "toy-train-000000.tar"
    samples = list(wds.WebDataset(str(tar), shardshuffle=False))
    samples[5]["png"] = b"this is not an image"
    with wds.TarWriter(str(tar)) as writer:
        for sample in samples:
            writer.write({k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"})
    ds = open_dataset(str(root))
    runs, skipped = [], []
    for world, micro, workers in [(1, 8, 0), (2, 4, 2), (4, 2, 3), (1, 4, 1)]:
        loaders = shape_loaders(ds, world=world, micro=micro, global_batch=8, workers=workers, **PLAIN)
        runs.append(global_batches(loaders))
        skipped.append(sum(loader.stats.skipped for loader in loaders))
        assert all("undecodable sample c1/5.png" in r for loader in loaders for r in loader.stats.reasons)
    assert all(_equal(run, runs[0]) for run in runs[1:])
    assert where and skipped == [len(where)] * 4  # counted once per slot it was planned for
    batches = indices(runs[0])
    assert 5 not in itertools.chain(*batches)
    chunk = EpochPlan(ds.split("train").lengths, 0, 0, 8).chunk
    for b, q in where:  # the stand-in: the chunk's nearest output, or (chunk 1) the reader's next output
        if chunk > 1:
            assert batches[b][q] == batches[b][q - 1 if q % chunk else q + 1]
        elif b + 1 < len(batches):
            assert batches[b][q] == batches[b + 1][q]
    others = [(b, q) for b in range(len(intact)) for q in range(8) if (b, q) not in where]
    assert all(batches[b][q] == intact[b][q] for b, q in others)  # nothing else moved


def test_unreadable_or_undecodable_data_everywhere_is_a_clear_error(tmp_path):
    root = write_shards(tmp_path / "cut", [6, 6], num_classes=2)
    for shard in root.glob("*.tar"):  # a valid first header, then nothing
        shard.write_bytes(shard.read_bytes()[:1024])
    loader = build_train_loader(open_dataset(str(root)), rank=0, world_size=1, micro_batch=4, workers=0, **PLAIN)
    with pytest.raises(RuntimeError, match="no readable samples left in split 'train'"):
        list(loader)
    root = write_shards(tmp_path / "junk", [6, 6], num_classes=2)
    for shard in root.glob("*.tar"):
        samples = list(wds.WebDataset(str(shard), shardshuffle=False))
        with wds.TarWriter(str(shard)) as writer:
            for sample in samples:
                writer.write({"__key__": sample["__key__"], "png": b"not an image", "cls": sample["cls"]})
    loader = build_train_loader(open_dataset(str(root)), rank=0, world_size=1, micro_batch=4, workers=0, **PLAIN)
    with pytest.raises(RuntimeError, match="1000 undecodable samples in a row"):
        list(loader)


def test_equal_batch_counts_with_uneven_shards_fewer_shards_than_readers_and_a_truncated_one(tmp_path):
    root = write_shards(tmp_path, [97, 2, 23, 30], num_classes=4)  # 4 shards, 16 readers
    shard = root / "toy-train-000003.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    ds = open_dataset(str(root))
    runs = [_run(ds, shape, 16, **PLAIN) for shape in [(1, 8, 0), (2, 8, 2), (4, 2, 1)]]
    assert len(runs[0]) == -(-152 // 16) and all(_equal(run, runs[0]) for run in runs[1:])
    seen = set(itertools.chain(*indices(runs[0])))
    assert set(range(122)) <= seen and seen - set(range(122)) < set(range(122, 152))  # the truncated tail is lost
    loader = build_train_loader(ds, rank=0, world_size=1, micro_batch=8, global_batch=16, workers=2, **PLAIN)
    assert len(list(loader)) == len(loader) == 20
    assert loader.stats.by_source[str(shard)] >= 1 and all("000003" in r for r in loader.stats.reasons)


def test_bad_shapes_are_one_line_errors(toy):
    ds = open_dataset(str(toy))
    with pytest.raises(ValueError, match=r"global_batch=12 is not divisible by micro_batch=4 x world_size=2 = 8"):
        build_train_loader(ds, rank=0, world_size=2, micro_batch=4, global_batch=12, **PLAIN)
    with pytest.raises(ValueError, match=r"61 samples, fewer than one global batch \(64\)"):
        build_train_loader(ds, rank=0, world_size=2, micro_batch=4, global_batch=64, **PLAIN)
    loader = build_train_loader(ds, rank=0, world_size=2, micro_batch=4, global_batch=16, **PLAIN)
    with pytest.raises(ValueError, match=r"start update 5 outside \[0, 4\]"):
        loader.set_start(5)
