"""Crash-safe training checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint of step ``s`` is two files in one directory::

    ckpt-{s:08d}.safetensors    every tensor (weights, optimizer moments, masks, RNG states)
    ckpt-{s:08d}.json           step, SHA-256 and size of the safetensors file, a manifest
                                of tensor names/dtypes/shapes, the JSON state, and a
                                SHA-256 of the record itself

Both are written atomically (temporary file in the same directory, flush, fsync,
``os.replace``, fsync of the directory) and the JSON is written last: it is the commit
marker, so a crash at any moment leaves either the previous checkpoint or the new one, never
a half-written file that passes as valid. Loading verifies the checksum and the manifest;
:func:`load_checkpoint` warns about a corrupt or truncated newest checkpoint and falls back
to the previous one. Only the last ``keep`` (default 2) checkpoints are kept, and older ones
are deleted only after the new one is committed. Nothing is pickled.

Nested state (an optimizer's ``state_dict``, a moduli handle's ``state_dict``) is split by
:func:`flatten_state` into named tensors plus a JSON tree that refers to them, and joined
again by :func:`unflatten_state`; tuples, integer dict keys and ``None`` survive the trip.

Example:
    >>> import tempfile
    >>> directory = tempfile.mkdtemp()
    >>> path = save_checkpoint(directory, {"w": torch.arange(3.0)}, {"step": 7, "loss": 0.5})
    >>> path.name
    'ckpt-00000007.json'
    >>> tensors, state = load_checkpoint(directory)
    >>> tensors["w"].tolist(), state["step"]
    ([0.0, 1.0, 2.0], 7)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

__all__ = [
    "CheckpointError", "Checkpoint",
    "save_checkpoint", "load_checkpoint", "read_checkpoint", "list_checkpoints",
    "flatten_state", "unflatten_state",
    "capture_rng_state", "restore_rng_state",
    "capture_training_state", "restore_training_state",
]

FORMAT = "moduli-transform-checkpoint"
VERSION = 1
KEEP = 2
_NAME = re.compile(r"^ckpt-(\d{8,})\.json$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not a checkpoint of this format."""


@dataclass(frozen=True)
class Checkpoint:
    """One verified checkpoint: its step, tensors, JSON state and the path of its JSON file."""

    step: int
    tensors: dict[str, Tensor]
    state: dict[str, Any]
    path: Path


# -- files ------------------------------------------------------------------------------
def _stem(step: int) -> str:
    return f"ckpt-{step:08d}"


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the replace is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new, never a mix."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    _fsync_directory(path.parent)


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Committed checkpoints (those with a JSON marker) as ``(step, json path)``, oldest first.

    Listed does not mean valid: :func:`read_checkpoint` verifies.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


# -- save -------------------------------------------------------------------------------
def _prepare_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    prepared = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise ValueError(f"checkpoint tensors must map str -> Tensor; got {name!r}: {type(tensor).__name__}")
        # A private contiguous CPU copy: safetensors refuses shared storage and device tensors.
        prepared[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return prepared


def _manifest(tensors: dict[str, Tensor]) -> dict[str, dict[str, Any]]:
    return {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            for name, t in sorted(tensors.items())}


def save_checkpoint(directory: str | os.PathLike, tensors: dict[str, Tensor], state: dict[str, Any],
                    *, step: int | None = None, keep: int = KEEP) -> Path:
    """Atomically write checkpoint ``step`` and keep only the newest ``keep`` checkpoints.

    Args:
        directory: created if missing.
        tensors: name -> tensor (any device; saved as a CPU copy).
        state: JSON-serializable dict (use :func:`flatten_state` for nested tensors).
        step: the checkpoint's step; defaults to ``state["step"]``.
        keep: how many committed checkpoints to keep (at least 1).

    Returns:
        The path of the JSON commit marker.

    Raises:
        ValueError: no step given, ``keep < 1``, or ``state`` is not JSON-serializable.

    Checkpoints with a step above ``step`` belong to a run that was abandoned (this one
    resumed from an earlier checkpoint) and are removed once this one is committed.
    """
    if step is None:
        step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be an int >= 0 (argument step= or state['step']); got {step!r}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1 so the newest checkpoint survives; got {keep}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prepared = _prepare_tensors(tensors)
    payload = save_safetensors(prepared)
    stem = _stem(step)
    record = {
        "format": FORMAT, "version": VERSION, "step": step,
        "tensors_file": f"{stem}.safetensors",
        "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload),
        "manifest": _manifest(prepared), "state": state,
    }
    try:
        record["record_sha256"] = _record_digest(record)
        marker = json.dumps(record, indent=1, sort_keys=True).encode()
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint state is not JSON-serializable ({error}); "
                         "split tensors out with flatten_state(state)") from error
    _atomic_write(directory / f"{stem}.safetensors", payload)
    _atomic_write(directory / f"{stem}.json", marker)
    _remove_old(directory, step, keep)
    return directory / f"{stem}.json"


