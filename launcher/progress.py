"""Progress that fits where the output goes: a tqdm bar on a terminal, plain periodic lines elsewhere.

A bar redraws itself with carriage returns; in a file (SLURM's output, CI, ``nohup``, ``> log 2>&1``)
every redraw stays, and the log fills with frames nobody can ``tail``. So the mode follows stderr:

* ``bar``: stderr is a terminal - tqdm, as before.
* ``lines``: anything else - no carriage return at all; one plain line with count, rate and ETA every
  ``LAUNCHER_PROGRESS_INTERVAL`` seconds (default 30), and one at the end with the time taken.
  Training writes its own line per log interval instead (:class:`TrainProgress`).
* ``off``: ``--no-progress`` / ``--quiet``.

``LAUNCHER_PROGRESS=auto|bar|lines|off`` forces a mode (e.g. ``lines`` under ``tmux`` logging, ``bar``
under a pseudo-terminal that is not detected as one).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar

MODE_ENV = "LAUNCHER_PROGRESS"
INTERVAL_ENV = "LAUNCHER_PROGRESS_INTERVAL"
MODES = ("auto", "bar", "lines", "off")
DEFAULT_INTERVAL_S = 30.0

T = TypeVar("T")


def forced_mode() -> str:
    """The mode ``LAUNCHER_PROGRESS`` asks for (``auto`` when unset); ValueError names a bad value."""
    value = os.environ.get(MODE_ENV, "").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={os.environ[MODE_ENV]!r} is not one of {', '.join(MODES)}")
    return value


def line_interval() -> float:
    """Seconds between two progress lines (``LAUNCHER_PROGRESS_INTERVAL``); ValueError names a bad value."""
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{INTERVAL_ENV}={text!r} must be a number of seconds >= 0")
    return value


def check_environment() -> None:
    """Raise ValueError now for a bad ``LAUNCHER_PROGRESS*`` value, before any work starts."""
    forced_mode()
    line_interval()


def resolve_mode(enabled: bool = True, stream: TextIO | None = None) -> str:
    """``bar``, ``lines`` or ``off`` for output to ``stream`` (default stderr, where tqdm draws)."""
    if not enabled:
        return "off"
    forced = forced_mode()
    if forced != "auto":
        return forced
    stream = stream if stream is not None else sys.stderr
    if stream is None:  # pythonw, or stderr closed by a daemonizer
        return "off"
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or foreign stream object
        return "lines"


def format_duration(seconds: float | None) -> str:
    """``0:04:05``, ``27:04:05``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _format_rate(per_second: float | None, unit: str) -> str:
    if per_second is None:
        return f"? {unit}/s"
    return f"{per_second:.3g} {unit}/s" if per_second < 100 else f"{per_second:.0f} {unit}/s"


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class ProgressMeter:
    """Counts units of work: a tqdm bar on a terminal, periodic plain lines with rate and ETA elsewhere.

    ``write`` receives each line in lines mode (default: stderr); ``periodic=False`` leaves the
    lines to the caller (:meth:`write_line`), as training does once per log interval.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, initial: int = 0, enabled: bool = True,
                 write: Callable[[str], None] | None = None, periodic: bool = True, leave: bool = True) -> None:
        self.mode = resolve_mode(enabled)
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = self.initial = initial
        self.postfix: dict[str, Any] = {}
        self._write = write or _to_stderr
        self._periodic = periodic
        self._interval = line_interval() if self.mode == "lines" else 0.0
        self._start = self._last_line = time.monotonic()
        self._closed = False
        self._bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave)

    # --- numbers ------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def rate(self) -> float | None:
        """Units per second since this meter started (work done before ``initial`` not counted)."""
        done, elapsed = self.n - self.initial, self.elapsed()
        return done / elapsed if done > 0 and elapsed > 0 else None

    def eta(self, remaining: float | None = None) -> float | None:
        """Seconds for ``remaining`` more units (default: the rest of ``total``) at the rate so far."""
        if remaining is None:
            if self.total is None:
                return None
            remaining = self.total - self.n
        rate = self.rate()
        return max(remaining, 0) / rate if rate else None

    # --- updates ------------------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines" and self._periodic:
            finished = self.total is not None and self.n >= self.total  # close() writes that line
            if not finished and time.monotonic() - self._last_line >= self._interval:
                self.write_line(self.status())

    def set_postfix(self, **values: Any) -> None:
        """Extra fields (``skipped=3``): after the bar on a terminal, at the end of each line elsewhere."""
        self.postfix.update(values)
        if self._bar is not None:
            self._bar.set_postfix(dict(self.postfix))

    def write_line(self, text: str) -> None:
        """One plain line (lines mode only; the bar shows its own numbers)."""
        if self.mode == "lines":
            self._last_line = time.monotonic()
            self._write(text)

    def status(self) -> str:
        """``shardify: 1,200/1,797 img (66%), 410 img/s, ETA 0:00:01, skipped 2``."""
        if self.total:
            count = f"{self.n:,}/{self.total:,} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            count = f"{self.n:,} {self.unit}"
        parts = [count, _format_rate(self.rate(), self.unit)]
        if self.total:
            parts.append(f"ETA {format_duration(self.eta())}")
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        return f"{self.desc}: " + ", ".join(parts)

    def close(self, completed: bool = True) -> None:
        """Close the bar, or write the final line (count, time taken, rate) when the work completed."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self._periodic and completed:
            total = f"/{self.total:,}" if self.total else ""
            extra = "".join(f", {key} {value}" for key, value in self.postfix.items())
            self.write_line(f"{self.desc}: {self.n:,}{total} {self.unit} in {format_duration(self.elapsed())} "
                            f"({_format_rate(self.rate(), self.unit)}){extra}")

    def __enter__(self) -> ProgressMeter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(completed=exc_type is None)


