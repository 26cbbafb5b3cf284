"""Moduli handles under DistributedDataParallel (DDP): set-up, keeping ranks identical.

DDP keeps the *model's* parameters identical across ranks (one broadcast at wrap time,
averaged gradients afterwards). Everything the handle owns lives off the model, so DDP
does not touch it:

* embeddings (fixed or trained) and, with ``control="shuffled"``/``"l1"``, the values
  derived from them at attach time: identical only when every rank attached with the same
  ``seed``. :func:`sync_handle` broadcasts them from one rank so they agree regardless.
* trained-embedding gradients: the penalty depends only on (weights, embeddings), which
  are identical, so every rank computes the same gradient in exact arithmetic;
  :func:`sync_handle` still installs a hook that averages them across ranks right before
  the handle's embedding update, so ranks cannot drift (a loss that reads the embeddings,
  non-deterministic kernels).
* masks: computed from the weights, hence identical on every rank once the weights are;
  :func:`sync_handle` broadcasts them once (a handle loaded or pruned on one rank only)
  and :func:`check_in_sync` verifies it.

Order (see docs/DISTRIBUTED.md)::

    rank, world_size = init_distributed_from_env()   # no-op outside torchrun
    handle = mt.attach(model, ...)                   # the bare module, BEFORE wrapping
    ddp_model = DistributedDataParallel(model)       # broadcasts rank 0's weights
    sync_handle(handle)                              # broadcasts rank 0's handle state
    optimizer = torch.optim.Adam(ddp_model.parameters())

Attaching to ``ddp_model.module`` after wrapping is equivalent. Attaching to the DDP
wrapper itself would name every target ``module.*`` and tie checkpoints to DDP: avoid it.
"""

from __future__ import annotations

import gc
import os
import warnings
import weakref
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .device import local_gpu

__all__ = [
    "backend_for", "init_distributed_from_env", "is_main_process", "get_rank", "get_world_size", "barrier",
    "cleanup_distributed", "unwrap_model", "shard_batch",
    "sync_handle", "all_reduce_embedding_grads", "check_in_sync",
    "gather_rank_rng_states", "restore_rank_rng_states", "decorrelate_ranks",
]

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_grad_hooks: "weakref.WeakKeyDictionary[torch.optim.Optimizer, Any]" = weakref.WeakKeyDictionary()


