"""ResNet Strikes Back, procedure A2 (300 epochs): ResNet-50 at 79.8% top-1 at 224.

Wightman, Touvron, Jegou, "ResNet strikes back", arXiv:2110.00476, Table 1, column A2.
Run: ``accelerate launch recipes/a2.py --data shards/NAME`` from a checkout, or ``launcher train --recipe a2``;
every field can be overridden, e.g. ``--model resnet101 --epochs 100``; ``--help`` lists them all.
"""

from launcher.config import TrainConfig

RECIPE = TrainConfig(
    recipe="a2",
    model="resnet50",
    epochs=300,
    global_batch=2048,                   # LR below is for this batch; other batches rescale it (sqrt, LAMB)
    lr_ref_batch=2048,
    img_size=224,
    test_img_size=0,                     # evaluated at the train resolution, 224
    crop_pct=0.95,
    interpolation="bicubic",
    opt="lamb",
    lr=5e-3,
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
    auto_augment="rand-m7-mstd0.5-inc1",
    aug_repeats=3,
    drop_path=0.05,
    model_ema=False,
    precision="auto",
)
