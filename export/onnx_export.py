"""ONNX export of pruned models, verified against PyTorch with ONNX Runtime.

Uses the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``): with torch 2.13
it works offline and turns ``nn.RNN/GRU/LSTM`` into ONNX ``RNN/GRU/LSTM`` nodes whose
sequence axis is dynamic. The dynamo exporter needs ``onnxscript`` (not installed here).

Sequence length:

* fused layers (``nn.RNN/GRU/LSTM``): any length. This is checked, not assumed: after
  export ONNX Runtime is run on a longer sequence than the traced one and compared with
  PyTorch.
* anything else (cells called in a Python loop): the tracer unrolls the loop, so the
  graph computes exactly the traced number of steps. A graph with a dynamic time axis
  would then silently ignore extra steps, so such models are re-exported with a *fixed*
  time axis: ONNX Runtime itself rejects other lengths, the traced length is recorded in
  the report and in ``metadata_props``, and :func:`run_onnx` refuses other lengths with
  :class:`SequenceLengthError`.

Which inputs have the time axis: the first input with a ``sequence_axis`` dimension is the
sequence, and so is every input with the same length there; the others (a ``(B, D)`` start
code, an initial state) keep their shape in the parity checks and in the graph
(:func:`sequence_inputs`; the report's and the metadata's ``sequence_inputs`` list them).

Gate order: PyTorch stacks LSTM gates as (i, f, g, o), ONNX as (i, o, f, c); GRU
(r, z, n) vs ONNX (z, r, n). Every ONNX initializer that comes from one of our
parameters is listed in the report (``mappings``) with the parameter names per direction
and the gate permutation, masks are given in ONNX layout, and the same mapping is
stored as JSON in the model's ``metadata_props`` under ``"moduli_transform"``.

``sparse_initializers=True`` stores the recurrent weights (and any masked weight) as
ONNX ``sparse_initializer`` entries (values + linear int64 indices). ONNX Runtime loads
them directly (it densifies them when the session is created), so no conversion is needed
on load.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .safetensors_format import atomic_write_bytes

__all__ = [
    "OnnxExportError", "SequenceLengthError", "InitializerMapping", "OnnxExportReport",
    "to_onnx", "run_onnx", "sequence_inputs", "ONNX_GATE_PERMUTATION",
]

METADATA_KEY = "moduli_transform"
DEFAULT_OPSET = 17
TOLERANCE = 1e-5
EXTRA_STEPS = 3  # how much longer the sequence used to check a dynamic time axis is
# The TracerWarning text for `if tensor:` / `if x.sum() > 0:` in a traced forward.
DATA_DEPENDENT = "Converting a tensor to a Python boolean"

# ONNX gate block j holds PyTorch gate block ONNX_GATE_PERMUTATION[op][j].
ONNX_GATE_PERMUTATION: dict[str, tuple[int, ...]] = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2), "RNN": (0,)}
TORCH_GATES = {"LSTM": ("i", "f", "g", "o"), "GRU": ("r", "z", "n"), "RNN": ("h",)}
ONNX_GATES = {"LSTM": ("i", "o", "f", "c"), "GRU": ("z", "r", "n"), "RNN": ("h",)}
FUSED_OPS = {nn.LSTM: "LSTM", nn.GRU: "GRU", nn.RNN: "RNN"}


class OnnxExportError(ValueError):
    """The model could not be exported, or the export does not reproduce PyTorch."""


class SequenceLengthError(ValueError):
    """An input's sequence length is beyond what the exported graph computes."""


@dataclass
class InitializerMapping:
    """Where one ONNX initializer's values come from.

    Attributes:
        initializer: ONNX initializer name.
        role: ``"W"``/``"R"``/``"B"`` (inputs of an ONNX RNN/GRU/LSTM node) or ``"param"``.
        parameters: our parameter names, one per direction (``B`` lists ``bias_ih`` then
            ``bias_hh`` per direction).
        op_type: ``"LSTM"``, ``"GRU"``, ``"RNN"`` or ``""`` for a plain parameter.
        gate_permutation: ONNX gate block ``j`` is PyTorch gate block ``gate_permutation[j]``.
        transposed: the initializer is the parameter transposed (folded MatMul weights).
        sparse: stored as an ONNX sparse initializer.
    """

    initializer: str
    role: str
    parameters: list[str]
    op_type: str = ""
    node: str = ""
    gate_permutation: list[int] = field(default_factory=list)
    torch_gate_order: list[str] = field(default_factory=list)
    onnx_gate_order: list[str] = field(default_factory=list)
    transposed: bool = False
    sparse: bool = False