def _record_digest(record: dict[str, Any]) -> str:
    """SHA-256 of the record's canonical JSON without this field: catches edits that still parse."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _remove_old(directory: Path, newest: int, keep: int) -> None:
    committed = [s for s, _ in list_checkpoints(directory)]
    kept = sorted(s for s in committed if s <= newest)[-keep:]
    for path in directory.iterdir():
        match = re.match(r"^ckpt-(\d{8,})\.(json|safetensors)$", path.name)
        if match and int(match.group(1)) not in kept:
            # Marker first, so a crash mid-deletion never leaves a marker without its data.
            if path.suffix == ".safetensors" and (path.with_suffix(".json")).exists():
                path.with_suffix(".json").unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        elif path.name.startswith(".ckpt-") and ".tmp-" in path.name:
            path.unlink(missing_ok=True)  # left by a writer that was killed
    _fsync_directory(directory)


# -- load -------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = None) -> Checkpoint:
    """Read and verify one checkpoint, given its ``.json`` (or ``.safetensors``) path.

    ``map_location`` puts every tensor on that device (None: the CPU, where they were
    saved), so a run checkpointed on a GPU resumes on the CPU and vice versa. RNG states
    go back to the CPU in :func:`restore_rng_state` wherever they were loaded.

    Raises:
        CheckpointError: a file is missing, truncated or corrupt, the checksum or the tensor
            manifest does not match, or the JSON is not a checkpoint of this format.
    """
    path = Path(path)
    marker = path.with_suffix(".json")
    try:
        record = json.loads(marker.read_bytes())
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint marker {marker} does not exist") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint marker {marker} is not valid JSON (truncated or corrupt): {error}") from error
    _check_record(record, marker)
    data_path = marker.with_name(record["tensors_file"])
    try:
        data = data_path.read_bytes()
    except FileNotFoundError as error:
        raise CheckpointError(f"tensor file {data_path} named by {marker.name} does not exist") from error
    if len(data) != record["size"]:
        raise CheckpointError(f"tensor file {data_path} has {len(data)} bytes, expected {record['size']} (truncated?)")
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise CheckpointError(f"tensor file {data_path} fails its SHA-256 check (corrupt)")
    try:
        tensors = load_safetensors(data)
    except Exception as error:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"tensor file {data_path} is not valid safetensors: {error}") from error
    if _manifest(tensors) != record["manifest"]:
        raise CheckpointError(f"tensor file {data_path} does not match the manifest in {marker.name}")
    if map_location is not None:
        tensors = {name: tensor.to(map_location) for name, tensor in tensors.items()}
    return Checkpoint(step=record["step"], tensors=tensors, state=record["state"], path=marker)


def _check_record(record: Any, marker: Path) -> None:
    expected = {"format": str, "version": int, "step": int, "tensors_file": str, "sha256": str,
                "size": int, "manifest": dict, "state": dict, "record_sha256": str}
    if not isinstance(record, dict):
        raise CheckpointError(f"{marker} holds {type(record).__name__}, expected a checkpoint record")
    for key, kind in expected.items():
        if not isinstance(record.get(key), kind):
            raise CheckpointError(f"{marker} lacks field {key!r} of type {kind.__name__}; not a checkpoint?")
    if _record_digest(record) != record["record_sha256"]:
        raise CheckpointError(f"{marker} fails its own SHA-256 check (edited or corrupt)")
    if record["format"] != FORMAT or record["version"] != VERSION:
        raise CheckpointError(f"{marker} is format {record['format']!r} v{record['version']}; "
                              f"expected {FORMAT!r} v{VERSION}")
    if Path(record["tensors_file"]).name != record["tensors_file"]:
        raise CheckpointError(f"{marker} names tensor file {record['tensors_file']!r} outside its directory")


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device | None = None
                    ) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The newest valid checkpoint in ``directory`` as ``(tensors, state)``, or None if none.

    A newest checkpoint that fails verification is skipped with a ``RuntimeWarning`` naming
    the reason, and the previous one is tried. ``map_location``: see :func:`read_checkpoint`.
    """
    for step, marker in reversed(list_checkpoints(directory)):
        try:
            checkpoint = read_checkpoint(marker, map_location)
        except CheckpointError as error:
            warnings.warn(f"skipping checkpoint step {step}: {error}; falling back to an older one",
                          RuntimeWarning, stacklevel=2)
            continue
        return checkpoint.tensors, checkpoint.state
    return None


