"""A run folder as the report and the Hub export see it: which checkpoint, and the run's own records.

``RUN`` may be the run folder (``runs/NAME``, holding ``checkpoints/``, ``config.yaml``,
``summary.json``, ``metrics.jsonl``) or one checkpoint inside it; the folder's ``best.pt`` is the
default, ``last.pt`` when no validation ever produced a best.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CHECKPOINT_CHOICES = ("best", "last")


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

    ``checkpoint``: "best" (default; falls back to last.pt when the run has no best.pt), "last", or a path.
    """
    path = Path(run)
    if path.is_file():
        folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return RunFiles(folder, path)
    if not path.is_dir():
        raise FileNotFoundError(f"no such run folder or checkpoint: {path}")
    if checkpoint not in CHECKPOINT_CHOICES:
        chosen = Path(checkpoint)
        if not chosen.is_file():
            raise FileNotFoundError(f"checkpoint not found: {chosen} (use best, last or a file)")
        return RunFiles(path, chosen)
    folder = path / "checkpoints"
    if not folder.is_dir():
        raise FileNotFoundError(f"{path} is not a run folder: it has no checkpoints/ (pass a run folder such as "
                                f"runs/NAME, or a checkpoint file)")
    order = ["best", "last"] if checkpoint == "best" else ["last"]
    for stem in order:
        if (folder / f"{stem}.pt").is_file():
            return RunFiles(path, folder / f"{stem}.pt")
    raise FileNotFoundError(f"{folder} has no {' or '.join(f'{stem}.pt' for stem in order)}")
