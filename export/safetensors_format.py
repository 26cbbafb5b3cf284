"""One safetensors file per pruned model: CSR for the sparse targets, dense for the rest.

The layout (tensor keys, metadata JSON schema, validation rules) is specified in
``export/FORMAT.md``; this module is one implementation of it. Writing goes through a
temporary file in the destination directory, ``fsync`` and ``os.replace``, so a reader
never sees half a file. Reading never unpickles: the safetensors header is parsed here
as JSON and each tensor is rebuilt from its bytes only after every check has passed.

Example:
    >>> import tempfile, os
    >>> from torch import nn
    >>> rnn = nn.RNN(2, 4)
    >>> mask = torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    >>> with torch.no_grad():
    ...     _ = rnn.weight_hh_l0.mul_(mask)
    >>> path = os.path.join(tempfile.mkdtemp(), "rnn.safetensors")
    >>> _ = save_safetensors(rnn, path, masks={"weight_hh_l0": mask})
    >>> state = load_safetensors(path)
    >>> nn.RNN(2, 4).load_state_dict(state, strict=True)
    <All keys matched successfully>
    >>> torch.equal(state["weight_hh_l0"], rnn.weight_hh_l0.detach())
    True
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "ExportFormatError", "LoadedExport",
    "save_safetensors", "load_safetensors", "read_safetensors", "atomic_write_bytes",
]

FORMAT_NAME = "moduli-transform/csr-safetensors"
FORMAT_VERSION = 1
METADATA_KEY = "moduli_transform"
METADATA_SHA_KEY = "moduli_transform_sha256"

# safetensors dtype codes <-> torch dtypes (the ones a model state can hold here).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
INDEX_DTYPES = ("I32", "I64")
INT32_MAX = 2**31 - 1

# PyTorch's gate order inside the stacked weights of its recurrent layers.
TORCH_GATE_ORDER: dict[type, tuple[str, ...]] = {
    nn.LSTM: ("i", "f", "g", "o"), nn.LSTMCell: ("i", "f", "g", "o"),
    nn.GRU: ("r", "z", "n"), nn.GRUCell: ("r", "z", "n"),
    nn.RNN: ("h",), nn.RNNCell: ("h",),
}


class ExportFormatError(ValueError):
    """A file that is not a valid moduli-transform safetensors export (or is damaged)."""


@dataclass
class LoadedExport:
    """Everything a validated file holds.

    Attributes:
        state_dict: the model's ``state_dict`` (parameters and buffers), dense.
        masks: parameter name -> bool mask of the parameter's full shape.
        embeddings: target name -> ``{"row": Tensor, "col": Tensor}``.
        metadata: the metadata JSON document (see FORMAT.md).
    """

    state_dict: "OrderedDict[str, Tensor]"
    masks: dict[str, Tensor]
    embeddings: dict[str, dict[str, Tensor]]
    metadata: dict[str, Any]


# --------------------------------------------------------------------------- writing
def _current_umask() -> int:
    """The process umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, replace.

    The file gets the mode a plain ``open(path, "w")`` would give (0666 less the umask):
    ``mkstemp`` creates it 0600, which would hide exports from the user's group.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    try:  # make the rename itself durable where the platform allows it
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _is_handle(obj: Any) -> bool:
    return not isinstance(obj, nn.Module) and hasattr(obj, "model") and hasattr(obj, "masks")


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view the CSR is taken of: (dim 0, product of the others); 1-D is (1, n)."""
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def _gate_names(model: nn.Module, name: str, targets: Mapping[str, Any]) -> list[str]:
    target = targets.get(name)
    if target is not None and getattr(target, "gate_names", ()):
        return list(target.gate_names)
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    order = TORCH_GATE_ORDER.get(type(module))
    if order is not None and leaf.startswith(("weight_", "bias_")):
        return list(order)
    return []


def _csr(weight: Tensor, mask: Tensor, index_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    rows, cols = _matrix_shape(tuple(weight.shape))
    mask2d = mask.reshape(rows, cols)
    row_ptr = torch.zeros(rows + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(mask2d.sum(dim=1), 0)
    col_idx = mask2d.nonzero()[:, 1]  # row-major order: sorted by row, then column
    values = weight.reshape(rows, cols)[mask2d]
    return row_ptr.to(index_dtype), col_idx.to(index_dtype), values.contiguous()


def _check_masks(state: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    for name, mask in masks.items():
        if name not in state:
            raise ValueError(f"mask for {name!r}, which is not in the model's state_dict; "
                             f"keys: {', '.join(list(state)[:8])}...")
        weight = state[name]
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask for {name!r} must be a bool tensor of shape {tuple(weight.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if weight.dim() == 0 or not weight.is_floating_point() or weight.dtype not in DTYPE_CODES:
            raise ValueError(f"cannot store {name!r} ({weight.dtype}, shape {tuple(weight.shape)}) as CSR")
        leaked = int(((weight != 0) & ~mask.to(weight.device)).sum())
        if leaked:
            raise ValueError(f"{name!r} has {leaked} non-zero weights where its mask is False; "
                             "prune first (handle.apply_masks()) so that no weight is lost")


def _tensor_record(tensor: Tensor) -> dict[str, Any]:
    data = _tensor_bytes(tensor)
    return {"dtype": DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape),
            "sha256": hashlib.sha256(data).hexdigest()}


def _tensor_bytes(tensor: Tensor) -> bytes:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.numel() == 0:
        return b""
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def _embedding_tensors(handle: Any) -> dict[str, dict[str, Tensor]]:
    out: dict[str, dict[str, Tensor]] = {}
    for name, regularizer in getattr(handle, "regularizers", {}).items():
        row = getattr(regularizer, "row_embedding", None)
        col = getattr(regularizer, "col_embedding", None)
        if isinstance(row, Tensor) and isinstance(col, Tensor):
            out[name] = {"row": row.detach().cpu().clone(), "col": col.detach().cpu().clone(),
                         "shared": row is col}
    return out


def _target_record(target: Any) -> dict[str, Any]:
    def fmt(selection: slice) -> list[int | None]:
        return [selection.start, selection.stop, selection.step]

    return {"name": target.name, "kind": target.kind, "shape": list(target.shape),
            "rows": fmt(target.rows), "cols": fmt(target.cols), "gates": int(target.gates),
            "gate_names": list(target.gate_names), "module": target.module,
            "transposed": bool(getattr(target, "transposed", False))}


def _config_strings(config: dict[str, Any] | None) -> tuple[str | None, str | None]:
    if config is None:
        return None, None
    return (None if config.get("manifold") is None else str(config["manifold"]),
            None if config.get("inhibitor") is None else str(config["inhibitor"]))


def _sparsity(masks: Mapping[str, Tensor], handle: Any) -> dict[str, float]:
    if handle is not None:
        return {name: float(value) for name, value in handle.sparsity().items()}
    result = {name: 1.0 - float(mask.sum()) / mask.numel() for name, mask in masks.items()}
    total = sum(mask.numel() for mask in masks.values())
    kept = sum(int(mask.sum()) for mask in masks.values())
    result["overall"] = 1.0 - kept / total if total else 0.0
    return result


def save_safetensors(model_or_handle: Any, path: str | os.PathLike, *,
                     masks: Mapping[str, Tensor] | None = None,
                     metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write a pruned model as one safetensors file: CSR per masked parameter, dense rest.

    Args:
        model_or_handle: an ``nn.Module`` or a ``ModuliHandle`` (then its masks, targets,
            config and embeddings are recorded too).
        path: destination; written atomically.
        masks: parameter name -> bool mask of the full parameter shape (default: the
            handle's masks; none for a plain module, i.e. everything dense).
        metadata: extra user strings, stored (and checksummed) under ``"user"``.

    Returns:
        The metadata JSON document that was written (see FORMAT.md).

    Raises:
        ValueError: a mask names an unknown parameter, has the wrong shape/dtype, or a
            weight is non-zero where its mask is False (the file could not restore it).
    """
    from safetensors.torch import save as safetensors_save

    handle = model_or_handle if _is_handle(model_or_handle) else None
    model = handle.model if handle is not None else model_or_handle
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module or a ModuliHandle, got {type(model_or_handle).__name__}")
    if masks is None:
        masks = dict(getattr(handle, "masks", {}) or {}) if handle is not None else {}
    state = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict(keep_vars=True).items())
    masks = {name: mask.detach().cpu() for name, mask in masks.items()}
    _check_masks(state, masks)
    for name, tensor in state.items():
        if tensor.dtype not in DTYPE_CODES:
            raise ValueError(f"state entry {name!r} has dtype {tensor.dtype}, which this format does not "
                             f"store; supported: {', '.join(str(d) for d in DTYPE_CODES)}")
    parameter_names = {name for name, _ in model.named_parameters()}
    targets = {t.name: t for t in getattr(handle, "targets", [])} if handle is not None else {}
    config = handle.config.to_dict() if handle is not None and hasattr(handle, "config") else None
    manifold, inhibitor = _config_strings(config)

    tensors: dict[str, Tensor] = {}
    entries = []
    for name, tensor in state.items():
        entry = {"name": name, "role": "parameter" if name in parameter_names else "buffer",
                 "dtype": DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape)}
        if name in masks:
            rows, cols = _matrix_shape(tuple(tensor.shape))
            nnz = int(masks[name].sum())
            index_dtype = torch.int32 if max(nnz, cols, rows) <= INT32_MAX else torch.int64
            row_ptr, col_idx, values = _csr(tensor, masks[name], index_dtype)
            keys = {part: f"csr/{name}/{part}" for part in ("mask", "row_ptr", "col_idx", "values")}
            tensors.update({keys["mask"]: masks[name].clone(), keys["row_ptr"]: row_ptr,
                            keys["col_idx"]: col_idx, keys["values"]: values})
            entry.update({"storage": "csr", "keys": keys, "matrix_shape": [rows, cols], "nnz": nnz,
                          "index_dtype": DTYPE_CODES[index_dtype],
                          "gate_order": _gate_names(model, name, targets),
                          "gate_axis": 1 if getattr(targets.get(name), "transposed", False) else 0})
        else:
            key = f"dense/{name}"
            tensors[key] = tensor.clone(memory_format=torch.contiguous_format)  # tied weights share storage
            entry.update({"storage": "dense", "key": key})
        entries.append(entry)

    embeddings = {}
    for target_name, pair in _embedding_tensors(handle).items():
        row_key = f"embedding/{target_name}/row"
        col_key = row_key if pair["shared"] else f"embedding/{target_name}/col"
        tensors[row_key] = pair["row"]
        tensors[col_key] = pair["col"]
        embeddings[target_name] = {"row": row_key, "col": col_key, "shared": bool(pair["shared"])}

    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "manifold": manifold,
        "inhibitor": inhibitor,
        "config": config,
        "entries": entries,
        "targets": [_target_record(t) for t in getattr(handle, "targets", [])] if handle is not None else [],
        "sparsity": _sparsity(masks, handle),
        "embeddings": embeddings,
        "tensors": {key: _tensor_record(t) for key, t in sorted(tensors.items())},
        "user": {str(k): str(v) for k, v in (metadata or {}).items()},
    }
    text = json.dumps(document, sort_keys=True, default=str)
    header = {METADATA_KEY: text, METADATA_SHA_KEY: hashlib.sha256(text.encode("utf-8")).hexdigest()}
    atomic_write_bytes(path, safetensors_save(tensors, metadata=header))
    return json.loads(text)


