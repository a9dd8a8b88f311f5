"""A run folder as the commands after training see it: which checkpoint file a name means.

``launcher evaluate / predict / export`` (and anything else that reads a trained model) accept either
a checkpoint file or a run folder::

    runs/RUN                       -> runs/RUN/checkpoints/best.pt
    runs/RUN --checkpoint last     -> runs/RUN/checkpoints/last.pt (the newest resumable checkpoint)
    runs/RUN --checkpoint step-00001200.pt, or any path

When the file is missing, the error says what was looked for and what the folder tells about why:
not a run folder, a training that has not evaluated or checkpointed yet (still running, or stopped),
a finished run without a validation split (no best.pt), a preempted run.
"""

from __future__ import annotations

import time
from pathlib import Path

from launcher.train.checkpoints import BEST, LAST
from launcher.train.preemption import PREEMPTED_FILE
from launcher.train.tracking import SUMMARY_FILE

CHECKPOINT_CHOICES = ("best", "last")
CHECKPOINTS_DIR = "checkpoints"
# The same two arguments in every command that reads a trained model.
CHECKPOINT_HELP = "a run folder (runs/RUN: its checkpoints/best.pt) or a checkpoint file"
WHICH_HELP = "with a run folder: best (default), last, or a file in RUN/checkpoints/ such as step-00001200.pt"


def resolve_checkpoint(path: str | Path, which: str | None = None) -> Path:
    """The checkpoint file meant by ``path`` (a checkpoint file or a run folder) and ``which``.

    ``which`` (run folders only): ``best`` (the default), ``last``, a file name inside
    ``checkpoints/`` such as ``step-00001200.pt``, or a path. Raises FileNotFoundError (one line,
    naming what was looked for) when there is no such file, ValueError when ``which`` is given
    together with a checkpoint file.
    """
    given = Path(path)
    if given.is_file():
        if which is not None:
            raise ValueError(f"--checkpoint {which} picks a checkpoint inside a run folder, but {given} is "
                             "already a checkpoint file")
        return given
    if not given.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {given} is neither a checkpoint file nor a run folder")
    if given.name == CHECKPOINTS_DIR and not (given / CHECKPOINTS_DIR).is_dir():
        run, folder = given.parent, given
    else:
        run, folder = given, given / CHECKPOINTS_DIR
    choice = which or "best"
    if choice not in CHECKPOINT_CHOICES:
        inside = folder / choice
        for candidate in (inside, Path(choice)):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"checkpoint not found: neither {inside} nor {choice} exists "
                                f"(--checkpoint takes {', '.join(CHECKPOINT_CHOICES)}, a file in {folder} or a path)")
    candidate = folder / (BEST if choice == "best" else LAST)
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"checkpoint not found: {candidate}: {_why_missing(run, folder, choice)}")


def _why_missing(run: Path, folder: Path, choice: str) -> str:
    if not folder.is_dir():
        if not (run / "config.yaml").is_file():
            return f"{run} is not a run folder (no {CHECKPOINTS_DIR}/ and no config.yaml in it)"
        return f"{run} has no {CHECKPOINTS_DIR}/ folder (was it copied without it?)"
    has_last = (folder / LAST).is_file()
    if choice == "last":
        if (folder / BEST).is_file():
            return f"only {BEST} is there; use --checkpoint best"
        return _not_started(run)
    if (run / SUMMARY_FILE).is_file():
        return ("the run finished without any evaluation (no validation split), so it wrote no best.pt; "
                "use --checkpoint last")
    if (run / PREEMPTED_FILE).is_file():
        return "the run was preempted before its first evaluation; resume it (--resume auto), or use --checkpoint last"
    if has_last:
        return (f"no evaluation has finished yet: the training is still running or stopped early ({_log_age(run)}); "
                "--checkpoint last takes the newest weights")
    return _not_started(run)


def _not_started(run: Path) -> str:
    return ("no checkpoint written yet: the training is in its first epoch or stopped before the end of it "
            f"({_log_age(run)})")


def _log_age(run: Path) -> str:
    log = run / "train.log"
    if not log.is_file():
        return f"no {log.name}"
    seconds = max(0.0, time.time() - log.stat().st_mtime)
    if seconds < 120:
        return f"{log.name} last written {seconds:.0f} s ago"
    if seconds < 7200:
        return f"{log.name} last written {seconds / 60:.0f} min ago"
    return f"{log.name} last written {seconds / 3600:.1f} h ago"
