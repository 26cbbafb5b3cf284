"""Set-up of the worker processes that ``table``, ``reproduce`` and ``demo`` train in.

:func:`start_worker` is each pool's ``initializer``: it applies the toolkit's allocator
setting (:func:`moduli_transform.allocator.reuse_large_blocks`) and, on Linux, asks the
kernel to end the worker when the process that started it ends. Without that, a driver
stopped with ``kill`` (SIGTERM reaches it alone, not its workers) left its workers training
on; a second driver started then trained the same run folders beside them.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

from moduli_transform.allocator import reuse_large_blocks

__all__ = ["die_with_parent", "start_worker"]

_PR_SET_PDEATHSIG = 1   # prctl(2)


def die_with_parent(sig: int = signal.SIGTERM, parent_pid: int | None = None) -> bool:
    """Have this process receive ``sig`` when its parent ends (Linux ``prctl``); returns
    whether that was set. If the parent has already gone, the process ends now: pass the
    ``parent_pid`` that started it to cover a parent that ended before this call (without
    it, the parent seen now is taken as the one to watch).

    The kernel watches the parent *thread* that started this process: the pools here
    start their workers from the thread that submits the runs (the driver's main thread).
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid() if parent_pid is None else parent_pid
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        return False
    if prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:  # pragma: no cover - refused by the kernel
        return False
    if os.getppid() != parent:   # the parent ended before the request took effect
        os.kill(os.getpid(), sig)
    return True


def start_worker() -> None:
    """Pool ``initializer``: the allocator setting, and end with the driver (the driver's
    pid from ``multiprocessing``, so a driver that ended while this worker started counts)."""
    reuse_large_blocks()
    driver = multiprocessing.parent_process()
    die_with_parent(parent_pid=None if driver is None else driver.pid)
