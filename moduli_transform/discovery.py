"""Finders: which parameters of a model are targets.

A target specification is a finder name, a parameter name, a ``"re:<regex>"`` pattern
(matched in full against parameter names, PEFT style), or a list mixing them:

* ``"recurrent"``: the dataflow pass (:mod:`moduli_transform.graph`) when example inputs
  are given, otherwise PyTorch's recurrent layer types by rule;
* ``"types"``: nn.RNN/GRU/LSTM (every layer, direction, gate block, ``weight_hr`` with
  ``proj_size``) and RNNCell/GRUCell/LSTMCell, by type;
* ``"graph"``: the dataflow pass only (needs example inputs);
* ``"linear"`` / ``"conv"``: every nn.Linear / nn.Conv{1,2,3}d weight (paper appendix I);
* ``"!<name>"`` / ``"!re:<regex>"``: drop what the other entries found (e.g. an attention
  matrix the dataflow pass reports because it reads the state at every step).

New finders plug in with :func:`register_finder`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import nn

from .targets import Target

__all__ = ["FINDERS", "register_finder", "discover_targets", "DiscoveryContext", "NoTargetsError"]


class NoTargetsError(ValueError):
    """Nothing to regularize was found, or a named target does not exist."""


@dataclass
class DiscoveryContext:
    """What finders may use besides the model."""

    example_inputs: tuple | None = None
    example_kwargs: dict | None = None
    method: str = "forward"


Finder = Callable[[nn.Module, DiscoveryContext], list[Target]]
FINDERS: dict[str, Finder] = {}

RNN_GATES = {nn.RNN: ((), 1), nn.GRU: (("r", "z", "n"), 3), nn.LSTM: (("i", "f", "g", "o"), 4)}
CELL_GATES = {nn.RNNCell: ((), 1), nn.GRUCell: (("r", "z", "n"), 3), nn.LSTMCell: (("i", "f", "g", "o"), 4)}


def register_finder(name: str):
    """Decorator adding a finder ``(model, context) -> list[Target]`` under ``name``."""

    def decorate(finder: Finder) -> Finder:
        FINDERS[name] = finder
        return finder

    return decorate


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# Where a weight lives when the module's attribute is not itself the parameter: AWD-LSTM's
# weight drop (``<w>_raw``), old-style spectral_norm (``<w>_orig``) and weight_norm
# (``<w>_v``, the direction), and torch.nn.utils.parametrize (``original``; ``original1``
# is weight_norm's direction).
HELD_AS = ("{}", "{}_raw", "{}_orig", "{}_v", "parametrizations.{}.original",
           "parametrizations.{}.original1")


def _held_weight(module: nn.Module, attribute: str) -> tuple[str, nn.Parameter] | None:
    """The parameter the optimizer updates for ``module.<attribute>``, with its name in
    ``module`` (None when the module holds no such parameter)."""
    parameters = dict(module.named_parameters())
    for pattern in HELD_AS:
        name = pattern.format(attribute)
        if name in parameters and parameters[name].dim() == 2:
            return name, parameters[name]
    return None


def _type_name(module: nn.Module) -> str:
    return type(module).__name__.removeprefix("Parametrized")


def _layer_target(prefix: str, module: nn.Module, attribute: str, evidence: str,
                  gates: int = 1, gate_names: tuple[str, ...] = ()) -> list[Target]:
    held = _held_weight(module, attribute)
    if held is None:
        return []
    name, parameter = held
    if name != attribute:
        evidence += f" (held as {name})"
    return [Target(name=_join(prefix, name), shape=tuple(parameter.shape), gates=gates,
                   gate_names=gate_names, module=prefix, evidence=evidence)]


def _rnn_targets(prefix: str, module: nn.RNNBase) -> list[Target]:
    gate_names, gates = RNN_GATES[type(module)] if type(module) in RNN_GATES else next(
        value for cls, value in RNN_GATES.items() if isinstance(module, cls))
    targets = []
    suffixes = ["", "_reverse"] if module.bidirectional else [""]
    for layer in range(module.num_layers):
        for suffix in suffixes:
            targets += _layer_target(
                prefix, module, f"weight_hh_l{layer}{suffix}", gates=gates, gate_names=gate_names,
                evidence=f"{_type_name(module)} layer {layer}{suffix}: hidden -> hidden")
            if getattr(module, "proj_size", 0) > 0:
                targets += _layer_target(
                    prefix, module, f"weight_hr_l{layer}{suffix}",
                    evidence=f"LSTM layer {layer}{suffix}: projection inside the recurrent loop")
    return targets


@register_finder("types")
def find_by_layer_type(model: nn.Module, context: DiscoveryContext) -> list[Target]:
    """PyTorch's own recurrent layers and cells, by type."""
    targets: list[Target] = []
    for prefix, module in model.named_modules():
        if isinstance(module, tuple(RNN_GATES)):
            targets.extend(_rnn_targets(prefix, module))
        elif isinstance(module, tuple(CELL_GATES)):
            gate_names, gates = next(v for cls, v in CELL_GATES.items() if isinstance(module, cls))
            targets += _layer_target(prefix, module, "weight_hh", gates=gates, gate_names=gate_names,
                                     evidence=f"{_type_name(module)}: hidden -> hidden")
    return targets


