"""Remove hidden units that pruning has disconnected, so the exported matrices shrink.

After heavy pruning some hidden units no longer reach anything: every outgoing weight is
zero (their column of ``W_hh`` in every gate block and their column in every consumer,
e.g. the decoder).  Such a unit has no effect on the model's output and can be cut out
of ``W_ih`` / ``W_hh`` rows (per gate), ``W_hh`` columns, biases and the consumers.
(A zero row *and* column in ``W_hh`` alone is not enough: the unit is then a feed-forward
unit of the input that still reaches the decoder.)

Torch-Pruning finds the consumers: its dependency graph traces through an
``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` treated as one leaf with :class:`RecurrentPruner`
(its built-in ``LSTMPruner`` mis-slices the gate blocks), and the pruning group lists every
layer reading the RNN's ``output``.  Two limits of tracing are handled by direct index
surgery instead (same pruner, consumers named by the caller via ``consumers=``):
Torch-Pruning's index mapping fails (IndexError, or a wrong group for an LSTM's
``(h_n, c_n)``) when a model also reads the state part of the tuple output.  Stacked modules share one ``hidden_size`` across layers, so inside an
``nn.RNN`` only single-layer modules can shrink; :func:`compact_layers` compacts inner
layers of a stack for the sparse runtime, whose layers may have different sizes.
Every compaction is checked against the original model on example inputs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import Tensor, nn

from moduli_transform.export.sparse_runtime import RecurrentLayer
from moduli_transform.targets import gate_rows

__all__ = [
    "CompactionError",
    "RecurrentPruner",
    "disconnected_units",
    "CompactionReport",
    "compact_model",
    "compact_layers",
]

_RECURRENT = (nn.RNN, nn.GRU, nn.LSTM)


class CompactionError(ValueError):
    """A model the compaction cannot shrink safely (or whose outputs would change)."""


def _gates(module: nn.RNNBase) -> int:
    return module.weight_hh_l0.shape[0] // module.hidden_size


def _keep(size: int, idxs: Sequence[int]) -> Tensor:
    removed = set(int(i) for i in idxs)
    return torch.tensor([i for i in range(size) if i not in removed], dtype=torch.long)


def _set(module: nn.Module, name: str, value: Tensor) -> None:
    setattr(module, name, nn.Parameter(value.detach().clone(),
                                       requires_grad=getattr(module, name).requires_grad))


class RecurrentPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning pruner for single-layer, unidirectional ``nn.RNN/GRU/LSTM``.

    Out channels are the hidden units: ``W_ih`` / ``W_hh`` / bias rows of every gate block
    and ``W_hh`` columns go together.  In channels are the input features (``W_ih`` columns).
    """

    TARGET_MODULES = _RECURRENT

    @staticmethod
    def _check(layer: nn.RNNBase) -> None:
        if layer.num_layers != 1 or layer.bidirectional or getattr(layer, "proj_size", 0):
            raise CompactionError(
                f"{type(layer).__name__}(num_layers={layer.num_layers}, bidirectional="
                f"{layer.bidirectional}) cannot shrink: stacked layers share hidden_size; use "
                "compact_layers() on the sparse runtime's layers instead"
            )

    def prune_out_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.RNNBase:
        self._check(layer)
        hidden, gates = layer.hidden_size, _gates(layer)
        keep = _keep(hidden, idxs)
        rows = gate_rows(keep, gates, hidden)
        with torch.no_grad():
            for name in ("weight_ih_l0", "bias_ih_l0", "bias_hh_l0"):
                if getattr(layer, name, None) is not None:
                    _set(layer, name, getattr(layer, name)[rows])
            _set(layer, "weight_hh_l0", layer.weight_hh_l0[rows][:, keep])
        layer.hidden_size = len(keep)
        layer._init_flat_weights()
        return layer

    def prune_in_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.RNNBase:
        self._check(layer)
        keep = _keep(layer.input_size, idxs)
        with torch.no_grad():
            _set(layer, "weight_ih_l0", layer.weight_ih_l0[:, keep])
        layer.input_size = len(keep)
        layer._init_flat_weights()
        return layer

    def get_out_channels(self, layer: nn.RNNBase) -> int:
        return layer.hidden_size

    def get_in_channels(self, layer: nn.RNNBase) -> int:
        return layer.input_size


def disconnected_units(weight_hh: Tensor, consumers: Sequence[Tensor] = ()) -> Tensor:
    """Indices of hidden units whose outgoing weights are all zero.

    Args:
        weight_hh: ``(gates * H, H)`` recurrent matrix (column ``j`` = unit ``j``'s output).
        consumers: other matrices reading the hidden state, columns = hidden units.

    Example:
        >>> w = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
        >>> disconnected_units(w).tolist(), disconnected_units(w, [torch.tensor([[0.0, 1.0, 0.0]])]).tolist()
        ([1], [])
    """
    dead = (weight_hh == 0).all(0)
    for consumer in consumers:
        dead &= (consumer == 0).all(0)
    return torch.nonzero(dead).flatten()


@dataclass
class CompactionReport:
    """What :func:`compact_model` removed, per RNN module name."""

    removed: dict[str, list[int]] = field(default_factory=dict)
    hidden_before: dict[str, int] = field(default_factory=dict)
    hidden_after: dict[str, int] = field(default_factory=dict)
    traced: dict[str, bool] = field(default_factory=dict)


def _consumer_weights(group) -> list[Tensor]:
    weights = []
    for dependency, _ in group:
        target = dependency.target.module
        if dependency.handler.__name__ == "prune_in_channels" and hasattr(target, "weight"):
            weights.append(target.weight.detach().reshape(target.weight.shape[0],
                                                          target.weight.shape[1], -1)
                           .transpose(1, 2).reshape(-1, target.weight.shape[1]))
    return weights


