"""`launcher train`: run a recipe (a1/a2/a3 or a recipe file) with any field overridden from the command line.

    launcher train --recipe a2 --data shards/NAME --epochs 50
    accelerate launch recipes/a2.py --data shards/NAME          # the same, the recipe file runs itself
    launcher train --config runs/NAME/config.yaml --resume auto  # continue a run from its folder

Exit codes: 0 done, 2 bad setting (one-line error), 74 a checkpoint could not be written (one line naming
the folder and the space needed; the previous checkpoint is intact), 75 preempted (checkpoint written,
resume with ``--resume auto``; see ``launcher.train.loop.PREEMPTED_EXIT_CODE``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from launcher.config import ConfigError, TrainConfig, parse_config

RECIPE_NAMES = ("a1", "a2", "a3")
CHECKPOINT_FAILED_EXIT_CODE = 74  # sysexits.h EX_IOERR: a checkpoint could not be written (e.g. disk full)


def load_recipe(name: str) -> TrainConfig:
    """The ``RECIPE`` of a shipped recipe (a1/a2/a3, from :mod:`launcher.recipes`) or of a recipe file (a path)."""
    if not (name.endswith(".py") or "/" in name):
        if name not in RECIPE_NAMES:
            raise ConfigError(f"recipe {name!r} is unknown: use one of {', '.join(RECIPE_NAMES)} or a path to a .py file")
        module = importlib.import_module(f"launcher.recipes.{name}")
        return module.RECIPE
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"recipe file {path} not found")
    spec = importlib.util.spec_from_file_location(f"_recipe_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recipe = getattr(module, "RECIPE", None)
    if not isinstance(recipe, TrainConfig):
        raise ConfigError(f"recipe file {path} does not define RECIPE = TrainConfig(...)")
    return recipe


def run_recipe(recipe: TrainConfig, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse overrides onto ``recipe``, train, and return the process exit code."""
    from launcher.train.checkpoints import CheckpointError
    from launcher.train.preemption import PREEMPTED_EXIT_CODE, Preempted

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_config(argv, recipe, prog=prog or Path(sys.argv[0]).name)
        from launcher.train.loop import train  # heavy imports only once the command line is valid

        train(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:
        print(f"preempted: {exc}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return CHECKPOINT_FAILED_EXIT_CODE
    except ValueError as exc:
        from launcher.models import WeightsUnavailableError

        if not isinstance(exc, WeightsUnavailableError):
            raise
        print(f"error: {exc}", file=sys.stderr)  # one line: the fetch command and the cache path
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=None)
    known, rest = pre.parse_known_args(argv)
    try:
        base = load_recipe(known.recipe) if known.recipe else TrainConfig()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        print("launcher train --recipe {a1,a2,a3,PATH.py}: start from that recipe (default: plain TrainConfig)\n")
    return run_recipe(base, rest, prog="launcher train")


if __name__ == "__main__":
    sys.exit(main())
