"""Two real processes (gloo), one collective per micro-batch like DDP: the same batch counts on both ranks
(no hang) over shards of very different sizes, fewer shards than readers, a truncated shard and a shard
deleted mid-epoch; and the very global batches a single process sees when nothing is damaged."""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
from pathlib import Path

import pytest
from data_shards_helper import global_batches, shape_loaders, write_shards

TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, root: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    import launcher.data.plan
    from launcher.data import build_eval_loader, build_train_loader, open_dataset

    launcher.data.plan.SHUFFLE_RAWS = 0  # small buffers: readers open shards lazily, so the damage bites mid-epoch
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ds = open_dataset(root)
    train = build_train_loader(ds, rank=rank, world_size=world, micro_batch=2, global_batch=8, img_size=8,
                               workers=2, auto_augment=None)
    counts, first_epoch = [], []
    for epoch in range(2):
        train.set_epoch(epoch)
        steps = 0
        for images, _ in train:  # a collective per step, like DDP: unequal counts would hang here
            total = images.float().mean().reshape(1)
            dist.all_reduce(total)
            steps += 1
            if epoch == 0:
                first_epoch.append(images.clone())
            if epoch == 0 and steps == 4:  # after 2 updates: one shard is cut short, one vanishes (readers that
                # have it open keep reading it; the others, at the latest next epoch, find it gone)
                dist.barrier()
                if rank == 0:
                    Path(root, "toy-train-000002.tar").unlink()
                    shard = Path(root, "toy-train-000003.tar")
                    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
                dist.barrier()
        counts.append(steps)
    torch.save(first_epoch, Path(out, f"rank{rank}.pt"))
    seen = torch.zeros(1)
    for _, labels in build_eval_loader(ds, rank=rank, world_size=world, batch_size=5, img_size=8, workers=2):
        seen += len(labels)
    dist.all_reduce(seen)  # the caller's one collective after eval
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "counts": counts, "len": len(train), "val_seen": int(seen.item()),
        "skipped": sorted(Path(s).name for s in train.stats.by_source)}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_batches_over_uneven_truncated_and_vanishing_shards(tmp_path, monkeypatch):
    import torch

    from launcher.data import open_dataset

    monkeypatch.setattr("launcher.data.plan.SHUFFLE_RAWS", 0)
    root = write_shards(tmp_path / "shards", [97, 2, 23, 40], [9], num_classes=4)  # 4 shards for 8 readers
    reference = global_batches(shape_loaders(open_dataset(str(root)), world=1, micro=8, global_batch=8, workers=0,
                                             img_size=8, auto_augment=None), limit=2)
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, str(root), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.terminate()
    assert not hung, f"ranks did not finish within {TIMEOUT_S}s (data-parallel hang)"
    assert [p.exitcode for p in procs] == [0, 0]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["counts"] for r in results] == [[2 * 21] * 2] * 2  # ceil(162 / 8) updates x 2 micro-batches
    assert results[0]["len"] == results[1]["len"] == 42 and results[0]["val_seen"] == 9
    assert {"toy-train-000002.tar", "toy-train-000003.tar"} <= set(results[0]["skipped"] + results[1]["skipped"])
    # 2 processes x 2 accumulation steps saw the 1-process global batches before the damage
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for update, (images, _) in enumerate(reference):
        together = torch.cat([ranks[r][2 * update + a] for r in range(2) for a in range(2)])
        assert torch.equal(together, images)
