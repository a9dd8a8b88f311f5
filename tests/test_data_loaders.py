"""Train/eval loaders end to end on small shard folders written in the shardify format."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from data_shards_helper import decode_index, write_shards

from launcher.data import DataSourceError, build_eval_loader, build_train_loader, open_dataset

PLAIN = dict(auto_augment=None, hflip=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # keeps the colour code intact


def _indices(loader) -> list[list[int]]:
    return [[decode_index(img) for img in images.numpy()] for images, _ in loader]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("toy"), [41, 3, 17], [7, 6], num_classes=4)


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("tex"), [30, 10, 24], num_classes=3, fmt="jpg", noisy=True)


def test_open_dataset_reads_info_and_names_missing_shards(toy, tmp_path):
    ds = open_dataset(str(toy))
    assert (ds.kind, ds.num_classes, ds.num_samples("train"), ds.num_samples("validation")) == ("shards", 4, 61, 13)
    assert ds.has_split("val") and not ds.has_split("test")
    broken = write_shards(tmp_path / "broken", [5, 5])
    os.remove(broken / "toy-train-000001.tar")
    with pytest.raises(DataSourceError, match="toy-train-000001.tar"):
        open_dataset(str(broken))


def test_url_pattern_counts_local_shards_and_requires_counts_for_remote(toy):
    ds = open_dataset(f"{toy}/toy-train-{{000000..000002}}.tar")
    assert ds.kind == "urls" and ds.num_samples("train") == 61 and ds.split("train").lengths.tolist() == [41, 3, 17]
    assert ds.classes == ["c0", "c1", "c2", "c3"]  # from the folder's _info.json
    with pytest.raises(DataSourceError, match="|N"):
        open_dataset("pipe:cat x-{0..3}.tar", classes=4)
    remote = open_dataset("pipe:cat x-{0..3}.tar|100", classes=4)
    assert remote.num_samples("train") == 100 and not remote.split("train").lengths_known
    with pytest.raises(DataSourceError, match="does-not-exist"):
        open_dataset(f"{toy}/does-not-exist-{{0..1}}.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_batches_next_epoch_other_order(toy, workers):
    ds = open_dataset(str(toy))
    make = lambda seed: build_train_loader(ds, rank=0, world_size=1, micro_batch=4, img_size=8, workers=workers,  # noqa: E731
                                           seed=seed, **PLAIN)
    first, again, other_seed = make(0), make(0), make(1)
    epoch0 = _indices(first)
    assert len(epoch0) == len(first) == first.updates_per_epoch == 16  # ceil(61 / 4): every sample at least once
    assert epoch0 == _indices(again)
    assert epoch0[0] != _indices(other_seed)[0]
    first.set_epoch(1)
    epoch1 = _indices(first)
    assert epoch1 != epoch0 and len(epoch1) == len(epoch0)
    labels = [labels for _, labels in first]
    assert all(lab.dtype == torch.int64 for lab in labels)


@pytest.mark.parametrize("workers", [0, 2])
def test_set_start_resumes_bitwise(textured, workers):
    ds = open_dataset(str(textured))
    kwargs = dict(rank=1, world_size=2, micro_batch=2, global_batch=8, img_size=16, workers=workers, seed=3,
                  aug_repeats=2)
    full = build_train_loader(ds, **kwargs)
    full.set_epoch(2)
    reference = [(x.clone(), y.clone()) for x, y in full]
    assert len(reference) == len(full) == 16 and full.accumulation == 2
    resumed = build_train_loader(ds, **kwargs)
    for start in (3, 5, 8):
        resumed.set_epoch(2)
        resumed.set_start(start)
        rest = list(resumed)
        assert len(rest) == len(reference) - 2 * start
        for (x, y), (rx, ry) in zip(rest, reference[2 * start:]):
            assert torch.equal(x, rx) and torch.equal(y, ry)
    assert not torch.equal(reference[0][0], reference[1][0])


def test_workers_start_the_next_epoch_early_and_any_epoch_asked_for_is_exact(textured):
    """Once an epoch is read to its end the workers already make the next one; asking for that epoch uses
    their batches, asking for another (or a start inside it) still gives exactly that epoch's batches."""
    ds = open_dataset(str(textured))
    kwargs = dict(rank=0, world_size=1, micro_batch=4, global_batch=8, img_size=16, seed=5)
    fresh = build_train_loader(ds, workers=0, **kwargs)

    def epoch(loader, number, start=0):
        loader.set_epoch(number)
        loader.set_start(start)
        return [(x.clone(), y.clone()) for x, y in loader]

    expected = {(e, s): epoch(fresh, e, s) for e, s in ((1, 0), (3, 0), (4, 2))}
    loader = build_train_loader(ds, workers=2, early_next_epoch=True, **kwargs)
    epoch(loader, 0)
    assert loader.next_epoch_started
    for (number, start), batches in expected.items():  # epoch 1 as started; epoch 3 and 4 from batch 2 not
        got = epoch(loader, number, start)
        assert len(got) == len(batches) and all(torch.equal(a, b) and torch.equal(la, lb)
                                                for (a, la), (b, lb) in zip(got, batches))
    assert not fresh.next_epoch_started  # in-process loading reads lazily: nothing to start early
    default = build_train_loader(ds, workers=2, **kwargs)
    epoch(default, 0)
    assert default.next_epoch_started == torch.cuda.is_available()  # where the CPU trains, it would compete


