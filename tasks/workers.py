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
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from moduli_transform.allocator import reuse_large_blocks

__all__ = ["die_with_parent", "start_worker", "spread_over_gpus", "pool_options", "training_pool"]

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


def start_worker(gpu_slots: Any = None) -> None:
    """Pool ``initializer``: the allocator setting, and end with the driver (the driver's
    pid from ``multiprocessing``, so a driver that ended while this worker started counts).

    ``gpu_slots`` (a queue of GPU indices, :func:`pool_options`): this worker takes one and
    makes it its current CUDA device, so its runs' ``"cuda"`` resolves to it."""
    reuse_large_blocks()
    driver = multiprocessing.parent_process()
    die_with_parent(parent_pid=None if driver is None else driver.pid)
    if gpu_slots is not None:
        import torch

        torch.cuda.set_device(gpu_slots.get(timeout=120))


def spread_over_gpus(device_name: str, jobs: int, gpus: int) -> list[int]:
    """The GPU of each of a pool's ``jobs`` workers, in turn over the ``gpus`` visible, when
    ``device_name`` asks for CUDA without naming a GPU (``cuda``, or ``auto`` on a GPU machine)
    and there are several workers and GPUs; else ``[]`` (every worker on the device asked for).

    Example:
        >>> spread_over_gpus("cuda", 3, 2), spread_over_gpus("cuda:1", 3, 2), spread_over_gpus("auto", 1, 4)
        ([0, 1, 0], [], [])
    """
    if device_name.strip() not in ("cuda", "auto") or jobs < 2 or gpus < 2:
        return []
    return [worker % gpus for worker in range(jobs)]


def pool_options(device_name: str, resolved: "torch.device", jobs: int, context: Any) -> tuple[dict[str, Any], str]:
    """``ProcessPoolExecutor`` keyword arguments for a pool of ``jobs`` training workers, and
    the device each run is to name: the workers spread over the visible GPUs
    (:func:`spread_over_gpus`, each run then naming ``"cuda"``, its worker's GPU), or all on
    ``resolved``. Before, every worker of ``table --jobs 4 --device cuda`` trained on GPU 0."""
    import torch

    gpus = torch.cuda.device_count() if resolved.type == "cuda" else 0
    slots = spread_over_gpus(str(device_name), jobs, gpus)
    if not slots:
        return {"initializer": start_worker}, str(resolved)
    queue = context.Queue()
    for index in slots:
        queue.put(index)
    return {"initializer": start_worker, "initargs": (queue,)}, "cuda"


def training_pool(device_name: str, resolved: "torch.device", jobs: int) -> tuple[ProcessPoolExecutor, str]:
    """A pool of ``jobs`` training workers for runs on ``resolved`` (``device_name`` as the user
    gave it), started the safe way for that device and spread over its GPUs
    (:func:`pool_options`), and the device each run is to name."""
    from moduli_transform.device import process_context

    context = process_context(resolved)
    options, run_device = pool_options(device_name, resolved, jobs, context)
    return ProcessPoolExecutor(max_workers=jobs, mp_context=context, **options), run_device
