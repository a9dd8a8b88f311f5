"""ResNet Strikes Back, procedure A3 (100 epochs, 160 px): ResNet-50 at 78.1% top-1 evaluated at 224.

Entry point for a source checkout: ``accelerate launch recipes/a3.py --data shards/NAME`` (or ``torchrun``, or
plain ``python``). The recipe itself is ``launcher/recipes/a3.py`` (also ``python -m launcher.recipes.a3``).
"""

import sys

from launcher.recipes.a3 import RECIPE
from launcher.train.command import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe(RECIPE))
