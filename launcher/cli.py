"""`launcher` command: one entry point, one sub-command per job.

Each sub-command lives in its own module and exposes ``main(argv) -> int``; the modules are imported
lazily so `launcher --help` stays fast and a broken optional dependency only breaks its own command.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("launcher.demo", "run the whole product on a small built-in dataset"),
    "shardify": ("launcher.shardify.cli", "class folders -> WebDataset shards (same as the `shardify` command)"),
    "train": ("launcher.train.command", "train with a recipe (a1/a2/a3) or a config file"),
    "finetune": ("launcher.finetune.command", "fine-tune a pretrained ResNet on a small class-folder dataset"),
    "recommend": ("launcher.finetune.modelcards", "dataset-aware advice from the model cards"),
    "evaluate": ("launcher.inference.evaluate", "evaluate a checkpoint: loss, top-1/5, per-class metrics, confusion"),
    "predict": ("launcher.inference.evaluate", "top-k predictions for images or folders"),
    "export": ("launcher.inference.export", "export a checkpoint: safetensors / torchscript / onnx / hf (a timm Hub folder)"),
    "report": ("launcher.inference.report", "one self-contained report.html of a run: curves, confusion, worst images"),
    "weights": ("launcher.models.fetch", "fetch pretrained weights into the caches an offline run reads"),
    "slurm": ("launcher.slurm", "render an sbatch script for nodes / GPUs / partition / recipe"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: launcher COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`launcher COMMAND --help` shows the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from launcher import __version__

        print(f"resnet-launcher {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"launcher: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    from launcher.progress import check_environment

    try:
        check_environment()  # every command shows progress: refuse a bad LAUNCHER_PROGRESS* before any work
    except ValueError as error:
        print(f"launcher: {error}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    # Modules that host several commands (inference: evaluate + predict) expose `<name>_main`.
    entry = getattr(module, f"{name}_main", None) or module.main
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
