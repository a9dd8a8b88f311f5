"""ResNet Strikes Back, procedure A1 (600 epochs): the paper's best ResNet-50, 80.4% top-1 at 224.

Entry point for a source checkout: ``accelerate launch recipes/a1.py --data shards/NAME`` (or ``torchrun``, or
plain ``python``). The recipe itself is ``launcher/recipes/a1.py`` (also ``python -m launcher.recipes.a1``).
"""

import sys

from launcher.recipes.a1 import RECIPE
from launcher.train.command import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe(RECIPE))