# -- nested state <-> tensors + JSON ---------------------------------------------------------
def flatten_state(tree: Any, prefix: str) -> tuple[dict[str, Tensor], Any]:
    """Split a nested state (dicts, lists, tuples, tensors, numbers) into tensors and JSON.

    Each tensor is stored as ``"{prefix}/{path}"`` and replaced by ``{"__tensor__": name}``;
    tuples become ``{"__tuple__": [...]}`` and dicts with non-string keys
    ``{"__items__": [[key, value], ...]}`` so :func:`unflatten_state` restores them exactly.

    Example:
        >>> optimizer = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))])
        >>> tensors, encoded = flatten_state(optimizer.state_dict(), "optimizer")
        >>> unflatten_state(encoded, tensors) == optimizer.state_dict()
        True
    """
    tensors: dict[str, Tensor] = {}
    return tensors, _encode(tree, prefix, tensors)


def _encode(value: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, Tensor):
        tensors[path] = value
        return {"__tensor__": path}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        plain = all(isinstance(k, str) and not k.startswith("__") for k in value)
        if plain:
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, f"{path}/key{i}", tensors), _encode(v, f"{path}/{k}", tensors)]
                              for i, (k, v) in enumerate(value.items())]}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    raise ValueError(f"cannot checkpoint {type(value).__name__} at {path!r}; "
                     "expected tensors, numbers, strings, None, lists, tuples or dicts")