def track(items: Iterable[T], *, total: int | None, desc: str, unit: str = "it", enabled: bool = True,
          write: Callable[[str], None] | None = None) -> Iterator[T]:
    """``for x in track(loader, total=len(loader), desc="evaluate")``: a :class:`ProgressMeter` around a loop."""
    with ProgressMeter(total, desc, unit, enabled=enabled, write=write) as meter:
        for item in items:
            yield item
            meter.update(1)


class TrainProgress:
    """One training epoch: the bar with loss / lr / img/s on a terminal; elsewhere one line per log interval
    with epoch, update and step counts, loss, lr, img/s, the data-wait share and the ETAs of epoch and run.

    The ETAs count optimizer updates at the pace measured since this epoch (or resume) began;
    evaluations and checkpoints between epochs are not in them.
    """

    def __init__(self, *, epoch: int, epochs: int, update: int, updates_per_epoch: int, step: int,
                 max_steps: int = 0, enabled: bool = True, write: Callable[[str], None] | None = None) -> None:
        self.epoch, self.epochs, self.step = epoch, epochs, step
        self.updates_per_epoch = updates_per_epoch
        run_total = epochs * updates_per_epoch
        self.run_total = min(run_total, max_steps) if max_steps else run_total
        self.meter = ProgressMeter(updates_per_epoch, f"epoch {epoch + 1}/{epochs}", "update", initial=update,
                                   enabled=enabled, write=write, periodic=False, leave=False)

    @property
    def mode(self) -> str:
        return self.meter.mode

    def update(self, n: int = 1) -> None:
        self.meter.update(n)
        self.step += n

    def etas(self) -> tuple[float | None, float | None]:
        """(seconds to the end of this epoch, seconds to the end of the run)."""
        run_left = self.run_total - self.step
        epoch_left = min(self.updates_per_epoch - self.meter.n, run_left)
        return self.meter.eta(epoch_left), self.meter.eta(run_left)

    def log(self, *, loss: float, lr: float, img_per_s: float, data_share: float) -> None:
        """The numbers of one log interval; ``data_share`` is the fraction of it spent waiting for data."""
        epoch_eta, run_eta = self.etas()
        if self.meter.mode == "bar":
            self.meter.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_per_s:.0f}",
                                   data=f"{100 * data_share:.0f}%", run_eta=format_duration(run_eta))
        self.meter.write_line(
            f"epoch {self.epoch + 1}/{self.epochs}  update {self.meter.n}/{self.updates_per_epoch}  "
            f"step {self.step}/{self.run_total}  loss {loss:.4f}  lr {lr:.3e}  {img_per_s:.1f} img/s  "
            f"data wait {100 * data_share:.0f}%  ETA epoch {format_duration(epoch_eta)}, run {format_duration(run_eta)}")

    def close(self) -> None:
        self.meter.close()
