"""Progress of long work: a tqdm bar on a terminal, periodic one-line logs anywhere else.

A bar redrawn with carriage returns is unreadable in a log file, a CI job or a pipe, and
shows nothing at all when it is disabled; so when the stream is not a terminal,
:func:`progress_bar` prints a line at every ``every_fraction`` of the work and at least every
``every_seconds`` (and one at the end)::

    navigation/moduli: step 1200/6000 (20%), 41 s, eta 164 s

Modes: ``"auto"`` (a bar when the stream is a terminal, else log lines), ``"bar"``,
``"log"`` and ``"off"``; ``True``/``False`` mean ``"auto"``/``"off"``.

Example:
    >>> import io
    >>> stream = io.StringIO()
    >>> with progress_bar(4, desc="runs", unit="run", stream=stream, every_fraction=0.5) as bar:
    ...     for _ in range(4):
    ...         bar.update()
    >>> [line.split(",")[0] for line in stream.getvalue().splitlines()]
    ['runs: run 2/4 (50%)', 'runs: run 4/4 (100%)']
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

from tqdm import tqdm

__all__ = ["PROGRESS_MODES", "LogProgress", "progress_bar", "resolve_mode"]

PROGRESS_MODES = ("auto", "bar", "log", "off")
EVERY_FRACTION = 0.1
EVERY_SECONDS = 30.0


def resolve_mode(mode: bool | str, stream: TextIO) -> str:
    """``"bar"``, ``"log"`` or ``"off"`` for ``mode`` on ``stream``.

    Raises:
        ValueError: ``mode`` is not a bool or one of :data:`PROGRESS_MODES`.
    """
    if isinstance(mode, bool):
        mode = "auto" if mode else "off"
    if mode not in PROGRESS_MODES:
        raise ValueError(f"unknown progress mode {mode!r}; expected one of {', '.join(PROGRESS_MODES)}")
    if mode == "auto":
        isatty = getattr(stream, "isatty", None)
        return "bar" if callable(isatty) and isatty() else "log"
    return mode


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 600 else f"{value / 60:.0f} min"


class LogProgress:
    """The tqdm subset the tasks use (``update``, ``set_postfix``, ``close``), as log lines.

    Args:
        total: units of work.
        desc: prefix of every line (``"<desc>: "``), none when empty.
        initial: units already done (a resumed run); rate and eta count from here.
        unit: the name of a unit (``step``, ``run``).
        stream: where lines go.
        every_fraction: a line each time another such fraction of ``total`` is done.
        every_seconds: a line when this long has passed since the last one.
        clock: seconds, monotonic (a stand-in for tests).
    """

    def __init__(self, total: int, desc: str = "", initial: int = 0, unit: str = "step", stream: TextIO | None = None,
                 every_fraction: float = EVERY_FRACTION, every_seconds: float = EVERY_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0.0 < every_fraction <= 1.0 or every_seconds <= 0:
            raise ValueError(f"need 0 < every_fraction <= 1 and every_seconds > 0, got {every_fraction}, "
                             f"{every_seconds}")
        self.total, self.n, self.initial = int(total), int(initial), int(initial)
        self.desc, self.unit, self.stream = desc, unit, stream if stream is not None else sys.stderr
        self.every_fraction, self.every_seconds, self.clock = every_fraction, every_seconds, clock
        self.started = self.last_time = clock()
        self.last_mark = self._mark(self.n)
        self.printed = self.n  # units done at the last line
        self.postfix: dict[str, Any] = {}
        self.closed = False

    def _mark(self, n: int) -> int:
        """How many ``every_fraction`` steps ``n`` units are past."""
        return int(n / max(1, self.total) / self.every_fraction + 1e-9)

    def line(self) -> str:
        """The current state as one line (what :meth:`update` prints)."""
        elapsed = self.clock() - self.started
        percent = 100 * self.n / self.total if self.total else 100.0
        text = f"{self.unit} {self.n}/{self.total} ({percent:.0f}%), {_seconds(elapsed)}"
        done = self.n - self.initial
        if 0 < done and self.n < self.total:
            text += f", eta {_seconds(elapsed / done * (self.total - self.n))}"
        text += "".join(f", {key} {value}" for key, value in self.postfix.items())
        return f"{self.desc}: {text}" if self.desc else text

    def _print(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last_time = self.clock()
        self.last_mark = self._mark(self.n)
        self.printed = self.n

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units; print a line at a new fraction mark, after ``every_seconds``, or at the end."""
        self.n += n
        if (self._mark(self.n) > self.last_mark or self.n >= self.total
                or self.clock() - self.last_time >= self.every_seconds):
            self._print()

    def set_postfix(self, **values: Any) -> None:
        """Values appended to the following lines (e.g. the latest validation metric)."""
        self.postfix = {key: f"{value:.4g}" if isinstance(value, float) else value for key, value in values.items()}

    def close(self) -> None:
        """A last line when work stopped short of ``total`` (an interruption) after the last line."""
        if not self.closed and self.printed < self.n < self.total:
            self._print()
        self.closed = True

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Silent:
    """``mode="off"``: the same calls, nothing shown."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def progress_bar(total: int, *, desc: str = "", initial: int = 0, unit: str = "step", mode: bool | str = "auto",
                 stream: TextIO | None = None, every_fraction: float = EVERY_FRACTION,
                 every_seconds: float = EVERY_SECONDS, clock: Callable[[], float] = time.monotonic
                 ) -> tqdm | LogProgress | _Silent:
    """A progress display for ``total`` units: tqdm on a terminal, log lines otherwise.

    Args:
        total: units of work.
        desc: what is counted (``"navigation/moduli"``, ``"runs"``).
        initial: units already done.
        unit: the unit's name in log lines.
        mode: ``"auto"``, ``"bar"``, ``"log"``, ``"off"`` (or True = auto, False = off).
        stream: where it is shown (default: stderr).
        every_fraction, every_seconds, clock: log-line rhythm (see :class:`LogProgress`).

    Returns:
        An object with ``update(n)``, ``set_postfix(**values)``, ``close()`` that is a context manager.

    Raises:
        ValueError: an unknown ``mode``.
    """
    stream = stream if stream is not None else sys.stderr
    resolved = resolve_mode(mode, stream)
    if resolved == "bar":
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
    if resolved == "log":
        return LogProgress(total, desc, initial, unit, stream, every_fraction, every_seconds, clock)
    return _Silent()