def test_eval_counts_each_sample_once_with_two_ranks(toy):
    ds = open_dataset(str(toy))
    seen = []
    for rank in range(2):
        loader = build_eval_loader(ds, rank=rank, world_size=2, batch_size=4, img_size=8, workers=2)
        batches = _indices(loader)
        assert len(batches) == len(loader)
        seen += [i for batch in batches for i in batch]
    assert sorted(seen) == list(range(61, 74))


def test_truncated_shard_is_skipped_with_warning_and_epoch_completes(tmp_path, caplog):
    root = write_shards(tmp_path, [20, 20, 20], num_classes=4)
    shard = root / "toy-train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    ds = open_dataset(str(root))
    with caplog.at_level(logging.WARNING, logger="launcher.data.loaders"):
        loader = build_train_loader(ds, rank=0, world_size=1, micro_batch=4, img_size=8, workers=2, **PLAIN)
        batches = _indices(loader)
    assert len(batches) == len(loader) == 15 and all(len(b) == 4 for b in batches)
    assert len([r for r in caplog.records if "000001" in r.getMessage()]) == 1  # logged once
    assert loader.stats.by_source[str(shard)] >= 1
    assert any("toy-train-000001.tar" in record.getMessage() for record in caplog.records)


def test_folder_source_and_shards_give_the_same_samples(tmp_path):
    from launcher.data.sample_data import make_digits_tree
    from launcher.shardify import shardify

    tree = make_digits_tree(tmp_path / "digits", size=12, per_class=3, image_format="png").root
    shardify(tree, tmp_path / "shards", val_fraction=0.0, min_shards=3, workers=1, progress=False)
    folder, shards = open_dataset(str(tree)), open_dataset(str(tmp_path / "shards"))
    assert folder.kind == "folder" and shards.kind == "shards" and folder.classes == shards.classes

    def keys(ds):
        from launcher.data.plan import Segment
        from launcher.data.readers import read_segments

        split = ds.split("train")
        segments = [Segment(u, 0, int(n), 0) for u, n in enumerate(split.lengths)]
        return sorted((s.key, s.label) for s in read_segments(split, segments, []))

    assert keys(folder) == keys(shards) and len(keys(folder)) == 30
    counts = [sum(len(y) for _, y in build_eval_loader(ds, rank=0, world_size=1, batch_size=7, img_size=8,
                                                         workers=0, split="train")) for ds in (folder, shards)]
    assert counts == [30, 30]
    labels = [sorted(torch.cat([y for _, y in build_eval_loader(ds, rank=0, world_size=1, batch_size=7, img_size=8,
                                                                 workers=0, split="train")]).tolist())
              for ds in (folder, shards)]
    assert labels[0] == labels[1]
    assert np.bincount(labels[0]).tolist() == [3] * 10


def test_streamed_pipe_urls_with_only_a_total_count(toy):
    ds = open_dataset(f"pipe:cat {toy}/toy-train-{{000000..000002}}.tar|61", classes=4)
    assert not ds.split("train").lengths_known  # assumed 21/20/20 per shard; real 41/3/17
    train = build_train_loader(ds, rank=0, world_size=1, micro_batch=4, img_size=8, workers=2, **PLAIN)
    batches = _indices(train)
    assert len(batches) == len(train) == 16 and all(len(b) == 4 for b in batches)
    seen = []
    for rank in range(2):  # unknown counts: whole shards per rank x worker, each sample still once
        seen += [i for b in _indices(build_eval_loader(ds, rank=rank, world_size=2, batch_size=4, img_size=8,
                                                       workers=2, split="train")) for i in b]
    assert sorted(seen) == list(range(61))


def test_tar_reads_seek_to_learned_sample_offsets_and_return_the_same_samples(toy, monkeypatch):
    import tarfile
    from array import array

    from launcher.data.sources import read_tar_samples

    url = str(toy / "toy-train-000000.tar")  # 41 samples, 3 members each (image, cls, json)
    parsed = []
    original = tarfile.TarInfo.fromtarfile.__func__
    monkeypatch.setattr(tarfile.TarInfo, "fromtarfile",
                        classmethod(lambda cls, tar: parsed.append(1) or original(cls, tar)))

    def read(start, stop, offsets):
        parsed.clear()
        samples = [(s.key, s.label, s.data, s.position) for s in read_tar_samples(url, start, stop, 5, [], offsets)]
        return samples, len(parsed)

    plain, plain_headers = read(30, 35, None)
    offsets = array("q")
    learning, learning_headers = read(30, 35, offsets)
    assert learning == plain and learning_headers == plain_headers  # the first read parses what it must
    assert len(offsets) == 36  # the samples it passed, plus the one that ended the range
    seeked, seeked_headers = read(30, 35, offsets)
    assert seeked == plain and seeked_headers < plain_headers / 4  # straight to sample 30's header
    beyond, _ = read(38, None, offsets)  # starts past the known prefix: nearest known, then onward
    assert beyond == read(38, None, None)[0] and len(beyond) == 3 and len(offsets) == 41
    assert [k for k, *_ in read(0, 2, offsets)[0]] == [k for k, *_ in read(0, 2, None)[0]]
