"""ResNet Strikes Back, procedure A3 (100 epochs, 160 px): ResNet-50 at 78.1% top-1 evaluated at 224.

Wightman, Touvron, Jegou, "ResNet strikes back", arXiv:2110.00476, Table 1, column A3.
Trains at 160 px and, as the paper reports, is also evaluated at 224 px (crop 0.95).
Run: ``accelerate launch recipes/a3.py --data shards/NAME`` from a checkout, or ``launcher train --recipe a3``;
every field can be overridden, e.g. ``--model resnet18 --epochs 10``; ``--help`` lists them all.
"""

from launcher.config import TrainConfig

RECIPE = TrainConfig(
    recipe="a3",
    model="resnet50",
    epochs=100,
    global_batch=2048,                   # LR below is for this batch; other batches rescale it (sqrt, LAMB)
    lr_ref_batch=2048,
    img_size=160,                        # train resolution
    test_img_size=224,                   # the paper's test resolution for A3
    crop_pct=0.95,
    interpolation="bicubic",
    opt="lamb",
    lr=8e-3,
    weight_decay=0.02,
    warmup_epochs=5,
    warmup_lr=1e-4,
    min_lr=1e-6,
    sched_on_updates=False,
    loss="bce",
    bce_target_thresh=0.2,
    smoothing=0.0,
    mixup=0.1,
    cutmix=1.0,
    auto_augment="rand-m6-mstd0.5-inc1",
    aug_repeats=0,                       # no repeated augmentation in A3
    drop_path=0.0,                       # no stochastic depth in A3
    model_ema=False,
    precision="auto",
)
