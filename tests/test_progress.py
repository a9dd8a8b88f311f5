"""launcher.progress: a bar on a terminal, plain lines with ETAs in a log file, nothing when switched off."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

import launcher.progress as progress
from launcher.progress import ProgressMeter, TrainProgress, format_duration, resolve_mode, track


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(progress, "time", fake)
    return fake


@pytest.fixture(autouse=True)
def no_forced_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(progress.MODE_ENV, raising=False)
    monkeypatch.delenv(progress.INTERVAL_ENV, raising=False)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_follows_the_stream_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "job.out", "w") as log_file:
        assert resolve_mode(True, log_file) == "lines"
    assert resolve_mode(True, Terminal()) == "bar"
    assert resolve_mode(False, Terminal()) == "off"
    monkeypatch.setenv(progress.MODE_ENV, "lines")
    assert resolve_mode(True, Terminal()) == "lines"
    monkeypatch.setenv(progress.MODE_ENV, "BAR")
    assert resolve_mode(True, io.StringIO()) == "bar"
    assert resolve_mode(False, io.StringIO()) == "off"  # --no-progress / --quiet still wins
    monkeypatch.setenv(progress.MODE_ENV, "fancy")
    with pytest.raises(ValueError, match="LAUNCHER_PROGRESS='fancy' is not one of auto, bar, lines, off"):
        resolve_mode(True, io.StringIO())


def test_a_line_every_interval_and_a_final_line(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(progress.MODE_ENV, "lines")
    lines: list[str] = []
    with ProgressMeter(400, "shardify", "img", write=lines.append) as meter:  # default: every 30 s
        for _ in range(400):
            clock.now += 0.25  # 4 img/s
            meter.update(1)
            if meter.n == 200:
                meter.set_postfix(skipped=1)
    assert lines == ["shardify: 120/400 img (30%), 4 img/s, ETA 0:01:10",
                     "shardify: 240/400 img (60%), 4 img/s, ETA 0:00:40, skipped 1",
                     "shardify: 360/400 img (90%), 4 img/s, ETA 0:00:10, skipped 1",
                     "shardify: 400/400 img in 0:01:40 (4 img/s), skipped 1"]  # no second line at 100%
    assert not any("\r" in line for line in lines)
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    lines.clear()
    with ProgressMeter(3, "verify", "shard", write=lines.append) as meter:
        for _ in range(3):
            clock.now += 1
            meter.update(1)
    assert lines == ["verify: 1/3 shard (33%), 1 shard/s, ETA 0:00:02", "verify: 2/3 shard (67%), 1 shard/s, "
                     "ETA 0:00:01", "verify: 3/3 shard in 0:00:03 (1 shard/s)"]


def test_an_error_inside_the_loop_writes_no_final_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(progress.MODE_ENV, "lines")
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")  # a line after every item
    lines: list[str] = []
    with pytest.raises(KeyError):
        for index in track(range(100), total=100, desc="evaluate", unit="batch", write=lines.append):
            if index == 5:
                raise KeyError(index)
    assert len(lines) == 5 and not any(" in " in line for line in lines)  # progress lines only, no "done" line
    assert list(track(range(3), total=3, desc="x", enabled=False, write=lines.append)) == [0, 1, 2]
    assert len(lines) == 5  # off: nothing written


def test_bar_on_a_terminal_writes_no_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    lines: list[str] = []
    with ProgressMeter(5, "verify", "shard", write=lines.append) as meter:
        assert meter.mode == "bar"
        for _ in range(5):
            meter.update(1)
    assert lines == [] and "\r" in terminal.getvalue() and "verify" in terminal.getvalue()


def test_training_line_has_the_numbers_and_both_etas(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Epoch 2 of 3 (10 updates each), resumed at update 2: 4 updates in 8 s -> 2 s per update."""
    monkeypatch.setenv(progress.MODE_ENV, "lines")
    lines: list[str] = []
    bar = TrainProgress(epoch=1, epochs=3, update=2, updates_per_epoch=10, step=12, write=lines.append)
    for _ in range(4):
        clock.now += 2.0
        bar.update(1)
    bar.log(loss=0.6789, lr=2.5e-4, img_per_s=123.4, data_share=0.125)
    bar.close()
    assert lines == ["epoch 2/3  update 6/10  step 16/30  loss 0.6789  lr 2.500e-04  123.4 img/s  data wait 12%  "
                     "ETA epoch 0:00:08, run 0:00:28"]
    # --max-train-steps ends the run inside this epoch: both ETAs stop there
    limited = TrainProgress(epoch=1, epochs=3, update=2, updates_per_epoch=10, step=12, max_steps=14,
                            write=lines.append)
    clock.now += 2.0
    limited.update(1)
    assert limited.etas() == (2.0, 2.0)


def test_training_off_on_other_ranks_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(progress.MODE_ENV, "lines")
    lines: list[str] = []
    bar = TrainProgress(epoch=0, epochs=1, update=0, updates_per_epoch=2, step=0, enabled=False, write=lines.append)
    bar.update(2)
    bar.log(loss=1.0, lr=1e-3, img_per_s=1.0, data_share=0.0)
    bar.close()
    assert lines == [] and bar.mode == "off"


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 59.6, 3599, 3600 * 27 + 65, None, float("inf"))] == \
        ["0:00:00", "0:01:00", "0:59:59", "27:01:05", "?", "?"]
    assert re.fullmatch(r"\d+:\d\d:\d\d", format_duration(12345.6))


@pytest.mark.parametrize("command", [["evaluate", "run"], ["predict", "run", "images"], ["export", "run"]])
def test_commands_refuse_a_bad_progress_setting_first(command: list[str], monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from launcher.cli import main as launcher_main
    from launcher.shardify.cli import main as shardify_main

    monkeypatch.setenv(progress.MODE_ENV, "tty")
    assert launcher_main(command) == 2
    assert capsys.readouterr().err == "launcher: LAUNCHER_PROGRESS='tty' is not one of auto, bar, lines, off\n"
    assert shardify_main(["verify", "nowhere"]) == 2
    assert "shardify: error: LAUNCHER_PROGRESS='tty'" in capsys.readouterr().err