@dataclass
class OnnxExportReport:
    """What :func:`to_onnx` wrote and verified."""

    path: str
    opset: int
    input_names: list[str]
    output_names: list[str]
    sequence_axis: int
    traced_sequence_length: int
    dynamic_sequence: bool
    max_abs_error: dict[int, float]
    mappings: list[InitializerMapping]
    masks: dict[str, Tensor]
    file_bytes: int
    sparse_initializers: list[str]
    sequence_inputs: list[str] = field(default_factory=list)  # the inputs with a time axis

    @property
    def max_sequence_length(self) -> int | None:
        """``None`` when any length works, else the one traced length the graph computes."""
        return None if self.dynamic_sequence else self.traced_sequence_length

    def metadata(self) -> dict[str, Any]:
        """The JSON stored in the ONNX ``metadata_props`` (no tensors)."""
        return {
            "format_version": 1, "input_names": self.input_names, "output_names": self.output_names,
            "sequence_axis": self.sequence_axis, "traced_sequence_length": self.traced_sequence_length,
            "dynamic_sequence": self.dynamic_sequence, "max_sequence_length": self.max_sequence_length,
            "sequence_inputs": self.sequence_inputs,
            "max_abs_error": {str(k): v for k, v in self.max_abs_error.items()},
            "mappings": [asdict(m) for m in self.mappings],
        }


