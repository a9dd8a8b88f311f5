"""Write small shard folders in the shardify format (CONTRACTS §1) with exact control over shard sizes.

Images are solid colours that encode the sample index (robust to resizing), so tests can tell which
sample ended up where after augmentation (with auto_augment=None). :func:`global_batches` puts the
micro-batches of all ranks of a shape (:func:`shape_loaders`) back together, to compare shapes.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

CELL = 16


def index_colour(index: int) -> tuple[int, int, int]:
    return (index % CELL) * CELL + 8, (index // CELL % CELL) * CELL + 8, (index // CELL**2) * CELL + 8


def decode_index(image_chw: np.ndarray) -> int:
    """Inverse of :func:`index_colour` from the mean colour of a uint8 [3, H, W] image."""
    r, g, b = (int(round((float(c) - 8) / CELL)) for c in image_chw.reshape(3, -1).mean(axis=1))
    return r + g * CELL + b * CELL**2


def image_bytes(index: int, size: int = 12, fmt: str = "png", noisy: bool = False) -> bytes:
    """A solid colour coding ``index``, or (``noisy``) a seeded random texture of 3x that size."""
    buffer = io.BytesIO()
    if noisy:
        rng = np.random.default_rng(index)
        pixels = rng.integers(0, 256, (size, 4, 3), dtype=np.uint8).repeat(size // 4 * 3, axis=1)
        image = Image.fromarray(pixels.repeat(3, axis=0))
    else:
        image = Image.new("RGB", (size, size + 2), index_colour(index))
    image.save(buffer, format=fmt.upper().replace("JPG", "JPEG"))
    return buffer.getvalue()


def write_split(root: Path, name: str, split: str, sizes: list[int], num_classes: int, first: int = 0,
                fmt: str = "png", noisy: bool = False) -> dict:
    filenames, index = [], first
    for shard, size in enumerate(sizes):
        filename = f"{name}-{split}-{shard:06d}.tar"
        with wds.TarWriter(str(root / filename)) as writer:
            for _ in range(size):
                label = index % num_classes
                writer.write({
                    "__key__": f"{split}_{index:08d}",
                    fmt: image_bytes(index, fmt=fmt, noisy=noisy),
                    "cls": str(label).encode(),
                    "json": json.dumps({"filename": f"c{label}/{index}.{fmt}", "class": f"c{label}",
                                        "label": label, "width": 12, "height": 14}).encode(),
                })
                index += 1
        filenames.append(filename)
    return {"name": split, "num_samples": sum(sizes), "filenames": filenames, "shard_lengths": list(sizes)}


def write_shards(root: Path, train_sizes: list[int], val_sizes: list[int] | None = None, num_classes: int = 4,
                 fmt: str = "png", noisy: bool = False) -> Path:
    """Train samples are indexed 0.., validation samples continue after them."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {"train": write_split(root, "toy", "train", train_sizes, num_classes, 0, fmt, noisy)}
    if val_sizes:
        splits["validation"] = write_split(root, "toy", "validation", val_sizes, num_classes, sum(train_sizes), fmt, noisy)
    classes = [f"c{i}" for i in range(num_classes)]
    (root / "classes.json").write_text(json.dumps(classes))
    (root / "_info.json").write_text(json.dumps({"splits": splits, "classes": classes}))
    return root


def shape_loaders(ds, *, world: int, micro: int, global_batch: int, workers: int, **kwargs) -> list:
    """One train loader per rank of a shape (world size x micro-batch x workers)."""
    from launcher.data import build_train_loader

    return [build_train_loader(ds, rank=rank, world_size=world, micro_batch=micro, global_batch=global_batch,
                               workers=workers, **kwargs) for rank in range(world)]


def global_batches(loaders: list, *, epoch: int = 0, start: int = 0,
                   limit: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batches ``(images, labels)`` the ranks' ``loaders`` see, put together from their micro-batches.

    Checks on the way that every rank yields its full count (``limit`` global batches if given) of
    micro-batches of its micro-batch size.
    """
    per_rank = []
    for loader in loaders:
        loader.set_epoch(epoch)
        loader.set_start(start)
        count = (loader.updates_per_epoch - start if limit is None else limit) * loader.accumulation
        micro_batches = [(x.clone(), y.clone()) for x, y in itertools.islice(loader, count)]
        assert len(micro_batches) == count and all(len(y) == loader.micro_batch for _, y in micro_batches)
        per_rank.append(micro_batches)
    accumulation = loaders[0].accumulation
    batches = []
    for update in range(len(per_rank[0]) // accumulation):
        parts = [mb for rank in per_rank for mb in rank[update * accumulation:(update + 1) * accumulation]]
        batches.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    return batches


def indices(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[list[int]]:
    """The sample index each image of each batch encodes (solid-colour shards, no colour-changing augmentation)."""
    return [[decode_index(image) for image in images.numpy()] for images, _ in batches]
