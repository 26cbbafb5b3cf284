"""How busy this machine's cores were with other work while a benchmark measured.

A process sharing a benchmark's CPU preempts a call of a few milliseconds for a whole
scheduler slice (2.3-3.6x at the median, docs/BENCHMARKS.md "Busy cores"), and a neighbour
on another CPU shares the cache and the memory bus (7-30%). :func:`watch` reads the
kernel's per-CPU counters (``/proc/stat``) around a block and subtracts the CPU time of this
process and of the children it waited for, so what is left is the other processes' share
of the CPUs this process may use. ``steal`` is the hypervisor's: time a virtual CPU was
ready but the host ran another guest, which no process in this machine can see otherwise.

Linux only: elsewhere (no ``/proc/stat``) :func:`watch` yields a :class:`CoreLoad` whose
fields stay ``None``.

Example:
    >>> with watch() as load:
    ...     pass
    >>> load.seconds is not None and load.seconds >= 0.0
    True
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BUSY_WARNING", "CoreLoad", "cpu_ticks", "watch"]

STAT = Path("/proc/stat")
BUSY_WARNING = 0.10   # share of the CPUs' time above which a benchmark warns
# /proc/stat's per-CPU fields: user nice system idle iowait irq softirq steal (guest is in user)
_BUSY_FIELDS = (0, 1, 2, 5, 6)
_STEAL_FIELD = 7


@dataclass
class CoreLoad:
    """Filled in when the :func:`watch` block ends; ``None`` where it could not be measured.

    ``others``: share of the watched CPUs' time (0..1) that other processes were running;
    ``steal``: share the hypervisor gave to other guests; ``seconds``: the block's wall time;
    ``cpus``: the CPUs watched (this process's affinity mask).
    """

    others: float | None = None
    steal: float | None = None
    seconds: float | None = None
    cpus: tuple[int, ...] = ()


def cpu_ticks(cpus: tuple[int, ...], stat: Path = STAT) -> tuple[int, int] | None:
    """``(busy, steal)`` clock ticks summed over ``cpus`` since boot, or None without ``stat``."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{cpu}" for cpu in cpus}
    busy = steal = 0
    for line in lines:
        name, *values = line.split()
        if name in wanted:
            fields = [int(v) for v in values]
            busy += sum(fields[i] for i in _BUSY_FIELDS if i < len(fields))
            steal += fields[_STEAL_FIELD] if len(fields) > _STEAL_FIELD else 0
    return busy, steal


def _own_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _usable_cpus() -> tuple[int, ...]:
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))   # pragma: no cover - not Linux


@contextlib.contextmanager
def watch(stat: Path = STAT) -> Iterator[CoreLoad]:
    """Measure the other processes' share of this process's CPUs during the block.

    Run the measured work in this process or in children it waits for (``subprocess.run``):
    their CPU time is what is subtracted. The shares are of the watched CPUs' whole time, so
    one other process spinning on one of two CPUs reads 0.5.
    """
    load = CoreLoad(cpus=_usable_cpus())
    ticks_per_second = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    before = cpu_ticks(load.cpus, stat)
    own_before, start = _own_seconds(), time.monotonic()
    try:
        yield load
    finally:
        load.seconds = time.monotonic() - start
        after = cpu_ticks(load.cpus, stat)
        if before is not None and after is not None and load.seconds > 0:
            capacity = load.seconds * len(load.cpus)
            busy = (after[0] - before[0]) / ticks_per_second
            own = _own_seconds() - own_before
            # counters tick at 1/100 s: clamp the rounding on either side into 0..1
            load.others = min(1.0, max(0.0, (busy - own) / capacity))
            load.steal = min(1.0, max(0.0, (after[1] - before[1]) / ticks_per_second / capacity))
