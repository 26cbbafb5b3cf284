"""moduli_transform.tasks.progress: log lines when the stream is not a terminal (counts, percentages,
time and eta), the time rule, the modes, and a bar on a terminal."""

from __future__ import annotations

import io
import re

import pytest
from tqdm import tqdm

from moduli_transform.tasks.progress import LogProgress, progress_bar, resolve_mode


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_log_lines_every_tenth_with_counts_and_eta():
    stream, clock = io.StringIO(), FakeClock()
    with progress_bar(6000, desc="navigation/moduli", stream=stream, clock=clock) as bar:
        assert isinstance(bar, LogProgress)
        for _ in range(6000):
            clock.now += 0.01  # 60 s in all: never 30 s between two tenths
            bar.update()
    lines = _lines(stream)
    assert len(lines) == 10
    assert lines[1] == "navigation/moduli: step 1200/6000 (20%), 12 s, eta 48 s"
    assert [int(re.search(r"step (\d+)/", line).group(1)) for line in lines] == list(range(600, 6001, 600))
    assert lines[-1] == "navigation/moduli: step 6000/6000 (100%), 60 s"  # no eta at the end


def test_slow_work_prints_every_30_seconds_between_marks():
    stream, clock = io.StringIO(), FakeClock()
    bar = progress_bar(20, stream=stream, clock=clock, every_fraction=0.5)
    for _ in range(9):
        clock.now += 10.0
        bar.update()
    assert _lines(stream) == ["step 3/20 (15%), 30 s, eta 170 s", "step 6/20 (30%), 60 s, eta 140 s",
                              "step 9/20 (45%), 90 s, eta 110 s"]
    bar.update(11)
    assert _lines(stream)[-1] == "step 20/20 (100%), 90 s"
    with progress_bar(10, stream=stream, clock=clock, every_fraction=1.0) as long:
        clock.now += 1200.0
        long.update(3)
    assert _lines(stream)[-1] == "step 3/10 (30%), 20 min, eta 47 min"


def test_resumed_work_counts_rate_from_the_initial_units_and_shows_the_postfix():
    stream, clock = io.StringIO(), FakeClock()
    bar = progress_bar(10, initial=5, unit="run", stream=stream, clock=clock, every_fraction=0.5)
    bar.set_postfix(phase="prune", rmse=0.123456)
    clock.now = 4.0
    bar.update(1)  # 6/10: no new half passed, 4 s < 30 s
    assert _lines(stream) == []
    clock.now = 40.0
    bar.update(1)  # 30 s since the start: a line; 2 runs in 40 s, 3 left
    assert _lines(stream) == ["run 7/10 (70%), 40 s, eta 60 s, phase prune, rmse 0.1235"]


def test_interrupted_work_gets_a_last_line_on_close():
    stream = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        with progress_bar(100, stream=stream, clock=FakeClock()) as bar:
            bar.update(13)
            raise KeyboardInterrupt
    assert [line.split(",")[0] for line in _lines(stream)] == ["step 13/100 (13%)"]  # the 10% line, then none more
    stream = io.StringIO()
    with progress_bar(100, stream=stream, clock=FakeClock()) as bar:
        bar.update(10)
        bar.update(5)
    assert [line.split(",")[0] for line in _lines(stream)] == ["step 10/100 (10%)", "step 15/100 (15%)"]


def test_modes():
    assert resolve_mode("auto", io.StringIO()) == "log" and resolve_mode(True, Terminal()) == "bar"
    assert resolve_mode(False, Terminal()) == "off" and resolve_mode("log", Terminal()) == "log"
    with pytest.raises(ValueError, match="unknown progress mode 'loud'; expected one of auto, bar, log, off"):
        resolve_mode("loud", io.StringIO())
    silent = io.StringIO()
    with progress_bar(3, mode="off", stream=silent) as bar:
        bar.update(3)
        bar.set_postfix(loss=1.0)
    assert silent.getvalue() == ""
    terminal = Terminal()
    with progress_bar(3, desc="runs", stream=terminal) as bar:
        assert isinstance(bar, tqdm)
        bar.update(3)
    assert "runs" in terminal.getvalue() and "3/3" in terminal.getvalue()


def test_bad_rhythm_is_refused():
    with pytest.raises(ValueError, match="every_fraction"):
        LogProgress(10, every_fraction=0.0)
