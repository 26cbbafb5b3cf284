"""Where training and benchmarks run: one parser for ``--device`` and helpers around it.

``resolve_device`` turns a user's device name into a ``torch.device`` or raises a
:class:`DeviceError` that names the value and the accepted ones:

* ``"auto"``: ``cuda`` when CUDA is available, else ``cpu``;
* ``"cpu"``;
* ``"cuda"``: this process's GPU, ``cuda:$LOCAL_RANK`` under ``torchrun`` (each rank its
  own GPU; ``cuda:0`` where each rank sees only its own, :func:`local_gpu`), else the current
  CUDA device;
* ``"cuda:N"``: GPU ``N``.

Example:
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("tpu")
    Traceback (most recent call last):
    ...
    moduli_transform.device.DeviceError: unknown device 'tpu'; expected one of auto, cpu, cuda, cuda:N (N a GPU index)
    >>> to_device((torch.zeros(2), [torch.ones(1), True]), "cpu")[1][1]
    True
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
from collections.abc import Iterator
from multiprocessing.context import BaseContext
from typing import Any

import torch
from torch import Tensor

__all__ = ["DEVICE_CHOICES", "DEVICE_HELP", "DeviceError", "resolve_device", "local_gpu", "exact_float32", "to_device", "process_context"]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
DEVICE_HELP = "auto (default: cuda when available, else cpu), cpu, cuda or cuda:N"
_PATTERN = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


class DeviceError(ValueError):
    """A device name that is unknown, or names a GPU this machine does not have."""


def _expected() -> str:
    return f"expected one of {', '.join(DEVICE_CHOICES)} (N a GPU index)"


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The ``torch.device`` that ``name`` asks for (see the module docstring).

    Raises:
        DeviceError: an unknown name, a CUDA device without CUDA, or a GPU index out of range.
    """
    text = str(name).strip()
    match = _PATTERN.match(text)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise DeviceError(f"unknown device {text!r}; {_expected()}")
    kind, index = match.group(1), match.group(2)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if index is not None and world > 1:
        raise DeviceError(f"device {text!r} under torchrun ({world} ranks) would put every rank on GPU {index}; "
                          f"expected cuda (each rank then takes cuda:$LOCAL_RANK), auto or cpu")
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {text!r}: CUDA is not available (torch {torch.__version__}, "
                          f"{torch.cuda.device_count()} GPUs visible); expected one of auto, cpu")
    count = torch.cuda.device_count()
    if index is None:
        index = local_gpu(count)
    index = int(index)
    if index >= count:
        raise DeviceError(f"device {text!r} is GPU {index}, but {count} CUDA device(s) are visible; "
                          f"expected one of auto, cpu, cuda, {', '.join(f'cuda:{i}' for i in range(count))}")
    return torch.device("cuda", index)


def local_gpu(count: int, environ: dict[str, str] | None = None) -> int:
    """The GPU index of this process among ``count`` visible ones: ``$LOCAL_RANK`` under
    torchrun (each rank its own GPU), 0 when the launcher shows each rank only its own GPU
    (one visible, as SLURM's per-task ``CUDA_VISIBLE_DEVICES`` does), else the current device.

    Example:
        >>> local_gpu(4, {"LOCAL_RANK": "2"}), local_gpu(1, {"LOCAL_RANK": "3"})
        (2, 0)
    """
    environ = os.environ if environ is None else environ
    local_rank = environ.get("LOCAL_RANK")
    if local_rank is None:
        return torch.cuda.current_device()
    if int(local_rank) < count:
        return int(local_rank)
    if count == 1:
        return 0
    raise DeviceError(f"LOCAL_RANK={local_rank}, but {count} CUDA devices are visible to this process; "
                      f"give each rank its own GPU, or set CUDA_VISIBLE_DEVICES to at least LOCAL_RANK + 1 GPUs")


@contextlib.contextmanager
def exact_float32(device: str | torch.device) -> Iterator[None]:
    """On a CUDA device, cuDNN's float32 RNNs and convolutions in IEEE float32 for the block,
    then the settings as they were; nothing changes on other devices.

    cuDNN's default for them is TF32 (10-bit mantissas) while PyTorch's float32 matrix
    products stay IEEE, so an ``nn.RNN`` on a GPU would compute less exactly than the
    same run's fused layers, the CPU run it is compared with, and ``bench``'s dense loop.

    Example:
        >>> with exact_float32("cuda"):
        ...     inside = torch.backends.cudnn.rnn.fp32_precision
        >>> inside
        'ieee'
    """
    if torch.device(device).type != "cuda":
        yield
        return
    settings = (torch.backends.cudnn.rnn, torch.backends.cudnn.conv)
    saved = [setting.fp32_precision for setting in settings]
    for setting in settings:
        setting.fp32_precision = "ieee"
    try:
        yield
    finally:
        for setting, value in zip(settings, saved):
            setting.fp32_precision = value


def to_device(tree: Any, device: str | torch.device) -> Any:
    """Tensors in nested tuples/lists/dicts moved to ``device``; other leaves unchanged.

    A tensor already there is returned as it is (no copy).
    """
    if isinstance(tree, Tensor):
        return tree.to(device)
    if isinstance(tree, tuple):
        return tuple(to_device(value, device) for value in tree)
    if isinstance(tree, list):
        return [to_device(value, device) for value in tree]
    if isinstance(tree, dict):
        return {key: to_device(value, device) for key, value in tree.items()}
    return tree


def process_context(device: str | torch.device) -> BaseContext:
    """The multiprocessing context for worker processes that use ``device``: ``spawn``.

    A forked child cannot use CUDA once the parent has touched it, and on the CPU a child
    forked after the parent ran an OpenMP-parallel op (MKL's vectorised sqrt, say) can wait
    forever in libgomp on the parent's thread pool, which does not exist in the child (seen
    here: a table worker hung in ``torch.sqrt``). A fresh interpreter per worker costs an
    import of torch and avoids both. ``device`` is kept for callers that may choose per device.
    """
    torch.device(device)  # an invalid device still fails here, as before
    return multiprocessing.get_context("spawn")
