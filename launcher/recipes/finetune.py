"""Fine-tuning recipe: a pretrained ResNet on a small class-folder dataset, with the model card's defaults.

ResNet-18 card: batch size 8 (1-128), 1 epoch (1-50), learning rate 5e-5 (1e-5..1e-3), evaluate every
epoch; AdamW, cross-entropy with label smoothing 0.1, light augmentation, early stopping on validation
top-1. `--auto` applies the card's advice for the dataset's size; see docs/finetune.md.
Run: ``launcher finetune ./imgs --model resnet50 --auto``, or from a checkout
``accelerate launch recipes/finetune.py ./imgs ...``.
"""

from launcher.finetune.command import finetune_config

RECIPE = finetune_config("resnet18")
