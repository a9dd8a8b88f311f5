"""Fine-tuning recipe: a pretrained ResNet on a small class-folder dataset, with the model card's defaults.

Entry point for a source checkout: ``accelerate launch recipes/finetune.py ./imgs --model resnet50 --auto``, the
same as ``launcher finetune ./imgs ...``. The recipe itself is ``launcher/recipes/finetune.py``.
"""

import sys

from launcher.finetune.command import main
from launcher.recipes.finetune import RECIPE

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], base=RECIPE))
