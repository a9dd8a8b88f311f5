"""Two real processes (gloo) over 3 shards of very different sizes: same batch counts, no hang."""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
from pathlib import Path

import pytest
from data_shards_helper import write_shards

TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, root: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from launcher.data import build_eval_loader, build_train_loader, open_dataset

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ds = open_dataset(root)
    train = build_train_loader(ds, rank=rank, world_size=world, micro_batch=4, img_size=8, workers=2,
                               auto_augment=None, aug_repeats=3)
    counts = []
    for epoch in range(2):
        train.set_epoch(epoch)
        steps = 0
        for images, _ in train:  # a collective per step, like DDP: unequal counts would hang here
            total = images.float().mean().reshape(1)
            dist.all_reduce(total)
            steps += 1
        counts.append(steps)
    seen = torch.zeros(1)
    for _, labels in build_eval_loader(ds, rank=rank, world_size=world, batch_size=5, img_size=8, workers=2):
        seen += len(labels)
    dist.all_reduce(seen)  # the caller's one collective after eval
    Path(out, f"rank{rank}.json").write_text(json.dumps({"counts": counts, "len": len(train),
                                                         "val_seen": int(seen.item())}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_batches_over_uneven_shards(tmp_path):
    root = write_shards(tmp_path / "shards", [97, 2, 23], [9], num_classes=4)
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
    assert results[0] == results[1]
    assert results[0]["counts"] == [122 // 8] * 2 and results[0]["len"] == 15 and results[0]["val_seen"] == 9
