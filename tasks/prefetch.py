"""Draw training batches ahead of the training loop, in a background thread, bit-exactly.

Tasks whose batches depend on the random generator alone (``Task.prefetch_batches``) can
draw batch k+1 while the model trains on batch k. The navigation task's random walks and
place-cell codes are about a fifth of a training step; drawn in series they add to every
step, drawn ahead they overlap with the forward and backward passes (PyTorch releases the
GIL inside its kernels).

Bit-exact: the producer draws from its own copy of the generator and hands each batch over
with the generator state after it. Taking a batch sets the loop's generator to that state,
so the loop's generator always says "these batches were consumed", whatever the producer
has drawn ahead. A checkpoint saves that state; a resumed run starts a new producer from
it and draws the same batches an uninterrupted run would.

Example:
    >>> generator = torch.Generator().manual_seed(0)
    >>> with BatchPrefetcher(lambda g: torch.rand(2, generator=g), generator) as batches:
    ...     first = batches.next()
    >>> bool(torch.equal(first, torch.rand(2, generator=torch.Generator().manual_seed(0))))
    True
    >>> reference = torch.Generator().manual_seed(0)
    >>> expected = torch.rand(2, generator=reference)
    >>> bool(torch.equal(generator.get_state(), reference.get_state()))
    True
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable

import torch

__all__ = ["BatchPrefetcher"]

_STOP = object()


def _lower_priority_of_this_thread() -> None:
    """Nice the calling thread (Linux: priorities are per thread) so that, when the cores are all
    taken by the training step's own threads, drawing ahead takes only what they leave idle."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not permitted: the thread keeps its priority
        pass


class BatchPrefetcher:
    """Batches of ``draw(generator)`` drawn ``depth`` ahead in a daemon thread.

    ``next()`` returns them in the order a loop calling ``draw(generator)`` would get
    them, and leaves ``generator`` in the state that loop would leave it in. An error
    raised by ``draw`` is raised again by the ``next()`` that would have returned its
    batch. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, draw: Callable[[torch.Generator], Any], generator: torch.Generator, depth: int = 1) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1; got {depth}")
        self.generator = generator
        self._draw = draw
        self._private = torch.Generator(device=generator.device)
        self._private.set_state(generator.get_state())
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="batch-prefetcher", daemon=True)
        self.thread_id: int | None = None  # the producer's native id, once it runs
        self._thread.start()

    def _produce(self) -> None:
        self.thread_id = threading.get_native_id()
        _lower_priority_of_this_thread()
        while not self._stopping.is_set():
            try:
                item: Any = (self._draw(self._private), self._private.get_state())
            except BaseException as error:  # handed to the consumer, raised there
                item = error
            while not self._stopping.is_set():
                try:
                    self._ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def next(self) -> Any:
        """The next batch; the loop's generator moves past it."""
        if self._stopping.is_set():
            raise RuntimeError("BatchPrefetcher.next() after close()")
        item = self._ready.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, state = item
        self.generator.set_state(state)
        return batch

    def close(self) -> None:
        """Stop the producer and drop what it drew ahead (the loop's generator is untouched)."""
        self._stopping.set()
        try:
            while True:
                self._ready.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=10)

    def __enter__(self) -> "BatchPrefetcher":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