# --------------------------------------------------------------------------- reading
def _fail(message: str) -> ExportFormatError:
    return ExportFormatError(message)


def _parse_container(data: bytes) -> tuple[dict[str, Any], dict[str, memoryview]]:
    """Parse the safetensors container: header JSON and the byte range of each tensor."""
    if len(data) < 8:
        raise _fail(f"file is {len(data)} bytes long; a safetensors file has at least an 8-byte header length")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size < 2 or header_size > len(data) - 8:
        raise _fail(f"header length {header_size} does not fit the file of {len(data)} bytes (truncated?)")
    try:
        header = json.loads(data[8:8 + header_size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(f"safetensors header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise _fail("safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict):
        raise _fail("no __metadata__ in the safetensors header: not a moduli-transform export")
    buffer = memoryview(data)[8 + header_size:]
    spans, ranges = [], {}
    for key, info in header.items():
        if not (isinstance(info, dict) and isinstance(info.get("data_offsets"), list)
                and len(info["data_offsets"]) == 2 and all(type(v) is int for v in info["data_offsets"])):
            raise _fail(f"tensor {key!r}: malformed header entry")
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= len(buffer):
            raise _fail(f"tensor {key!r}: data offsets [{begin}, {end}) outside the {len(buffer)}-byte "
                        "data section (truncated file?)")
        spans.append((begin, end))
        ranges[key] = (info, buffer[begin:end])
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            raise _fail("tensor data sections overlap or leave gaps")
        position = end
    if position != len(buffer):
        raise _fail(f"data section is {len(buffer)} bytes but the tensors cover {position} (truncated or padded?)")
    return metadata, ranges


def _parse_document(metadata: dict[str, Any]) -> dict[str, Any]:
    text, digest = metadata.get(METADATA_KEY), metadata.get(METADATA_SHA_KEY)
    if not isinstance(text, str) or not isinstance(digest, str):
        raise _fail(f"__metadata__ lacks {METADATA_KEY!r} / {METADATA_SHA_KEY!r}: not a moduli-transform export")
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != digest:
        raise _fail("metadata checksum mismatch: the metadata JSON is corrupted")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise _fail(f"metadata is not valid JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise _fail(f"metadata format is not {FORMAT_NAME!r}")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise _fail(f"unsupported format version {version!r}; this reader supports {FORMAT_VERSION}")
    for field, kind in (("entries", list), ("tensors", dict), ("embeddings", dict)):
        if not isinstance(document.get(field), kind):
            raise _fail(f"metadata field {field!r} is missing or not a {kind.__name__}")
    return document


def _decode_tensors(document: dict[str, Any], ranges: dict[str, tuple[dict, memoryview]]) -> dict[str, Tensor]:
    declared = document["tensors"]
    if set(declared) != set(ranges):
        missing, extra = sorted(set(declared) - set(ranges)), sorted(set(ranges) - set(declared))
        raise _fail(f"tensor keys do not match the metadata (missing {missing[:5]}, unexpected {extra[:5]})")
    tensors = {}
    for key, (info, raw) in ranges.items():
        record = declared[key]
        if not isinstance(record, dict):
            raise _fail(f"tensor {key!r}: metadata record is not an object")
        code, shape = info.get("dtype"), info.get("shape")
        if code not in DTYPES or code != record.get("dtype"):
            raise _fail(f"tensor {key!r}: dtype {code!r} (metadata says {record.get('dtype')!r})")
        if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)
                and shape == record.get("shape")):
            raise _fail(f"tensor {key!r}: shape {shape!r} (metadata says {record.get('shape')!r})")
        dtype = DTYPES[code]
        if len(raw) != math.prod(shape) * dtype.itemsize:
            raise _fail(f"tensor {key!r}: {len(raw)} bytes for shape {shape} of {code}")
        if hashlib.sha256(raw).hexdigest() != record.get("sha256"):
            raise _fail(f"tensor {key!r}: SHA-256 checksum mismatch (corrupted data)")
        if len(raw) == 0:
            tensors[key] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if dtype == torch.bool and int(flat.max()) > 1:
            raise _fail(f"tensor {key!r}: bool values other than 0 and 1")
        tensors[key] = flat.view(dtype).reshape(shape)
    return tensors


def _expect(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise _fail(f"{name!r}: {message}")


def _tensor_for(tensors: dict[str, Tensor], entry: dict, key: Any, name: str) -> Tensor:
    _expect(isinstance(key, str) and key in tensors, name, f"tensor key {key!r} is not in the file")
    return tensors[key]


def _dense_from_csr(entry: dict[str, Any], tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    name, shape, dtype = entry["name"], tuple(entry["shape"]), DTYPES[entry["dtype"]]
    keys = entry.get("keys")
    _expect(isinstance(keys, dict) and keys == {p: f"csr/{name}/{p}" for p in ("mask", "row_ptr", "col_idx", "values")},
            name, "CSR keys do not follow the naming scheme csr/<name>/<part>")
    _expect(len(shape) >= 1, name, "a CSR entry needs at least one dimension")
    rows, cols = _matrix_shape(shape)
    _expect(entry.get("matrix_shape") == [rows, cols], name,
            f"matrix_shape {entry.get('matrix_shape')} is not {[rows, cols]} for shape {list(shape)}")
    index_code = entry.get("index_dtype")
    _expect(index_code in INDEX_DTYPES, name, f"index_dtype {index_code!r} is not one of {INDEX_DTYPES}")
    nnz = entry.get("nnz")
    _expect(type(nnz) is int and 0 <= nnz <= rows * cols, name, f"nnz {nnz!r} out of range [0, {rows * cols}]")
    mask, row_ptr, col_idx, values = (_tensor_for(tensors, entry, keys[p], name)
                                      for p in ("mask", "row_ptr", "col_idx", "values"))
    index_dtype = DTYPES[index_code]
    _expect(mask.dtype == torch.bool and tuple(mask.shape) == shape, name, f"mask must be bool of shape {list(shape)}")
    _expect(row_ptr.dtype == index_dtype and tuple(row_ptr.shape) == (rows + 1,), name,
            f"row_ptr must be {index_code} of shape [{rows + 1}]")
    _expect(col_idx.dtype == index_dtype and tuple(col_idx.shape) == (nnz,), name,
            f"col_idx must be {index_code} of shape [{nnz}]")
    _expect(values.dtype == dtype and tuple(values.shape) == (nnz,), name,
            f"values must be {entry['dtype']} of shape [{nnz}]")
    row_ptr64, col_idx64 = row_ptr.to(torch.int64), col_idx.to(torch.int64)
    _expect(int(row_ptr64[0]) == 0 and int(row_ptr64[-1]) == nnz, name,
            f"row_ptr must start at 0 and end at nnz={nnz}")
    counts = row_ptr64[1:] - row_ptr64[:-1]
    _expect(bool((counts >= 0).all()), name, "row_ptr is not non-decreasing")
    _expect(nnz == 0 or (int(col_idx64.min()) >= 0 and int(col_idx64.max()) < cols), name,
            f"column indices outside [0, {cols})")
    row_of = torch.repeat_interleave(torch.arange(rows), counts)
    flat_index = row_of * cols + col_idx64
    _expect(nnz < 2 or bool((flat_index[1:] > flat_index[:-1]).all()), name,
            "column indices are not strictly increasing within each row")
    mask_flat = mask.reshape(-1)
    _expect(int(mask_flat.sum()) == nnz and bool(mask_flat[flat_index].all()), name,
            "the CSR pattern does not match the mask")
    dense = torch.zeros(rows * cols, dtype=dtype)
    dense[flat_index] = values
    return dense.reshape(shape), mask.clone()


def _validate_entry(entry: Any, seen: set[str]) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise _fail("metadata entry without a name")
    name = entry["name"]
    _expect(name not in seen, name, "listed twice")
    _expect(entry.get("dtype") in DTYPES, name, f"unknown dtype {entry.get('dtype')!r}")
    shape = entry.get("shape")
    _expect(isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape), name,
            f"shape {shape!r} is not a list of non-negative integers")
    _expect(entry.get("storage") in ("dense", "csr"), name, f"unknown storage {entry.get('storage')!r}")


def read_safetensors(path: str | os.PathLike) -> LoadedExport:
    """Read and fully validate a file written by :func:`save_safetensors`.

    Raises:
        ExportFormatError: truncated or corrupted file, checksum mismatch, malformed CSR,
            metadata that disagrees with the tensors, or an unknown format version.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    metadata, ranges = _parse_container(data)
    document = _parse_document(metadata)
    tensors = _decode_tensors(document, ranges)
    state: OrderedDict[str, Tensor] = OrderedDict()
    masks: dict[str, Tensor] = {}
    used: set[str] = set()
    for entry in document["entries"]:
        _validate_entry(entry, set(state))
        name = entry["name"]
        if entry["storage"] == "dense":
            key = entry.get("key")
            _expect(key == f"dense/{name}", name, f"dense key {key!r} is not 'dense/{name}'")
            tensor = _tensor_for(tensors, entry, key, name)
            _expect(tensor.dtype == DTYPES[entry["dtype"]] and list(tensor.shape) == entry["shape"], name,
                    f"stored tensor is {tensor.dtype} {list(tensor.shape)}, metadata says "
                    f"{entry['dtype']} {entry['shape']}")
            state[name] = tensor.clone()
            used.add(key)
        else:
            state[name], masks[name] = _dense_from_csr(entry, tensors)
            used.update(entry["keys"].values())
    embeddings = {}
    for target, record in document["embeddings"].items():
        _expect(isinstance(record, dict) and all(isinstance(record.get(p), str) and record[p] in tensors
                                                 for p in ("row", "col")), target, "bad embedding record")
        embeddings[target] = {p: tensors[record[p]].clone() for p in ("row", "col")}
        used.update((record["row"], record["col"]))
    unused = sorted(set(tensors) - used)
    if unused:
        raise _fail(f"tensors not referenced by the metadata: {unused[:5]}")
    return LoadedExport(state, masks, embeddings, document)


def load_safetensors(path: str | os.PathLike) -> "OrderedDict[str, Tensor]":
    """The model ``state_dict`` stored in ``path`` (dense; loads with ``strict=True``).

    Raises:
        ExportFormatError: see :func:`read_safetensors`.
    """
    return read_safetensors(path).state_dict
