"""The dataflow pass: find the recurrent weights of any model from a captured graph.

A weight is recurrent when one of its uses reads a value computed from an earlier use of
the same weight. The pass captures the model with ``torch.export`` (:mod:`.capture`:
non-strict, training IR; Python loops are unrolled, ``nn.RNN/GRU/LSTM`` stay single
``aten.lstm``/``aten.gru``/``aten.rnn_*`` ops with their flat weight lists; ``no_grad`` /
``autocast`` regions are inlined) and then:

1. marks every node as data (depends on a user input), parameter-derived (computed from
   parameters and buffers only: ``W * mask``, parametrizations, a weight assembled in
   place) or constant; an in-place write counts for later reads of the tensor written;
2. finds the *uses* of each parameter: ops that apply a parameter-derived weight to data
   (``linear``, ``matmul``/``mm``/``bmm``/``addmm``/``mv`` either way round, ``einsum``,
   ``conv``, the ``*_cell`` ops, the fused RNN ops, and ``u * h`` with a 1-D ``u``);
3. propagates, in one topological sweep, a bit set per node naming the parameters whose
   uses it descends from (integer tensors, e.g. sampled tokens, carry no bits), once
   through everything and once stopping at weight matrices;
4. a use whose data operand carries its own parameter's bit is in the loop. It is a
   hidden -> hidden matrix (kind "recurrent") when the bit arrives through no other weight,
   otherwise a map between two populations inside the loop (kind "linear": Mogrifier Q/R,
   attention on the decoder state). :mod:`.layout` walks back through ``cat``/transposes
   to the slice of the input (so the rows or columns of the weight) that reads the
   earlier output, and finds the gate blocks the output is cut into.

Example inputs need at least two time steps (T=2 or 3 is enough): with one step no use
can depend on an earlier one.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx, nn

from .capture import GraphCaptureError, capture
from .layout import CATS as _CATS, gate_count, input_ranges, merge_ranges
from .layout import node_arg as _arg, node_shape as _shape, node_value as _value
from .targets import Target

__all__ = ["GraphCaptureError", "capture", "find_recurrent_targets"]

aten = torch.ops.aten

DATA, PARAM, CONST = "data", "param", "const"

# --------------------------------------------------------------------------- node states


@dataclass
class _Use:
    """One application of a weight to a value inside the captured graph."""

    node: fx.Node
    weight: fx.Node
    data: fx.Node | None  # None: recurrent by construction (inside a fused RNN op)
    data_dim: int = -1  # dim of ``data`` indexing the weight's input neurons
    weight_in_dim: int = 1  # dim of the weight indexing input neurons (1: W x, 0: h @ W)
    out_dim: int | None = None  # dim of the op's output holding output neurons (gates)
    kind: str = "recurrent"
    gates: int = 1
    gate_names: tuple[str, ...] = ()
    label: str = ""
    batched: bool = False  # the weight may carry leading batch dims (bmm); matrix = last two


@dataclass
class _Dataflow:
    """Node states (data / parameter-derived / constant), parameter sources, the nodes each
    node's value depends on and the tensors it writes in place (:func:`_dependencies`)."""

    state: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    writes: dict = field(default_factory=dict)

    def is_weight(self, node, ndim: int | None = 2) -> bool:
        return (isinstance(node, fx.Node) and self.state.get(node) == PARAM
                and (ndim is None or len(_shape(node)) == ndim))

    def is_matrix(self, node) -> bool:
        """A parameter-derived matrix, or a batch of them (``W.expand(B, H, H)`` for bmm)."""
        return self.is_weight(node, None) and len(_shape(node)) >= 2

    def is_input(self, node) -> bool:
        return isinstance(node, fx.Node) and self.state.get(node) in (DATA, CONST)


# Ops whose value does not depend on the values of their tensor inputs, only on shapes.
_SHAPE_ONLY = {aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default,
               aten.new_full.default, aten.zeros_like.default, aten.ones_like.default,
               aten.empty_like.default, aten.full_like.default, aten.randn_like.default,
               aten.rand_like.default, aten.sym_size.int}