def unflatten_state(encoded: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`flatten_state`.

    Raises:
        CheckpointError: the JSON refers to a tensor that ``tensors`` lacks.
    """
    if isinstance(encoded, list):
        return [unflatten_state(v, tensors) for v in encoded]
    if not isinstance(encoded, dict):
        return encoded
    if "__tensor__" in encoded:
        name = encoded["__tensor__"]
        if name not in tensors:
            raise CheckpointError(f"state refers to tensor {name!r}, which the checkpoint lacks")
        return tensors[name]
    if "__tuple__" in encoded:
        return tuple(unflatten_state(v, tensors) for v in encoded["__tuple__"])
    if "__items__" in encoded:
        return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in encoded["__items__"]}
    if "__float__" in encoded:
        return float(encoded["__float__"])
    return {k: unflatten_state(v, tensors) for k, v in encoded.items()}


# -- random number generators -----------------------------------------------------------------
def capture_rng_state(generators: dict[str, torch.Generator] | None = None,
                      prefix: str = "rng") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every RNG state as tensors + JSON: torch CPU, CUDA (if initialized), Python, NumPy, named generators."""
    tensors = {f"{prefix}/torch": torch.get_rng_state()}
    state: dict[str, Any] = {"cuda_devices": 0, "generators": sorted(generators or {})}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_states = torch.cuda.get_rng_state_all()
        state["cuda_devices"] = len(cuda_states)
        tensors.update({f"{prefix}/cuda/{i}": s for i, s in enumerate(cuda_states)})
    version, internal, gauss = random.getstate()
    state["python"] = {"version": version, "gauss": gauss}
    tensors[f"{prefix}/python"] = torch.tensor(internal, dtype=torch.int64)
    try:
        import numpy
    except ImportError:
        numpy = None
    if numpy is not None:
        kind, keys, position, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = {"kind": kind, "position": int(position), "has_gauss": int(has_gauss),
                          "cached_gaussian": float(cached)}
        tensors[f"{prefix}/numpy"] = torch.from_numpy(keys.astype("int64"))
    for name, generator in (generators or {}).items():
        tensors[f"{prefix}/generator/{name}"] = generator.get_state()
    return tensors, state


def restore_rng_state(tensors: dict[str, Tensor], state: dict[str, Any],
                      generators: dict[str, torch.Generator] | None = None, prefix: str = "rng") -> None:
    """Restore what :func:`capture_rng_state` captured (generators are set in place).

    The states may have been loaded onto any device (``map_location``); they are set from
    CPU copies. CUDA RNG states are restored where CUDA is available and skipped elsewhere,
    so a GPU run resumes on a CPU-only machine.

    Raises:
        CheckpointError: a named generator was not saved, or an RNG state is missing.
    """
    try:
        torch.set_rng_state(tensors[f"{prefix}/torch"].cpu())
        if state["cuda_devices"] and torch.cuda.is_available():
            cuda_states = [tensors[f"{prefix}/cuda/{i}"].cpu() for i in range(state["cuda_devices"])]
            torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
        internal = tuple(int(v) for v in tensors[f"{prefix}/python"].tolist())
        random.setstate((state["python"]["version"], internal, state["python"]["gauss"]))
        if "numpy" in state:
            import numpy

            saved = state["numpy"]
            numpy.random.set_state((saved["kind"], tensors[f"{prefix}/numpy"].cpu().numpy().astype("uint32"),
                                    saved["position"], saved["has_gauss"], saved["cached_gaussian"]))
    except KeyError as error:
        raise CheckpointError(f"checkpoint lacks RNG state {error}; was it saved with capture_rng_state?") from error
    for name, generator in (generators or {}).items():
        key = f"{prefix}/generator/{name}"
        if key not in tensors:
            raise CheckpointError(f"checkpoint has no state for generator {name!r}; saved: {state['generators']}")
        generator.set_state(tensors[key].cpu())


# -- one call for a training loop -------------------------------------------------------------
def capture_training_state(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                           handle: Any = None, generators: dict[str, torch.Generator] | None = None,
                           extra: dict[str, Any] | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Model, optimizer, moduli handle (anything with ``state_dict``) and RNGs as (tensors, state).

    Pass the result to :func:`save_checkpoint`; ``extra`` is JSON kept under ``state["extra"]``.
    """
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    state: dict[str, Any] = {"step": step, "extra": extra or {}}
    for key, part in (("optimizer", optimizer), ("handle", handle)):
        if part is not None:
            part_tensors, state[key] = flatten_state(part.state_dict(), key)
            tensors.update(part_tensors)
    rng_tensors, state["rng"] = capture_rng_state(generators)
    tensors.update(rng_tensors)
    return tensors, state


def restore_training_state(tensors: dict[str, Tensor], state: dict[str, Any], model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer | None = None, handle: Any = None,
                           generators: dict[str, torch.Generator] | None = None) -> int:
    """Load what :func:`capture_training_state` saved, in place; returns the saved step.

    Order matters: weights first, then the optimizer, then the handle (it re-applies masks to
    the loaded weights), then the RNGs, so the next batch draws what it would have drawn.
    """
    model_state = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    model.load_state_dict(model_state)
    for key, part in (("optimizer", optimizer), ("handle", handle)):
        if part is None:
            continue
        if key not in state:
            raise CheckpointError(f"checkpoint has no {key} state; it was saved without one")
        part.load_state_dict(unflatten_state(state[key], tensors))
    restore_rng_state(tensors, state["rng"], generators)
    return int(state["step"])
