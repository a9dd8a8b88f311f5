"""ResNet Strikes Back, procedure A2 (300 epochs): ResNet-50 at 79.8% top-1 at 224.

Entry point for a source checkout: ``accelerate launch recipes/a2.py --data shards/NAME`` (or ``torchrun``, or
plain ``python``). The recipe itself is ``launcher/recipes/a2.py`` (also ``python -m launcher.recipes.a2``).
"""

import sys

from launcher.recipes.a2 import RECIPE
from launcher.train.command import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe(RECIPE))