@register_finder("graph")
def find_by_dataflow(model: nn.Module, context: DiscoveryContext) -> list[Target]:
    """The dataflow pass over a captured graph; needs example inputs."""
    if context.example_inputs is None:
        raise NoTargetsError(
            "targets='graph' needs example inputs: attach(model, example_inputs=(x,), ...) "
            "with at least two time steps")
    from .graph import find_recurrent_targets

    return find_recurrent_targets(model, tuple(context.example_inputs), method=context.method,
                                  example_kwargs=context.example_kwargs)


@register_finder("recurrent")
def find_recurrent(model: nn.Module, context: DiscoveryContext) -> list[Target]:
    """Dataflow pass when example inputs are given, layer types otherwise."""
    if context.example_inputs is not None:
        return find_by_dataflow(model, context)
    return find_by_layer_type(model, context)


@register_finder("linear")
def find_linear(model: nn.Module, context: DiscoveryContext) -> list[Target]:
    """Every nn.Linear weight: input and output neurons embedded separately."""
    return [Target(name=_join(prefix, "weight"), shape=tuple(module.weight.shape), kind="linear",
                   module=prefix, evidence="nn.Linear: in -> out neurons")
            for prefix, module in model.named_modules()
            if isinstance(module, nn.Linear) and isinstance(module.weight, nn.Parameter)]


@register_finder("conv")
def find_conv(model: nn.Module, context: DiscoveryContext) -> list[Target]:
    """Every ungrouped nn.Conv{1,2,3}d weight: in and out channels embedded separately."""
    return [Target(name=_join(prefix, "weight"), shape=tuple(module.weight.shape), kind="conv",
                   module=prefix, evidence=f"{type(module).__name__}: in -> out channels")
            for prefix, module in model.named_modules()
            if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1
            and not module.transposed]


def _target_for_name(model: nn.Module, name: str, parameter: nn.Parameter) -> Target:
    """A target for an explicitly named parameter, with gate layout when a layer type knows it."""
    by_type = {t.name: t for t in find_by_layer_type(model, DiscoveryContext())}
    if name in by_type:
        return by_type[name]
    shape = tuple(parameter.shape)
    if parameter.dim() == 1:
        kind = "elementwise"
    elif parameter.dim() > 2:
        kind = "conv"
    else:
        kind = "recurrent" if shape[0] == shape[1] else "linear"
    return Target(name=name, shape=shape, kind=kind, module=name.rpartition(".")[0],
                  evidence="named explicitly", regularize=kind != "elementwise")


def _match_pattern(model: nn.Module, pattern: str, parameters: dict[str, nn.Parameter]) -> list[Target]:
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        names = [n for n in parameters if regex.fullmatch(n)]
    else:
        names = [pattern] if pattern in parameters else []
    if not names:
        close = sorted(parameters)[:12]
        raise NoTargetsError(
            f"target {pattern!r} matches no parameter; parameters are e.g. {', '.join(close)}"
            f"{' ...' if len(parameters) > 12 else ''}; finders: {', '.join(sorted(FINDERS))}")
    return [_target_for_name(model, n, parameters[n]) for n in names]


def discover_targets(model: nn.Module, spec: str | Sequence[str], context: DiscoveryContext | None = None) -> list[Target]:
    """Resolve a target specification to a de-duplicated list of Targets (first wins).

    Raises:
        NoTargetsError: a name or pattern matches nothing, or nothing was found at all.
    """
    context = context or DiscoveryContext()
    parameters = dict(model.named_parameters())
    items = [spec] if isinstance(spec, str) else list(spec)
    found: dict[str, Target] = {}
    excluded: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise NoTargetsError(f"target {item!r} is not a string; expected a finder name, a parameter name, "
                                 "'re:<regex>' or an exclusion '!<name or re:regex>'")
        if item.startswith("!"):
            excluded |= {t.name for t in _match_pattern(model, item[1:], parameters)}
            continue
        targets = FINDERS[item](model, context) if item in FINDERS else _match_pattern(model, item, parameters)
        for target in targets:
            found.setdefault(target.name, target)
    found = {name: target for name, target in found.items() if name not in excluded}
    if not found:
        raise NoTargetsError(
            f"nothing to regularize in {type(model).__name__} with targets={spec!r}. "
            "For custom cells pass example inputs (attach(model, example_inputs=(x,))) so the "
            "dataflow pass can find the recurrence, or name the weights: "
            "targets=['rnn.weight_hh_l0', 're:.*h2h.*'], or targets='linear'/'conv'.")
    return list(found.values())


def describe_spec(spec: Any) -> str:
    return spec if isinstance(spec, str) else ", ".join(map(str, spec))
