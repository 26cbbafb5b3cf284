"""Keep large freed memory blocks in the process for reuse (glibc), instead of unmapping them.

PyTorch's CPU tensors come from ``malloc``. glibc serves blocks above its mmap threshold
(128 KB, raised at run time up to 32 MB) with a fresh ``mmap`` and unmaps them on free, so
every large tensor a training step makes (activations, their gradients, the next batch) is
paged in again, 4 KB page fault by page fault; a thread other than the main one (the
navigation task's batch producer) allocates from an arena of its own, which returns freed
memory to the system the same way. :func:`reuse_large_blocks` raises the mmap threshold
to 32 MB, keeps up to 256 MB of freed memory mapped, and puts every thread on the main
arena. The navigation benchmark's training step (20 MB tensors, one thread, batches drawn
by a producer thread), three alternating process triples of 12 steps each:

===========================  ==================  =================  ================
glibc setting                page faults / step  system ms / step   step (ms)
===========================  ==================  =================  ================
default                      8,700-11,000        29-39              416, 480, 530
thresholds only              1,700-2,900         20-24              411, 390, 525
thresholds + one arena       0-1,300             0.4-12             399, 386, 493
===========================  ==================  =================  ================

The setting is process-wide, so the toolkit applies it only in processes it owns: the
``moduli-transform`` command and the worker processes of ``table``, ``reproduce`` and
``demo``. A script of your own that trains in-process can call it at its start, before
it starts threads; the same setting for any program is
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456:glibc.malloc.arena_max=1``.
"""

from __future__ import annotations

import ctypes
import platform

__all__ = ["reuse_large_blocks"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8   # glibc's mallopt parameter numbers
_MB = 1 << 20


def reuse_large_blocks(mmap_threshold_mb: int = 32, trim_threshold_mb: int = 256,
                       single_arena: bool = True) -> bool:
    """Serve blocks up to ``mmap_threshold_mb`` from the heap, keep up to
    ``trim_threshold_mb`` of freed heap memory mapped and (``single_arena``) let threads
    started from now on share the main arena; returns whether it took effect (False where
    the C library is not glibc).

    Raises:
        ValueError: a threshold below 1 MB or above 32 MB (glibc's upper limit for the
            mmap threshold on 64-bit systems) for ``mmap_threshold_mb``, or a trim
            threshold smaller than the mmap threshold.
    """
    if not 1 <= mmap_threshold_mb <= 32:
        raise ValueError(f"mmap_threshold_mb must be between 1 and 32 (glibc's limit), got {mmap_threshold_mb!r}")
    if trim_threshold_mb < mmap_threshold_mb:
        raise ValueError(f"trim_threshold_mb ({trim_threshold_mb!r}) must be at least mmap_threshold_mb "
                         f"({mmap_threshold_mb!r}): freed blocks would be trimmed as soon as they are freed")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - a glibc without mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold_mb * _MB)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold_mb * _MB))
    if applied and single_arena:
        applied = bool(mallopt(_M_ARENA_MAX, 1))
    return applied
