"""Finders: which parameters of a model are targets.

A target specification is a finder name, a parameter name, a ``"re:<regex>"`` pattern
(matched in full against parameter names, PEFT style), or a list mixing them. A parameter
name may select a block and a gate count: ``"i2h.weight[:, 57:89]"`` (the hidden-state
columns of a Linear on ``cat([x, h])``), ``"cell.weight[:, 8:]@4"`` or ``"...@lstm"``
(4 gate blocks stacked along dim 0; keywords ``rnn``, ``gru``, ``lstm``).

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
    driver: Callable[..., Any] | None = None  # fn(model, *example_inputs): the user's step loop


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
                                  example_kwargs=context.example_kwargs, driver=context.driver)


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


GATE_KEYWORDS = {"rnn": ((), 1), "gru": (("r", "z", "n"), 3), "lstm": (("i", "f", "g", "o"), 4)}
_SELECTION = re.compile(r"^(?P<name>[^\[@]+?)\s*(?:\[(?P<index>[^\]]*)\])?\s*(?:@\s*(?P<gates>\w+))?$")


def _parse_slice(text: str, pattern: str) -> slice:
    parts = text.strip().split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise NoTargetsError(f"bad slice {text.strip()!r} in target {pattern!r}; expected "
                             "'start:stop' with optional ends, e.g. 'i2h.weight[:, 57:89]'") from None
    return slice(start, stop)


def _selected_target(model: nn.Module, pattern: str, parameters: dict[str, nn.Parameter]) -> Target | None:
    """The target for ``"name[rows, cols]@gates"``; None when ``pattern`` has neither part."""
    match = _SELECTION.match(pattern)
    if match is None or (match["index"] is None and match["gates"] is None):
        return None
    name = match["name"]
    if name not in parameters:
        _match_pattern(model, name, parameters)  # raises, listing the parameters
    index = (match["index"] or ":").split(",")
    if len(index) > 2:
        raise NoTargetsError(f"target {pattern!r} selects {len(index)} dims; expected [rows] or [rows, cols]")
    rows, cols = (_parse_slice(i, pattern) for i in [*index, ":"][:2])
    base = _target_for_name(model, name, parameters[name])
    gates, gate_names = base.gates, base.gate_names
    if match["gates"] is not None:
        word = match["gates"].lower()
        if word in GATE_KEYWORDS:
            gate_names, gates = GATE_KEYWORDS[word]
        elif word.isdigit() and int(word) >= 1:
            gate_names, gates = (), int(word)
        else:
            raise NoTargetsError(f"unknown gate count {match['gates']!r} in target {pattern!r}; expected "
                                 f"a positive integer or one of {', '.join(GATE_KEYWORDS)}")
    shape = tuple(parameters[name].shape)
    if len(shape) < 2:
        raise NoTargetsError(f"target {pattern!r}: {name} has shape {shape}; slices and gates need 2 dims")
    out = len(range(*rows.indices(shape[0])))
    width = len(range(*cols.indices(shape[1])))
    if out == 0 or width == 0 or out % gates:
        raise NoTargetsError(f"target {pattern!r} selects a ({out}, {width}) block of {name} {shape}, "
                             f"which cannot hold {gates} gate blocks")
    kind = base.kind if len(shape) > 2 else ("recurrent" if out // gates == width else "linear")
    return Target(name=name, shape=shape, kind=kind, rows=rows, cols=cols, gates=gates,
                  gate_names=gate_names if gates > 1 else (), module=base.module,
                  evidence=f"named explicitly as {pattern!r}")


def _match_pattern(model: nn.Module, pattern: str, parameters: dict[str, nn.Parameter]) -> list[Target]:
    if not pattern.startswith("re:") and pattern not in parameters:
        selected = _selected_target(model, pattern, parameters)
        if selected is not None:
            return [selected]
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
        raise NoTargetsError(_nothing_found(model, spec, context))
    return list(found.values())


def _nothing_found(model: nn.Module, spec: Any, context: DiscoveryContext) -> str:
    name = type(model).__name__
    if context.example_inputs is None:
        return (f"nothing to regularize in {name} with targets={spec!r}. For custom cells pass "
                "example inputs (attach(model, example_inputs=(x,))) so the dataflow pass can find "
                "the recurrence, or name the weights: targets=['rnn.weight_hh_l0', 're:.*h2h.*'], "
                "or targets='linear'/'conv'.")
    traced = "the driver" if context.driver is not None else f"{name}.{context.method}()"
    return (f"nothing to regularize in {name} with targets={spec!r}: in one call of {traced} on "
            "the example inputs no weight reads the output of an earlier use of itself. If the "
            "model computes one time step (hidden = model(x_t, hidden)), the recurrence closes "
            "outside the model, in the training script's loop. Two ways: (a) trace that loop: "
            "attach(model, driver=run_steps, example_inputs=(xs, h0)) with "
            "def run_steps(model, xs, h): for x in xs: out, h = model(x, h); return out "
            "(a few steps are enough); (b) name the hidden-state block of the weight: "
            "targets=['i2h.weight[:, 57:89]'] (its columns reading h), with '@4' or '@lstm' for "
            "4 stacked gates. Models with no weight in a loop (Transformers, minGRU scans) have "
            "nothing to find.")


def describe_spec(spec: Any) -> str:
    return spec if isinstance(spec, str) else ", ".join(map(str, spec))