def _aliasing(node: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
    """The input ``node``'s output is a view of (or None), and the inputs it writes in place,
    read from the op's schema (``Tensor(a)`` / ``Tensor(a!)`` annotations)."""
    if node.target is operator.getitem:  # an element of split/unbind outputs
        return node.args[0], []
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return None, []
    viewed, written = None, []
    for index, argument in enumerate(schema.arguments):
        if argument.alias_info is None:
            continue
        value = _arg(node, index, argument.name, None)
        if not isinstance(value, fx.Node):
            continue
        viewed = viewed or value
        if argument.alias_info.is_write:
            written.append(value)
    returns_alias = bool(schema.returns) and schema.returns[0].alias_info is not None
    return (viewed if returns_alias else None), written


def _dependencies(graph: fx.Graph) -> tuple[dict, dict]:
    """Per node, the nodes its value depends on, and the tensors it writes in place.

    Shape-only ops (``new_zeros``, ``zeros_like``) depend on nothing. The training IR keeps
    in-place ops: ``states[t + 1] = f(states[t])`` on a preallocated tensor is
    ``copy_(select(states, 0, t + 1), ...)``, and ``W[:E, :E] = w_ee`` assembles a weight
    the same way; later reads refer to ``states`` / ``W``, not to the copy. Each write is
    mapped to the base tensor (through views), into which the sweeps merge what it wrote.
    """
    inputs, writes, base = {}, {}, {}
    for node in graph.nodes:
        inputs[node] = [] if node.target in _SHAPE_ONLY else node.all_input_nodes
        viewed, written = _aliasing(node)
        if viewed is not None:
            base[node] = base.get(viewed, viewed)
        if written:
            writes[node] = [base.get(value, value) for value in written]
    return inputs, writes


_ORDER = {CONST: 0, PARAM: 1, DATA: 2}


def _classify(graph: fx.Graph, parameters: dict[str, str], inputs: set[str]) -> _Dataflow:
    flow = _Dataflow()
    flow.inputs, flow.writes = _dependencies(graph)
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name in parameters:
                flow.state[node], flow.sources[node] = PARAM, frozenset([parameters[node.name]])
            else:
                flow.state[node] = DATA if node.name in inputs else CONST
            continue
        states = [flow.state.get(i, CONST) for i in flow.inputs[node]]
        flow.state[node] = max(states, key=_ORDER.get, default=CONST)
        if flow.state[node] == PARAM:
            flow.sources[node] = frozenset().union(
                *(flow.sources[i] for i in flow.inputs[node] if i in flow.sources))
        for written in flow.writes.get(node, ()):
            _merge_write(flow, written, node)
    return flow


def _merge_write(flow: _Dataflow, base: fx.Node, writer: fx.Node) -> None:
    """Later reads of ``base`` see what ``writer`` stored (parameters stay parameters)."""
    if base.op == "placeholder" and flow.state.get(base) == PARAM:
        return
    state = max(flow.state.get(base, CONST), flow.state[writer], key=_ORDER.get)
    flow.state[base] = state
    if state == PARAM:
        flow.sources[base] = flow.sources.get(base, frozenset()) | flow.sources.get(writer, frozenset())


# --------------------------------------------------------------------------- use rules

UseRule = Callable[[fx.Node, _Dataflow], list[_Use]]
USE_RULES: dict[object, UseRule] = {}

LSTM_GATES, GRU_GATES = ("i", "f", "g", "o"), ("r", "z", "n")


def _use_rule(*ops):
    """Register a function finding the uses in a node of one of ``ops``."""

    def decorate(rule: UseRule) -> UseRule:
        for op in ops:
            USE_RULES[op] = rule
        return rule

    return decorate


@_use_rule(aten.linear.default)
def _linear_uses(node, flow):
    data, weight = node.args[0], node.args[1]
    if flow.is_weight(weight):
        return [_Use(node, weight, data, -1, 1, -1, label="linear")]
    return []


def _matmul_pair(node, flow, left, right):
    """``h @ W`` and/or ``W @ h``; both when both sides are parameter-derived (such uses
    only seed the reachability, e.g. a learnable initial state times W_hh). ``W`` may be a
    batch of matrices (``W.expand(B, n, m)`` for bmm); its last two dims are the matrix."""
    uses = []
    if flow.is_matrix(right) and not _state_product(right, flow):
        uses.append(_Use(node, right, left, -1, 0, -1, label="h @ W, parameter as (in, out)",
                         batched=True))
    if flow.is_matrix(left) and not _state_product(left, flow):
        data_dim = -2 if len(_shape(right)) >= 2 else -1
        out_dim = -2 if len(_shape(right)) >= 2 else -1
        uses.append(_Use(node, left, right, data_dim, 1, out_dim, batched=True,
                         label="W @ h, parameter as (out, in)"))
    return uses


_PRODUCTS = {aten.matmul.default, aten.mm.default, aten.bmm.default, aten.mv.default,
             aten.addmm.default, aten.linear.default}


def _state_product(node, flow) -> bool:
    """A weight applied to a constant state (``zeros(B, H) @ n`` at the first step of a
    low-rank RNN) is a state, not a weight, although only parameters reach it; a product of
    parameters alone (``m @ n.T`` assembled as the weight) stays a weight."""
    return node.target in _PRODUCTS and any(
        isinstance(a, fx.Node) and flow.state.get(a) == CONST and len(_shape(a)) >= 1
        for a in node.all_input_nodes)


@_use_rule(aten.matmul.default, aten.mm.default, aten.bmm.default, aten.mv.default)
def _matmul_uses(node, flow):
    return _matmul_pair(node, flow, node.args[0], node.args[1])


@_use_rule(aten.addmm.default, aten.baddbmm.default, aten.addmv.default)
def _addmm_uses(node, flow):
    return _matmul_pair(node, flow, node.args[1], node.args[2])


@_use_rule(aten.einsum.default)
def _einsum_uses(node, flow):
    """Two-operand einsum where a 2-D weight contracts exactly one index with the data."""
    equation, operands = node.args[0].replace(" ", ""), node.args[1]
    if len(operands) != 2 or "..." in equation:
        return []
    inputs, arrow, output = equation.partition("->")
    if not arrow:
        output = "".join(sorted(c for c in set(inputs) if c.isalpha() and inputs.count(c) == 1))
    subscripts, uses = inputs.split(","), []
    for weight_index, data_index in ((0, 1), (1, 0)):
        weight, data = operands[weight_index], operands[data_index]
        shared = [c for c in subscripts[weight_index]
                  if c in subscripts[data_index] and c not in output]
        if flow.is_weight(weight) and len(shared) == 1:
            uses.append(_Use(node, weight, data, subscripts[data_index].index(shared[0]),
                             subscripts[weight_index].index(shared[0]), None,
                             label=f"einsum {equation}"))
    return uses


@_use_rule(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default)
def _conv_uses(node, flow):
    data, weight = node.args[0], node.args[1]
    if node.target is aten.convolution.default:
        transposed, groups = _arg(node, 6, "transposed", False), _arg(node, 8, "groups", 1)
    else:
        transposed, groups = False, _arg(node, 6, "groups", 1)
    if transposed or groups != 1 or not flow.is_weight(weight, None):
        return []
    return [_Use(node, weight, data, 1, 1, 1, kind="conv", label="conv")]


@_use_rule(aten.mul.Tensor)
def _elementwise_uses(node, flow):
    for weight, data in (node.args[:2], node.args[1::-1]):
        shape = _shape(weight)
        if (flow.is_weight(weight, None) and flow.is_input(data) and shape
                and all(s == 1 for s in shape[:-1]) and _shape(data)[-1:] == shape[-1:]):
            return [_Use(node, weight, data, -1, 0, None, kind="elementwise", label="u * h")]
    return []


_CELLS = {aten.lstm_cell.default: LSTM_GATES, aten.gru_cell.default: GRU_GATES,
          aten.rnn_tanh_cell.default: (), aten.rnn_relu_cell.default: ()}


@_use_rule(*_CELLS)
def _cell_uses(node, flow):
    data, hx, w_ih, w_hh = node.args[:4]
    hidden = hx[0] if isinstance(hx, (list, tuple)) else hx
    names = _CELLS[node.target]
    op = node.target.__name__.split(".")[0]
    return [_Use(node, weight, value, -1, 1, None, gates=max(1, len(names)), gate_names=names,
                 label=f"aten.{op} {role}")
            for weight, value, role in ((w_ih, data, "weight_ih"), (w_hh, hidden, "weight_hh"))
            if flow.is_weight(weight)]


_FUSED = {aten.lstm.input: (2, LSTM_GATES), aten.lstm.data: (3, LSTM_GATES),
          aten.gru.input: (2, GRU_GATES), aten.gru.data: (3, GRU_GATES),
          aten.rnn_tanh.input: (2, ()), aten.rnn_tanh.data: (3, ()),
          aten.rnn_relu.input: (2, ()), aten.rnn_relu.data: (3, ())}


@_use_rule(*_FUSED)
def _fused_uses(node, flow):
    """hh (and hr) weights of a fused RNN op, by position in its flat weight list."""
    index, names = _FUSED[node.target]
    params, has_biases, layers = node.args[index], node.args[index + 1], node.args[index + 2]
    directions = 2 if node.args[index + 5] else 1
    size = len(params) // (layers * directions)
    with_projection = size == (4 if has_biases else 2) + 1
    op = node.target.__name__.split(".")[0]
    uses = []
    for group in range(layers * directions):
        layer, direction = divmod(group, directions)
        where = f"layer {layer}{' reverse' if direction else ''}"
        start = group * size
        uses.append(_Use(node, params[start + 1], None, gates=max(1, len(names)), gate_names=names,
                         label=f"fused aten.{op}: flat weight {start + 1} is w_hh of {where}"))
        if with_projection:
            uses.append(_Use(node, params[start + size - 1], None,
                             label=f"fused aten.{op}: flat weight {start + size - 1} is w_hr of "
                                   f"{where}, the projection inside the loop"))
    return [use for use in uses if flow.is_weight(use.weight)]


# --------------------------------------------------------------------------- reachability


def _propagate(graph: fx.Graph, uses: list[_Use], flow: _Dataflow, bits: dict[str, int]):
    """Bit sets per node: the parameters whose uses the node's value descends from.

    ``seed[n]``: parameters that use ``n`` applies; ``reach[n]``: seeds of all ancestors;
    ``direct[n]``: the same without passing through matrix uses. A loop that closes in
    ``direct`` runs through no other weight: IndRNN's ``u * h`` counts as elementwise
    recurrence only then, and a matrix is a hidden -> hidden ("recurrent") one only then.
    Only uses seed: a tied embedding lookup feeding its own decoder is no loop.
    """
    seed: dict = {}
    for use in uses:
        for name in flow.sources[use.weight]:
            seed[use.node] = seed.get(use.node, 0) | bits[name]
    matrix_nodes = {use.node for use in uses if use.kind != "elementwise"}
    reach, direct = {}, {}
    for node in graph.nodes:
        reach[node] = direct[node] = 0
        value = _value(node)
        if isinstance(value, torch.Tensor) and not (value.is_floating_point() or value.is_complex()):
            continue  # sampled tokens and indices carry no gradient
        for i in flow.inputs[node]:
            reach[node] |= reach[i] | seed.get(i, 0)
            direct[node] |= direct[i] | seed.get(i, 0)
        if node in matrix_nodes:
            direct[node] = 0
        for base in flow.writes.get(node, ()):  # later reads of base see what was written
            reach[base] |= reach[node]
            direct[base] |= direct[node]
    return seed, reach, direct


# --------------------------------------------------------------------------- targets


@dataclass
class _Finding:
    """What the recurrent uses of one parameter say about it."""

    name: str
    shape: tuple[int, ...]
    kind: str
    in_dim: int = 1
    steps: int = 0
    ranges: list = field(default_factory=list)
    full: bool = False
    gates: int = 0
    gate_names: tuple[str, ...] = ()
    labels: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    from_cat: bool = False
    transposed: bool = False
    direct: bool = False  # some loop returns to it through no other weight
    via: set = field(default_factory=set)  # weights whose outputs it reads, when not direct

    def selection(self) -> slice:
        merged, size = merge_ranges(self.ranges), self.shape[self.in_dim]
        if self.full or not merged or merged == [(0, size)]:
            return slice(None)
        if len(merged) > 1:
            self.notes.append("ambiguous hidden slice " + ", ".join(f"{a}:{b}" for a, b in merged)
                              + "; union taken")
        return slice(merged[0][0], merged[-1][1])

    def target(self) -> Target:
        module = self.name.split(".parametrizations.")[0] if ".parametrizations." in self.name \
            else self.name.rpartition(".")[0]
        label = "; ".join(dict.fromkeys(self.labels))
        used = f"used at {self.steps} steps ({label})" if self.steps else label
        if self.kind == "elementwise":
            return Target(name=self.name, shape=self.shape, kind="elementwise", module=module,
                          regularize=False, evidence=(
                              f"used at {self.steps} steps ({label}); the state it scales reads the "
                              "output of an earlier use with no weight matrix in between"))
        if self.full and (len(self.shape) < 2 or min(self.shape) == 1):
            # e.g. weight_norm's magnitude g: a per-neuron scale has no (i, j) structure
            return Target(name=self.name, shape=self.shape, kind="elementwise", module=module,
                          regularize=False, evidence=(
                              f"{used}; a per-neuron scale of a derived "
                              "recurrent weight, no off-diagonal structure"))
        selection = self.selection()
        stacked = self.shape[1] if self.transposed else self.shape[0]
        gates = self.gates if self.gates > 1 and stacked % self.gates == 0 else 1
        rows, cols = (selection, slice(None)) if self.in_dim == 0 else (slice(None), selection)
        if selection == slice(None):
            what = "the whole input"
        else:
            axis = "row" if self.in_dim == 0 else "column"
            what = (f"{axis} slice {selection.start}:{selection.stop} of the "
                    f"{'cat ' if self.from_cat else ''}input")
        evidence = f"{used}; {what} reads the output of an earlier use" if self.steps else label
        if gates > 1 and not self.gate_names:
            self.notes.append(f"output split into {gates} gates"
                              + (" along the columns of the (in, out)-stored weight" if self.transposed else ""))
        kind = self.kind
        if kind == "recurrent" and not self.direct:
            kind = "linear"
            evidence += self._loop_through_others()
        return Target(name=self.name, shape=self.shape, kind=kind, rows=rows, cols=cols,
                      gates=gates, gate_names=self.gate_names if gates > 1 else (), module=module,
                      evidence="; ".join([evidence, *dict.fromkeys(self.notes)]),
                      transposed=self.transposed and gates > 1)


    def _loop_through_others(self) -> str:
        """Evidence for a weight whose loop closes only through other weights (Mogrifier
        Q/R, attention on the decoder state, E->I / I->E blocks, deep transitions)."""
        via = sorted(self.via)
        shown = ", ".join(via[:3]) + (" ..." if len(via) > 3 else "")
        return ("; in the loop only through other weights" + (f" (it reads the output of {shown})"
                if shown else "") + ": its input and output neurons are different populations, "
                "so kind 'linear' (embedded separately), not a hidden -> hidden matrix")


def _record(finding: _Finding, use: _Use, ranges, weight_shape) -> None:
    """Add one recurrent use to ``finding``, mapping input ranges onto the parameter's dims."""
    finding.labels.append(use.label)
    if use.data is None:
        finding.full = True
        finding.labels[-1] += (" (by position in w_ih, w_hh, b_ih, b_hh[, w_hr] per layer and "
                               "direction); the recurrence is inside the op")
    elif finding.shape == weight_shape:
        finding.in_dim = use.weight_in_dim
    elif len(weight_shape) == 2 and finding.shape == weight_shape[::-1]:
        finding.in_dim = 1 - use.weight_in_dim
        finding.notes.append("applied transposed")
    else:
        finding.full = True
        finding.notes.append(f"acts through a derived weight of shape {tuple(weight_shape)}")
    if use.data is not None and not finding.full:
        if _shape(use.data)[use.data_dim] != finding.shape[finding.in_dim]:
            finding.full = True
        finding.ranges += ranges
        finding.from_cat |= use.data.target in _CATS
    if not finding.gates:
        finding.gates, finding.gate_names = use.gates, use.gate_names
        if use.out_dim is not None:
            width = sum(b - a for a, b in merge_ranges(ranges)) or _shape(use.data)[use.data_dim]
            gates = gate_count(use.node, use.out_dim, width)
            finding.gates = gates
            # stored (in, out): the gate blocks are columns; the target reads the block transposed
            finding.transposed = finding.in_dim == 0 and gates > 1


def _closes_directly(use: _Use, name: str, tables, bits: dict[str, int]) -> tuple[bool, set]:
    """Whether the value ``use`` reads carries its own earlier output through no other weight
    matrix (then input and output index the same state neurons); else the weights whose
    outputs it reads instead."""
    seed, _, direct = tables
    carried = direct.get(use.data, 0) | seed.get(use.data, 0)
    if carried & bits[name]:
        return True, set()
    return False, {other for other, bit in bits.items() if carried & bit}


def _findings(uses: list[_Use], flow: _Dataflow, tables, bits: dict[str, int],
              shapes: dict[str, tuple[int, ...]]) -> dict[str, _Finding]:
    seed, reach, direct = tables
    steps: dict[tuple[str, str], set] = {}  # (parameter, rule label) -> applications to data
    for use in uses:
        if use.data is not None and flow.state.get(use.data) != PARAM:
            for name in flow.sources[use.weight]:
                steps.setdefault((name, use.label), set()).add(use.node)
    findings: dict[str, _Finding] = {}
    for use in uses:
        weight_shape = _shape(use.weight)[-2:] if use.batched else _shape(use.weight)
        for name in sorted(flow.sources[use.weight]):
            if use.kind == "elementwise" and len(shapes[name]) != 1:
                continue
            ranges, closes, via = [], True, set()
            if use.data is not None:
                table, bit = (direct if use.kind == "elementwise" else reach), bits[name]

                def reaches(node, table=table, bit=bit) -> bool:
                    return bool((table.get(node, 0) | seed.get(node, 0)) & bit)

                if not reaches(use.data):
                    continue
                ranges = input_ranges(use.data, use.data_dim, reaches)
                closes, via = _closes_directly(use, name, tables, bits)
            finding = findings.setdefault(name, _Finding(name, shapes[name], use.kind))
            finding.direct |= closes
            finding.via |= via
            finding.steps = len(steps.get((name, use.label), ())) if use.data is not None else 0
            _record(finding, use, ranges, weight_shape)
    return findings


def find_recurrent_targets(model: nn.Module, example_inputs: tuple, method: str = "forward",
                           example_kwargs: dict | None = None,
                           driver: Callable | None = None) -> list[Target]:
    """Targets for every parameter used inside a recurrent loop of ``model.<method>``.

    Args:
        model: any module; it is traced, not changed.
        example_inputs: positional inputs with at least two time steps (T=2..3 suffices).
        method: the method training calls (``forward``, ``step``, ``generate``, ...).
        example_kwargs: keyword inputs of that method.
        driver: ``fn(model, *example_inputs)`` running the training script's own step loop,
            traced instead of the method when the recurrence closes outside the model.

    Returns:
        One Target per recurrent parameter, in ``model.named_parameters()`` order, named
        as there, with the recurrent block (rows/cols), gates and the dataflow evidence.

    Raises:
        GraphCaptureError: torch.export could not capture the method.

    Example:
        >>> rnn = nn.GRU(3, 4, num_layers=2)
        >>> [(t.name, t.gates) for t in find_recurrent_targets(rnn, (torch.randn(2, 1, 3),))]
        [('weight_hh_l0', 3), ('weight_hh_l1', 3)]
    """
    captured = capture(model, example_inputs, method, example_kwargs, driver)
    graph, parameters = captured.graph, captured.parameters
    flow = _classify(graph, parameters, captured.inputs)
    uses = [use for node in graph.nodes
            if node.op == "call_function" and node.target in USE_RULES
            for use in USE_RULES[node.target](node, flow)]
    bits = {name: 1 << index for index, name in enumerate(sorted(set(parameters.values())))}
    tables = _propagate(graph, uses, flow, bits)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    findings = _findings(uses, flow, tables, bits, shapes)
    return [findings[name].target() for name in shapes if name in findings]
