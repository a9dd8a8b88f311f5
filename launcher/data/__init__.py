"""Input pipeline: sources (shards / URLs / class folders), equal per-rank batches, RSB augmentations.

    ds = open_dataset("shards/NAME")
    train = build_train_loader(ds, rank=r, world_size=w, global_batch=2048, micro_batch=64, img_size=224,
                               aug_repeats=3)      # the same global batches for any w x micro-batch x workers
    val = build_eval_loader(ds, rank=r, world_size=w, batch_size=128, img_size=224)
    step = BatchTransform(ds.num_classes, mixup_alpha=0.1, cutmix_alpha=1.0)
"""

from launcher.data.batch import BatchTransform
from launcher.data.loaders import EvalLoader, LoaderStats, TrainLoader, build_eval_loader, build_train_loader
from launcher.data.sources import Dataset, DataSourceError, Split, open_dataset
from launcher.data.transforms import EvalTransform, TrainTransform

__all__ = [
    "BatchTransform",
    "Dataset",
    "DataSourceError",
    "EvalLoader",
    "EvalTransform",
    "LoaderStats",
    "Split",
    "TrainLoader",
    "TrainTransform",
    "build_eval_loader",
    "build_train_loader",
    "open_dataset",
]