def _compact_traced(model: nn.Module, name: str, module: nn.RNNBase, example_inputs) -> list[int]:
    pruner = RecurrentPruner()
    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=example_inputs, customized_pruners={type(module): pruner})
    candidates = disconnected_units(module.weight_hh_l0).tolist()
    if not candidates:
        return []
    group = graph.get_pruning_group(module, pruner.prune_out_channels, idxs=candidates)
    consumers = _consumer_weights(group)
    removable = disconnected_units(module.weight_hh_l0, consumers).tolist()
    if removable:
        graph.get_pruning_group(module, pruner.prune_out_channels, idxs=removable).prune()
    return removable


def _compact_direct(model: nn.Module, module: nn.RNNBase, consumer_names: Sequence[str]
                    ) -> list[int]:
    modules = dict(model.named_modules())
    missing = [c for c in consumer_names if c not in modules]
    if missing:
        raise CompactionError(f"unknown consumer modules {missing}; have {sorted(modules)[:10]}")
    consumers = [modules[c] for c in consumer_names]
    removable = disconnected_units(module.weight_hh_l0,
                                   [c.weight.detach() for c in consumers]).tolist()
    if removable:
        RecurrentPruner().prune_out_channels(module, removable)
        for consumer in consumers:
            tp.prune_linear_in_channels(consumer, removable)
    return removable


def _outputs(model: nn.Module, example_inputs) -> list[Tensor]:
    with torch.no_grad():
        result = model(*example_inputs) if isinstance(example_inputs, tuple) \
            else model(example_inputs)
    flat = result if isinstance(result, (tuple, list)) else [result]
    return [t for t in flat if isinstance(t, Tensor)]


def compact_model(model: nn.Module, example_inputs,
                  consumers: Mapping[str, Sequence[str]] | None = None, atol: float = 1e-5
                  ) -> tuple[nn.Module, CompactionReport]:
    """Copy of ``model`` with disconnected hidden units of its single-layer RNNs removed.

    Args:
        model: any model containing ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (not modified).
        example_inputs: a tensor or tuple of tensors for tracing and the output check.
        consumers: ``{rnn module name: [consumer module names]}``; given, that RNN is
            compacted by direct index surgery (needed when the model reads ``h_n``, which
            Torch-Pruning cannot trace); otherwise Torch-Pruning finds them.
        atol: largest output change accepted.

    Returns:
        ``(compacted copy, report)``.

    Raises:
        CompactionError: outputs changed by more than ``atol`` (the model reads the hidden
            state in a way neither tracing nor ``consumers`` covered).
    """
    compacted = copy.deepcopy(model).eval()
    reference = _outputs(model.eval(), example_inputs)
    report = CompactionReport()
    names = [n for n, m in compacted.named_modules() if isinstance(m, _RECURRENT)]
    for name in names:
        module = dict(compacted.named_modules())[name]
        report.hidden_before[name] = module.hidden_size
        if module.num_layers != 1 or module.bidirectional:
            report.removed[name], report.traced[name] = [], False
        elif consumers is not None and name in consumers:
            report.removed[name] = _compact_direct(compacted, module, consumers[name])
            report.traced[name] = False
        else:
            try:
                report.removed[name] = _compact_traced(compacted, name, module, example_inputs)
                report.traced[name] = True
            except (IndexError, RuntimeError) as error:
                raise CompactionError(
                    f"Torch-Pruning could not trace {name!r} ({type(error).__name__}: {error}); "
                    f"pass consumers={{{name!r}: [names of the modules reading its state]}}"
                ) from error
        report.hidden_after[name] = module.hidden_size
    try:
        after = _outputs(compacted, example_inputs)
    except RuntimeError as error:
        raise CompactionError(
            f"the compacted model no longer runs ({error}); Torch-Pruning mis-traced a use "
            "of the RNN's state: pass consumers={rnn name: [modules reading its state]}"
        ) from error
    if len(after) != len(reference) or any(
            a.shape != r.shape or float((a - r).abs().max()) > atol
            for a, r in zip(after, reference)):
        raise CompactionError(
            "compaction changed the model's outputs; a consumer of the hidden state was "
            "missed (pass consumers={rnn name: [modules reading its state]}) or the hidden "
            "state itself is an output"
        )
    return compacted, report


def compact_layers(layers: Sequence[RecurrentLayer]) -> tuple[list[RecurrentLayer], list[Tensor]]:
    """Remove disconnected units of the inner layers of a stack (sparse runtime layers).

    The last layer's units are the stack's output and are kept.  Returns the new layers
    and, per layer, the original indices of the kept units.
    """
    layers = [copy.copy(layer) for layer in layers]
    kept = []
    for index, layer in enumerate(layers):
        hidden, gates = layer.hidden_size, layer.gates
        if index + 1 == len(layers):
            kept.append(torch.arange(hidden))
            break
        dead = disconnected_units(layer.weight_hh, [layers[index + 1].weight_ih]).tolist()
        keep = _keep(hidden, dead)
        rows = gate_rows(keep, gates, hidden)
        layer.weight_ih = layer.weight_ih[rows]
        layer.weight_hh = layer.weight_hh[rows][:, keep]
        layer.bias_ih = None if layer.bias_ih is None else layer.bias_ih[rows]
        layer.bias_hh = None if layer.bias_hh is None else layer.bias_hh[rows]
        following = layers[index + 1]
        following.weight_ih = following.weight_ih[:, keep]
        kept.append(keep)
    return layers, kept
