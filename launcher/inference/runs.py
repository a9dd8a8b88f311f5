"""A run folder as the report and the Hub export see it: which checkpoint, and the run's own records.

``RUN`` may be the run folder (``runs/NAME``, holding ``checkpoints/``, ``config.yaml``,
``summary.json``, ``metrics.jsonl``) or one checkpoint inside it; the folder's ``best.pt`` is the
default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher.train.runs import CHECKPOINT_CHOICES, resolve_checkpoint

__all__ = ["CHECKPOINT_CHOICES", "RunFiles", "locate_run", "read_json"]



@dataclass
class RunFiles:
    folder: Path
    checkpoint: Path

    @property
    def name(self) -> str:
        return self.folder.resolve().name

    def summary(self) -> dict[str, Any]:
        """summary.json ({} before the run finished, or for a lone checkpoint)."""
        return read_json(self.folder / "summary.json")

    def config(self) -> dict[str, Any]:
        """config.yaml ({} when the checkpoint was copied out of its run folder)."""
        path = self.folder / "config.yaml"
        if not path.is_file():
            return {}
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds no config mapping")
        return data


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    return data if isinstance(data, dict) else {}


def locate_run(run: str | Path, checkpoint: str = "best") -> RunFiles:
    """``run`` (a run folder or a checkpoint file) -> its folder and the checkpoint to use.

    ``checkpoint``: "best" (default), "last", a file in the run's checkpoints/ or a path; resolved by
    :func:`launcher.train.runs.resolve_checkpoint`, so every command names a missing file the same way.
    """
    path = Path(run)
    chosen = resolve_checkpoint(path, checkpoint if path.is_dir() else None)
    folder = chosen.parent.parent if chosen.parent.name == "checkpoints" else chosen.parent
    return RunFiles(folder, chosen)