# --------------------------------------------------------------------------- helpers
def _as_tuple(example_inputs: Any) -> tuple[Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise ValueError("example_inputs must be a tensor or a tuple of tensors")
    return inputs


def _flatten(outputs: Any) -> list[Tensor]:
    if isinstance(outputs, Tensor):
        return [outputs]
    if isinstance(outputs, (tuple, list)):
        return [t for item in outputs for t in _flatten(item)]
    if isinstance(outputs, dict):
        return [t for item in outputs.values() for t in _flatten(item)]
    return []


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _default_sequence_axis(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            return 1 if module.batch_first else 0
    return 1


def sequence_inputs(inputs: Sequence[Tensor], axis: int) -> list[bool]:
    """Which inputs carry the time axis: those whose length on ``axis`` is the first such input's.

    The first input with an ``axis`` dimension is the sequence; an input with another length
    there (a ``(B, D)`` start code, an ``(L, B, H)`` initial state) has no time axis and keeps
    its shape in the parity checks and in the exported graph.

    Example:
        >>> sequence_inputs([torch.zeros(2, 20, 3), torch.zeros(2, 256), torch.zeros(2, 20)], axis=1)
        [True, False, True]
    """
    lengths = [int(x.shape[axis]) if x.dim() > axis else None for x in inputs]
    traced = next((length for length in lengths if length is not None), None)
    return [traced is not None and length == traced for length in lengths]


def _resized(inputs: tuple[Tensor, ...], axis: int, length: int, seed: int) -> tuple[Tensor, ...]:
    """Random inputs like ``inputs``, the sequence inputs with ``length`` steps on ``axis``.

    Inputs without the time axis (see :func:`sequence_inputs`) get random values of their
    own shape; inputs without an ``axis`` dimension at all are kept as they are.
    """
    generator = torch.Generator().manual_seed(seed)
    out = []
    for x, sequenced in zip(inputs, sequence_inputs(inputs, axis)):
        if x.dim() <= axis:
            out.append(x)
            continue
        shape = list(x.shape)
        if sequenced:
            shape[axis] = length
        if x.is_floating_point():
            out.append(torch.randn(shape, generator=generator, dtype=x.dtype))
        else:
            low, high = int(x.min()), int(x.max()) + 1
            out.append(torch.randint(low, high, shape, generator=generator, dtype=x.dtype))
    return tuple(out)


def _check_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    parameters = dict(model.named_parameters())
    checked = {}
    for name, mask in masks.items():
        if name not in parameters:
            raise ValueError(f"mask for unknown parameter {name!r}; parameters: {', '.join(parameters)}")
        weight = parameters[name].detach()
        if mask.dtype != torch.bool or mask.shape != weight.shape:
            raise ValueError(f"mask for {name!r} must be bool of shape {tuple(weight.shape)}")
        leaked = int(((weight != 0) & ~mask.to(weight.device)).sum())
        if leaked:
            raise ValueError(f"{name!r} has {leaked} non-zero weights where its mask is False; "
                             "prune first (handle.apply_masks())")
        checked[name] = mask.detach().cpu()
    return checked


def _export_bytes(model: nn.Module, inputs: tuple[Tensor, ...], input_names: list[str],
                  output_names: list[str], sequence_axis: int, dynamic_sequence: bool, opset: int) -> bytes:
    batch_axis = 1 if sequence_axis == 0 else 0
    dynamic_axes = {}
    for name, x, sequenced in zip(input_names, inputs, sequence_inputs(inputs, sequence_axis)):
        axes = {batch_axis: f"{name}_batch"} if x.dim() > batch_axis else {}
        if dynamic_sequence and sequenced:
            axes[sequence_axis] = "sequence"
        if axes:
            dynamic_axes[name] = axes
    buffer = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # recorded, not shown: most are the legacy exporter's notices
        try:
            torch.onnx.export(model, inputs, buffer, dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        except Exception as error:  # the exporter raises many types; report them as one
            raise OnnxExportError(f"torch.onnx.export failed: {type(error).__name__}: {error}") from error
    _raise_on_data_dependent_branch(caught)
    return buffer.getvalue()


def _raise_on_data_dependent_branch(caught: Sequence[warnings.WarningMessage]) -> None:
    """A tensor turned into a Python bool means the tracer froze one branch of an ``if``:
    the ONNX graph would then be right only for inputs that take the traced branch."""
    # torch's own modules check shapes and flags this way (nn.LSTM's input checks); those
    # branches do not depend on the data, so only the user's code counts.
    torch_root = os.path.dirname(os.path.abspath(torch.__file__))
    for warning in caught:
        if (issubclass(warning.category, torch.jit.TracerWarning) and DATA_DEPENDENT in str(warning.message)
                and not os.path.abspath(warning.filename).startswith(torch_root + os.sep)):
            raise OnnxExportError(
                f"{warning.filename}:{warning.lineno}: the forward branches on tensor values (a tensor "
                "is converted to a Python boolean); the traced ONNX graph keeps one branch only and "
                "would be wrong for other inputs. Rewrite the branch with torch.where, or keep it out "
                "of the exported forward")


# --------------------------------------------------------------------------- mapping
def _permute_gates(tensor: Tensor, op_type: str) -> Tensor:
    blocks = tensor.chunk(len(ONNX_GATE_PERMUTATION[op_type]), dim=0)
    return torch.cat([blocks[j] for j in ONNX_GATE_PERMUTATION[op_type]], dim=0)


def _fused_layers(model: nn.Module) -> list[tuple[str, str, dict[str, list[str]], dict[str, np.ndarray]]]:
    """(module name, op type, role -> parameter names, role -> expected ONNX array) per layer."""
    layers = []
    for module_name, module in model.named_modules():
        op_type = FUSED_OPS.get(type(module))
        if op_type is None:
            continue
        prefix = f"{module_name}." if module_name else ""
        suffixes = ["", "_reverse"] if module.bidirectional else [""]
        for layer in range(module.num_layers):
            names = {"W": [f"{prefix}weight_ih_l{layer}{s}" for s in suffixes],
                     "R": [f"{prefix}weight_hh_l{layer}{s}" for s in suffixes]}
            if module.bias:
                names["B"] = [f"{prefix}{b}_l{layer}{s}" for s in suffixes for b in ("bias_ih", "bias_hh")]
            expected = {}
            for role in ("W", "R"):
                expected[role] = torch.stack([_permute_gates(getattr(module, n[len(prefix):]).detach(), op_type)
                                              for n in names[role]]).numpy()
            if module.bias:
                pairs = [names["B"][i:i + 2] for i in range(0, len(names["B"]), 2)]
                expected["B"] = torch.stack([
                    torch.cat([_permute_gates(getattr(module, n[len(prefix):]).detach(), op_type) for n in pair])
                    for pair in pairs]).numpy()
            layers.append((module_name, op_type, names, expected))
    return layers


def _map_initializers(graph: Any, model: nn.Module) -> list[InitializerMapping]:
    from onnx import numpy_helper

    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    layers = _fused_layers(model)
    mappings: dict[str, InitializerMapping] = {}
    for node in graph.node:
        if node.op_type not in ONNX_GATE_PERMUTATION:
            continue
        inputs = {"W": node.input[1], "R": node.input[2], "B": node.input[3] if len(node.input) > 3 else ""}
        for module_name, op_type, names, expected in layers:
            if op_type != node.op_type or inputs["W"] not in arrays or inputs["R"] not in arrays:
                continue
            if not (np.array_equal(arrays[inputs["W"]], expected["W"])
                    and np.array_equal(arrays[inputs["R"]], expected["R"])):
                continue
            for role, initializer in inputs.items():
                if role in names and initializer in arrays and initializer not in mappings:
                    mappings[initializer] = InitializerMapping(
                        initializer=initializer, role=role, parameters=names[role], op_type=op_type,
                        node=node.name, gate_permutation=list(ONNX_GATE_PERMUTATION[op_type]),
                        torch_gate_order=list(TORCH_GATES[op_type]), onnx_gate_order=list(ONNX_GATES[op_type]))
            break
    parameters = {name: p.detach().numpy() for name, p in model.named_parameters()}
    for initializer, array in arrays.items():
        if initializer in mappings:
            continue
        for name, value in parameters.items():
            if array.shape == value.shape and (initializer == name or np.array_equal(array, value)):
                mappings[initializer] = InitializerMapping(initializer, "param", [name])
                break
            if value.ndim == 2 and array.shape == value.T.shape and np.array_equal(array, value.T):
                mappings[initializer] = InitializerMapping(initializer, "param", [name], transposed=True)
                break
    return list(mappings.values())


def _onnx_mask(mapping: InitializerMapping, masks: Mapping[str, Tensor]) -> Tensor | None:
    """The mask in the initializer's layout, or None when none of its parameters is masked."""
    if not any(name in masks for name in mapping.parameters):
        return None
    parameters = mapping.parameters
    if mapping.role == "param":
        mask = masks[parameters[0]]
        return mask.T if mapping.transposed else mask
    if not all(name in masks for name in parameters):
        return None  # e.g. B of a layer whose biases are only partly masked
    per_direction = [_permute_gates(masks[name], mapping.op_type) for name in parameters]
    if mapping.role == "B":
        per_direction = [torch.cat(per_direction[i:i + 2]) for i in range(0, len(per_direction), 2)]
    return torch.stack(per_direction)


def _to_sparse_initializers(model_proto: Any, names: Sequence[str]) -> list[str]:
    from onnx import helper, numpy_helper

    converted = []
    for init in list(model_proto.graph.initializer):
        if init.name not in names:
            continue
        array = numpy_helper.to_array(init)
        flat = array.reshape(-1)
        indices = np.flatnonzero(flat).astype(np.int64)
        values = numpy_helper.from_array(flat[indices], init.name)
        sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(indices, ""), list(array.shape))
        model_proto.graph.initializer.remove(init)
        model_proto.graph.sparse_initializer.append(sparse)
        converted.append(init.name)
    return converted


# --------------------------------------------------------------------------- running
def _session(path_or_bytes: str | bytes | os.PathLike) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = path_or_bytes if isinstance(path_or_bytes, bytes) else os.fspath(path_or_bytes)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _metadata_of(session: Any) -> dict[str, Any]:
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None:
        raise ValueError(f"the ONNX model has no {METADATA_KEY!r} metadata: export it with moduli_transform.export.to_onnx")
    return json.loads(text)


def _as_numpy(inputs: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    if isinstance(inputs, Mapping):
        items = dict(inputs)
    else:
        items = dict(zip(names, (inputs,) if isinstance(inputs, (Tensor, np.ndarray)) else inputs))
    return {k: v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v) for k, v in items.items()}


def run_onnx(path: str | os.PathLike, inputs: Any) -> list[np.ndarray]:
    """Run an exported model with ONNX Runtime, refusing sequence lengths it cannot compute.

    Args:
        path: a file written by :func:`to_onnx`.
        inputs: a tensor/array, a tuple of them (in input order) or a name -> value dict.

    Returns:
        The outputs as numpy arrays, in output order.

    Raises:
        SequenceLengthError: an input's length on the recorded sequence axis differs from
            the traced length of a graph with a fixed (unrolled) sequence.
    """
    session = _session(path)
    meta = _metadata_of(session)
    feeds = _as_numpy(inputs, meta["input_names"])
    limit, axis = meta["max_sequence_length"], meta["sequence_axis"]
    sequenced = meta.get("sequence_inputs", list(feeds))  # files written before it was recorded: all
    if limit is not None:
        for name, value in feeds.items():
            if name in sequenced and value.ndim > axis and value.shape[axis] != limit:
                raise SequenceLengthError(
                    f"input {name!r} has {value.shape[axis]} steps on axis {axis}, but this graph was "
                    f"traced (loop unrolled) at exactly {limit} steps; split or pad the sequence to "
                    f"{limit} steps, or re-export with a longer example input")
    return session.run(None, feeds)


def _probe_inputs(inputs: tuple[Tensor, ...], axis: int, length: int, seed: int) -> list[tuple[Tensor, ...]]:
    """Inputs the ONNX graph must agree on at ``length`` steps: random ones of the same
    shapes and their negation (a frozen branch or a constant folded from the example shows
    up on at least one of them)."""
    probe = _resized(inputs, axis, length, seed=seed)
    flipped = tuple(-x if x.is_floating_point() else x for x in probe)
    return [probe, flipped]


def _parity(session: Any, model: nn.Module, input_sets: Sequence[tuple[Tensor, ...]], names: list[str]) -> float:
    """The largest ONNX Runtime vs PyTorch difference over several input sets."""
    return max(_max_abs_error(session, model, inputs, names) for inputs in input_sets)


def _max_abs_error(session: Any, model: nn.Module, inputs: tuple[Tensor, ...], names: list[str]) -> float:
    with torch.no_grad():
        expected = [t.detach().cpu().numpy() for t in _flatten(model(*inputs))]
    actual = session.run(None, _as_numpy(inputs, names))
    if len(actual) != len(expected) or any(a.shape != e.shape for a, e in zip(actual, expected)):
        return math.inf
    return max((float(np.max(np.abs(a - e))) if a.size else 0.0 for a, e in zip(actual, expected)), default=0.0)


# --------------------------------------------------------------------------- export
def to_onnx(model: Any, example_inputs: Any, path: str | os.PathLike, *,
            masks: Mapping[str, Tensor] | None = None, sparse_initializers: bool = False,
            sequence_axis: int | None = None, opset: int = DEFAULT_OPSET,
            input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
            tolerance: float = TOLERANCE) -> OnnxExportReport:
    """Export a (pruned) model to ONNX, check it, and verify it against PyTorch.

    Args:
        model: an ``nn.Module`` (called as ``model(*example_inputs)``) or a ModuliHandle.
        example_inputs: a tensor or tuple of tensors.
        path: destination ``.onnx`` file; written atomically after verification.
        masks: parameter name -> bool mask (default: the handle's masks); weights must
            already be zero where the mask is False.
        sparse_initializers: store recurrent weights (and masked ones) as ONNX sparse initializers.
        sequence_axis: the time axis of the inputs (default: 1 for batch-first RNN layers
            and for models without ``nn.RNNBase``, else 0).

    Returns:
        An :class:`OnnxExportReport` (mapping, masks in ONNX layout, errors, file size).

    Raises:
        OnnxExportError: the export fails, ``onnx.checker`` rejects it, or ONNX Runtime
            differs from PyTorch by more than ``tolerance`` on the traced length.
    """
    import onnx

    if not isinstance(model, nn.Module) and hasattr(model, "model") and hasattr(model, "masks"):
        masks = dict(model.masks) if masks is None else masks
        model = model.model
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module or a ModuliHandle, got {type(model).__name__}")
    inputs = _as_tuple(example_inputs)
    masks = _check_masks(model, masks or {})
    axis = _default_sequence_axis(model) if sequence_axis is None else int(sequence_axis)
    sequenced = [x for x in inputs if x.dim() > axis]
    if not sequenced:
        raise ValueError(f"no example input has a sequence axis {axis}; pass sequence_axis=")
    traced_length = int(sequenced[0].shape[axis])
    names = list(input_names or [f"input_{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))])
    with _eval_mode(model), torch.no_grad():
        n_outputs = len(_flatten(model(*inputs)))
        outputs = list(output_names or [f"output_{i}" for i in range(n_outputs)])
        data, dynamic, errors = _export_checked(model, inputs, names, outputs, axis, opset, tolerance)
        model_proto = onnx.load_from_string(data)
        mappings = _map_initializers(model_proto.graph, model)
    onnx_masks = {m.initializer: mask for m in mappings if (mask := _onnx_mask(m, masks)) is not None}
    _check(model_proto, full=True)
    sparse_names: list[str] = []
    if sparse_initializers:
        wanted = {m.initializer for m in mappings if m.role == "R" or m.initializer in onnx_masks}
        sparse_names = _to_sparse_initializers(model_proto, wanted)
        for mapping in mappings:
            mapping.sparse = mapping.initializer in sparse_names
    report = OnnxExportReport(
        path=os.fspath(path), opset=opset, input_names=names, output_names=outputs, sequence_axis=axis,
        traced_sequence_length=traced_length, dynamic_sequence=dynamic, max_abs_error=errors,
        mappings=mappings, masks=onnx_masks, file_bytes=0, sparse_initializers=sparse_names,
        sequence_inputs=[name for name, sequenced in zip(names, sequence_inputs(inputs, axis)) if sequenced])
    entry = model_proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(report.metadata(), sort_keys=True)
    # onnx's shape inference types sparse initializers as sparse_tensor and rejects them as
    # inputs of dense ops, so the graph is fully checked while dense, structurally after.
    _check(model_proto, full=not sparse_names)
    final = model_proto.SerializeToString()
    if sparse_names:  # the stored graph changed: check it still runs and matches
        with _eval_mode(model):
            error = _parity(_session(final), model, [inputs, *_probe_inputs(inputs, axis, traced_length, 2)],
                            names)
        if not error <= tolerance:
            raise OnnxExportError(f"with sparse initializers ONNX Runtime differs from PyTorch by {error:.3g}")
    atomic_write_bytes(path, final)
    report.file_bytes = len(final)
    return report


def _check(model_proto: Any, full: bool) -> None:
    import onnx

    try:
        onnx.checker.check_model(model_proto, full_check=full)
    except Exception as error:  # checker raises ValidationError and shape-inference errors
        raise OnnxExportError(f"onnx.checker rejected the exported model: {error}") from error


def _export_checked(model: nn.Module, inputs: tuple[Tensor, ...], names: list[str], outputs: list[str],
                    axis: int, opset: int, tolerance: float) -> tuple[bytes, bool, dict[int, float]]:
    """Export with a dynamic time axis if ONNX Runtime proves it right, else a fixed one."""
    traced = int(next(x for x in inputs if x.dim() > axis).shape[axis])
    negated = tuple(-x if x.is_floating_point() else x for x in inputs)
    at_traced = [inputs, negated, *_probe_inputs(inputs, axis, traced, seed=1)]
    longer = _probe_inputs(inputs, axis, traced + EXTRA_STEPS, seed=0)
    data = _export_bytes(model, inputs, names, outputs, axis, True, opset)
    session = _session(data)
    errors = {traced: _parity(session, model, at_traced, names)}
    if not errors[traced] <= tolerance:
        raise OnnxExportError(f"ONNX Runtime differs from PyTorch by {errors[traced]:.3g} "
                              f"(> {tolerance}) at the traced length {traced} (example, negated "
                              "and random inputs)")
    try:
        errors[traced + EXTRA_STEPS] = _parity(session, model, longer, names)
    except Exception:  # ORT rejects the longer input: the graph is not length-generic
        errors[traced + EXTRA_STEPS] = math.inf
    if errors[traced + EXTRA_STEPS] <= tolerance:
        return data, True, errors
    data = _export_bytes(model, inputs, names, outputs, axis, False, opset)
    errors = {traced: _parity(_session(data), model, at_traced, names)}
    if not errors[traced] <= tolerance:
        raise OnnxExportError(f"fixed-length export differs from PyTorch by {errors[traced]:.3g}")
    return data, False, errors