# -- process group ----------------------------------------------------------------------
def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def backend_for(device: str | torch.device) -> str:
    """The process-group backend for tensors on ``device``: nccl for cuda, gloo otherwise.

    Example:
        >>> backend_for("cpu"), backend_for(torch.device("cuda", 1))
        ('gloo', 'nccl')
    """
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed_from_env(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment.

    Outside torchrun (any of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT unset)
    this does nothing and returns ``(0, 1)``. If a group already exists it is reused.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default nccl when CUDA is available, else gloo
            (pass ``backend_for(device)`` to follow the training device instead).
            With nccl the current CUDA device is set to :func:`~moduli_transform.device.local_gpu`
            (``LOCAL_RANK``, or 0 where each rank sees only its own GPU).
        timeout_s: collective timeout.

    Returns:
        ``(rank, world_size)``.

    Example:
        >>> os.environ.get("RANK") is None and init_distributed_from_env() == (0, 1)
        True
    """
    if _initialized():
        return dist.get_rank(), dist.get_world_size()
    if not all(name in os.environ for name in _TORCHRUN_VARIABLES):
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build; run without torchrun")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_gpu(torch.cuda.device_count()))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def get_rank() -> int:
    """This process's rank, 0 when not distributed."""
    return dist.get_rank() if _initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 when not distributed."""
    return dist.get_world_size() if _initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 or when not distributed: the one process that writes files and logs."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if _initialized():
        dist.barrier()


def cleanup_distributed() -> None:
    """Free unreferenced DDP wrappers, wait for every rank, and leave the process group.

    Call it once the DDP-wrapped model is no longer referenced (``del ddp_model`` or after
    the function that owned it returned): a DDP wrapper still alive at interpreter exit can
    abort the process ("terminate called without an active exception", gloo, torch 2.13),
    and ``gc.collect()`` here frees wrappers kept only by reference cycles.
    """
    if _initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def decorrelate_ranks(seed: int) -> None:
    """Give each rank but rank 0 its own stream of PyTorch's global generators (CPU and CUDA),
    seeded from ``seed`` and the rank; rank 0 keeps the one-process stream.

    Call it after the model and the handle are synchronised. Seeded alike, every rank drew
    the same dropout masks for its shard of a batch, so the shards' masks were copies of one
    another instead of independent draws as in one process. Generators of their own (the
    data's, a shuffled control's) are untouched.
    """
    rank = get_rank()
    if rank > 0:
        torch.manual_seed(seed + 1_000_003 * rank)


RANK_RNG_PREFIX = "rng/rank"


def gather_rank_rng_states(prefix: str = RANK_RNG_PREFIX) -> dict[str, Tensor]:
    """Every rank's own generator states, for a checkpoint that rank 0 writes.

    Rank 0's process sees only its own generators: its state of GPU k was never used, since
    rank k draws on its own process's. This gathers, from each rank ``r``, its CPU state as
    ``{prefix}{r}/torch`` and, where CUDA is initialized, its current GPU's as
    ``{prefix}{r}/cuda``; every rank receives all of them. A collective: every rank must
    call it. Returns ``{}`` outside a group of more than one process.
    """
    if not _initialized() or dist.get_world_size() == 1:
        return {}
    own = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        own["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    return {f"{prefix}{rank}/{name}": state.cpu() for rank, states in enumerate(gathered)
            for name, state in states.items()}


def restore_rank_rng_states(tensors: dict[str, Tensor], prefix: str = RANK_RNG_PREFIX) -> bool:
    """Set this rank's generators from :func:`gather_rank_rng_states`'s tensors (after the
    process-wide restore, which gave every rank rank 0's). False, and nothing set, where they
    hold none for this rank: a checkpoint of one process, or of fewer ranks."""
    rank = get_rank()
    cpu = tensors.get(f"{prefix}{rank}/torch")
    if cpu is None:
        return False
    torch.set_rng_state(cpu.cpu())
    cuda = tensors.get(f"{prefix}{rank}/cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda.cpu(), torch.cuda.current_device())
    return True


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / DataParallel wrappers (the model itself otherwise)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def shard_batch(batch: Any, rank: int | None = None, world_size: int | None = None, dim: int = 0) -> Any:
    """This rank's equal slice of a global batch (tensors in nested tuples/lists/dicts).

    With equal slices, the mean loss of each slice averaged by DDP equals the mean loss of
    the global batch, so a run on N ranks follows a one-process run on the same batches.
    Non-tensor leaves pass through unchanged.

    Raises:
        ValueError: a tensor's size along ``dim`` is not divisible by ``world_size``.

    Example:
        >>> shard_batch((torch.arange(6), "tag"), rank=1, world_size=3)
        (tensor([2, 3]), 'tag')
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if world_size == 1:
        return batch
    if isinstance(batch, Tensor):
        if batch.shape[dim] % world_size:
            raise ValueError(f"batch of size {batch.shape[dim]} (dim {dim}) does not split evenly over "
                             f"{world_size} ranks; choose a global batch size divisible by the world size")
        return batch.chunk(world_size, dim)[rank]
    if isinstance(batch, dict):
        return {key: shard_batch(value, rank, world_size, dim) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        values = [shard_batch(value, rank, world_size, dim) for value in batch]
        return type(batch)(*values) if hasattr(batch, "_fields") else type(batch)(values)
    return batch


# -- handle state ---------------------------------------------------------------------------
def _handle_tensors(handle: Any) -> list[tuple[str, Tensor]]:
    """Every tensor of the handle that must agree across ranks, in a rank-independent order."""
    tensors = []
    for name in sorted(handle.regularizers):
        for index, embedding in enumerate(handle.regularizers[name].embedding_tensors()):
            tensors.append((f"embedding/{name}/{index}", embedding))
    tensors += [(f"mask/{name}", handle.masks[name]) for name in sorted(handle.masks)]
    initial = getattr(handle, "_initial_state", None) or {}  # lottery("rewind") restores these
    tensors += [(f"initial/{name}", initial[name]) for name in sorted(initial)]
    return tensors


def _broadcast_(tensor: Tensor, src: int, group: Any) -> None:
    """In-place broadcast that also works for bool tensors and backends without bool support."""
    if tensor.dtype == torch.bool:
        buffer = tensor.to(torch.uint8)
        dist.broadcast(buffer, src, group=group)
        tensor.copy_(buffer.bool())
    else:
        buffer = tensor.detach().contiguous()
        dist.broadcast(buffer, src, group=group)
        if buffer.data_ptr() != tensor.data_ptr():
            tensor.copy_(buffer)


def _communication_device(tensor: Tensor, group: Any) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


@torch.no_grad()
def sync_handle(handle: Any, src: int = 0, *, average_embedding_grads: bool = True, group: Any = None) -> None:
    """Make every rank's handle equal to rank ``src``'s, and keep trained embeddings in sync.

    Broadcasts the embeddings, masks, schedule position, attach-time weights (for
    ``lottery("rewind")``) and seed-derived coefficients of the handle from ``src``; with
    ``average_embedding_grads`` (and trained embeddings) it installs, once, a pre-step hook
    on the handle's embedding optimizer that calls :func:`all_reduce_embedding_grads`.
    Call it on every rank, after wrapping the model in DDP and before training. A no-op when
    not distributed.

    Raises:
        ValueError: the handle was attached to the DDP wrapper instead of the bare module.
    """
    if isinstance(getattr(handle, "model", None), nn.parallel.DistributedDataParallel):
        raise ValueError("the handle was attached to the DistributedDataParallel wrapper; attach to the bare "
                         "model before wrapping (or to ddp_model.module) so names match a single-process run")
    if not _initialized():
        return
    for _, tensor in _handle_tensors(handle):
        device = _communication_device(tensor, group)
        if device == tensor.device:
            _broadcast_(tensor, src, group)
        else:
            moved = tensor.to(device)
            _broadcast_(moved, src, group)
            tensor.copy_(moved)
    _broadcast_scalars(handle, src, group)
    for regularizer in handle.regularizers.values():
        regularizer.invalidate()
    handle.apply_masks()
    # The handle keeps its embedding optimizer private; prefer a public name if it gains one.
    optimizer = getattr(handle, "embedding_optimizer", None) or getattr(handle, "_embedding_optimizer", None)
    if average_embedding_grads and optimizer is not None and optimizer not in _grad_hooks:
        _grad_hooks[optimizer] = optimizer.register_step_pre_hook(
            lambda *_: all_reduce_embedding_grads(handle, group=group))


def _broadcast_scalars(handle: Any, src: int, group: Any) -> None:
    # The shuffled control's permutation seed and the l1 control's constant are drawn from
    # the attach seed; they are not tensors, so they travel in two small vectors.
    regularizers = [handle.regularizers[name] for name in sorted(handle.regularizers)]
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    integers = torch.tensor([handle.step_count] + [getattr(r, "_shuffle_seed", 0) for r in regularizers],
                            dtype=torch.int64, device=device)
    l1 = [getattr(r, "_l1_value", None) for r in regularizers]
    floats = torch.tensor([float("nan") if v is None else v for v in l1], dtype=torch.float64, device=device)
    dist.broadcast(integers, src, group=group)
    dist.broadcast(floats, src, group=group)
    integers, floats = integers.tolist(), floats.tolist()
    handle.step_count = integers[0]
    for regularizer, seed, value in zip(regularizers, integers[1:], floats):
        if hasattr(regularizer, "_shuffle_seed"):
            regularizer._shuffle_seed = seed
        if getattr(regularizer, "_l1_value", None) is not None:
            regularizer._l1_value = value


@torch.no_grad()
def all_reduce_embedding_grads(handle: Any, group: Any = None) -> None:
    """Average the gradients of the handle's trained embeddings over all ranks, in place.

    Call it on every rank between ``loss.backward()`` and ``handle.step()`` (the hook that
    :func:`sync_handle` installs does exactly that). An embedding whose gradient is ``None``
    on every rank stays ``None`` (so Adam skips it, as in a single process); one that has a
    gradient on some ranks only counts as zero on the others. No-op when not distributed.
    """
    if not _initialized():
        return
    embeddings = [embedding for name in sorted(handle.regularizers)
                  for embedding in handle.regularizers[name].embedding_tensors()
                  if handle.regularizers[name].trained]
    if not embeddings:
        return
    world_size = dist.get_world_size(group)
    device = _communication_device(embeddings[0], group)
    present = torch.tensor([e.grad is not None for e in embeddings], dtype=torch.float32, device=device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX, group=group)
    chosen = [e for e, has in zip(embeddings, present.tolist()) if has]
    if not chosen:
        return
    flat = torch.cat([(e.grad if e.grad is not None else torch.zeros_like(e)).reshape(-1).to(device)
                      for e in chosen])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= world_size
    offset = 0
    for embedding in chosen:
        size = embedding.numel()
        embedding.grad = flat[offset:offset + size].view_as(embedding).to(embedding.device).clone()
        offset += size


@torch.no_grad()
def check_in_sync(handle: Any, model: nn.Module | None = None, atol: float = 0.0, group: Any = None) -> list[str]:
    """Names of handle (and model) tensors that differ from rank 0's by more than ``atol``.

    Every rank gets the same list (empty when all agree). A debugging and testing aid: it
    broadcasts every tensor, so do not call it each step on a large model.
    """
    if not _initialized():
        return []
    tensors = _handle_tensors(handle)
    if model is not None:
        tensors += sorted((f"model/{k}", v) for k, v in unwrap_model(model).state_dict().items())
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    differs = []
    for name, tensor in tensors:
        reference = tensor.detach().to(device or tensor.device, copy=True)
        if reference.dtype == torch.bool:
            reference = reference.to(torch.uint8)
        dist.broadcast(reference, 0, group=group)
        local = tensor.detach().to(reference.device, reference.dtype)
        differs.append(not torch.allclose(local.double(), reference.double(), atol=atol, rtol=0.0, equal_nan=True))
    flags = torch.tensor(differs, dtype=torch.float32, device=device or "cpu")
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    out = [name for (name, _), flag in zip(tensors, flags.tolist()) if flag]
    if out and is_main_process():
        warnings.warn(f"ranks disagree on {len(out)} tensors: {', '.join(out[:5])}", RuntimeWarning, stacklevel=2)
    return out
