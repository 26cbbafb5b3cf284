"""Capturing a model for the dataflow pass: ``torch.export`` without side effects.

:func:`capture` runs non-strict ``torch.export`` on ``model.<method>`` (or on a user's
driver ``fn(model, *inputs)`` that runs the training script's own step loop). When export
refuses (a Python ``if`` on a tensor value, PyTorch's own data-dependent checks such as the
Transformer's causal-mask detection, ``param.data = f(param)`` in forward) it retries with
a recorder (a dispatch mode) running on the real example values, which follows the branch
the example takes; an assignment to ``param.data`` keeps the tensor object, so later reads
are reads of that parameter (an in-place update of it). The model is left exactly as it was: forward code
that stores tensors on the module (AWD-LSTM's weight drop sets ``rnn.weight_hh_l0`` each
call, stateful models keep ``self.hidden``) would otherwise keep the tensors of the trace.
When every capture fails, :class:`GraphCaptureError` says where (the line of the model's
code), what PyTorch's layer types would give instead, and the ways out.
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
import os
import sysconfig
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Captured", "GraphCaptureError", "WAYS_OUT", "capture", "flat_graph", "parameter_names",
           "user_inputs"]

WAYS_OUT = (
    "Ways out: (1) if training calls another method, or one without the untraceable part "
    "exists, trace that one: attach(model, example_inputs=(x,), method='name'), or trace the "
    "training script's step loop: attach(model, driver=fn, example_inputs=...) with "
    "fn(model, *inputs); "
    "(2) targets='types' finds PyTorch's recurrent layers (nn.RNN/GRU/LSTM and their cells) "
    "by type, without tracing; (3) name the weights PEFT-style: "
    "targets=['rnn.weight_hh_l0', 're:.*h2h.*']."
)

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_STDLIB_DIR = sysconfig.get_paths()["stdlib"] + os.sep


class GraphCaptureError(ValueError):
    """torch.export could not capture the model; the message lists the ways out."""


class _MethodCall(nn.Module):
    """Exports ``model.<method>`` while keeping parameter names (under ``model.``)."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *args, **kwargs):
        return getattr(self.model, self.method)(*args, **kwargs)


class _Driver(nn.Module):
    """Exports ``driver(model, *inputs)``: the user's own step loop around the model."""

    def __init__(self, model: nn.Module, driver: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.driver = driver

    def forward(self, *args, **kwargs):
        return self.driver(self.model, *args, **kwargs)


@dataclass
class Captured:
    """A captured graph: placeholder -> parameter name, the placeholders of user inputs,
    and which capture produced it (``"torch.export"`` or ``"recorded on the real values"``)."""

    graph: fx.Graph
    parameters: dict[str, str]
    inputs: set[str]
    how: str


@contextlib.contextmanager
def _quiet_export():
    """Silence export's warnings and the partial graph it prints to stderr on failure;
    the failure itself is re-raised as GraphCaptureError with context."""
    previous = logging.root.manager.disable
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.disable(max(previous, logging.WARNING))
            yield
    finally:
        logging.disable(previous)


@contextlib.contextmanager
def _restoring_attributes(model: nn.Module):
    """Put back every module attribute the traced code assigned (tensors of the trace
    must not outlive it), including the contents of ``_parameters``/``_buffers`` and of
    list attributes such as ``nn.LSTM._flat_weights``, which RNN modules update in place."""
    saved = []
    for module in model.modules():
        state = dict(module.__dict__)
        contents = {key: (dict(value) if isinstance(value, dict) else list(value))
                    for key, value in state.items() if type(value) in (dict, list)}
        saved.append((module, state, contents))
    try:
        yield
    finally:
        for module, state, contents in saved:
            for key in set(module.__dict__) - set(state):
                del module.__dict__[key]
            for key, value in state.items():
                module.__dict__[key] = value
                if key in contents and not _same_items(value, contents[key]):
                    value.clear()
                    value.update(contents[key]) if isinstance(value, dict) else value.extend(contents[key])


def _same_items(current, saved) -> bool:
    """Same keys/length and the very same objects (tensors compare by identity)."""
    if isinstance(current, dict):
        return current.keys() == saved.keys() and all(current[k] is saved[k] for k in saved)
    return len(current) == len(saved) and all(a is b for a, b in zip(current, saved))


def _where(error: BaseException) -> str:
    """The line of the model's code (outside the torch package) where export failed, and
    the PyTorch layer it was inside of, if any."""
    frames = traceback.extract_tb(error.__traceback__)
    user = [i for i, f in enumerate(frames)  # "<string>": code generated by torch or dataclasses
            if not f.filename.startswith((_TORCH_DIR, _PACKAGE_DIR, _STDLIB_DIR, "<"))]
    if not user:
        return ""
    frame = frames[user[-1]]
    where = f" at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}: `{frame.line}`"
    inside = [f for f in frames[user[-1] + 1:] if f.filename.startswith(_TORCH_DIR + "nn")
              and not f.filename.endswith(os.path.join("modules", "module.py"))]
    if inside:
        path = inside[-1].filename[len(_TORCH_DIR):]
        where += f", inside torch/{path}:{inside[-1].lineno} ({inside[-1].name})"
    return where


def _script_hint(model: nn.Module) -> str:
    """TorchScript modules (fastrnns' jit.ScriptModule cells) are opaque to export."""
    scripted = [name or type(model).__name__ for name, module in model.named_modules()
                if isinstance(module, torch.jit.ScriptModule)]
    if not scripted:
        return ""
    return (f" TorchScript modules ({', '.join(scripted[:3])}) cannot be traced: run with the "
            "environment variable PYTORCH_JIT=0 set before torch is imported (jit.script_method "
            "and torch.jit.script then leave the code in Python), or name the weights.")


def _types_hint(model: nn.Module) -> str:
    """What targets='types' would find here, so the error can name a working way out."""
    from .discovery import DiscoveryContext, find_by_layer_type

    try:
        names = [t.name for t in find_by_layer_type(model, DiscoveryContext())]
    except Exception:  # the hint must never hide the capture error
        return ""
    if not names:
        return " Here targets='types' finds nothing (no PyTorch recurrent layers)."
    shown = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
    return f" Here targets='types' finds: {shown}."


def _methods(model: nn.Module) -> str:
    """Public methods the model's own class defines (for a model without ``forward``)."""
    own = [name for cls in type(model).__mro__ if cls not in (nn.Module, object)
           and not cls.__module__.startswith("torch.")
           for name, value in vars(cls).items() if callable(value) and not name.startswith("_")]
    return ", ".join(dict.fromkeys(own)) or "none"


def capture(model: nn.Module, example_inputs: tuple, method: str = "forward",
            example_kwargs: dict | None = None, driver: Callable[..., Any] | None = None) -> Captured:
    """Capture ``model.<method>(*example_inputs)`` (or ``driver(model, *example_inputs)``).

    Non-strict ``torch.export`` first; when it fails, a recording on the real values.

    Returns:
        The :class:`Captured` graph, parameter names as in ``model.named_parameters()``.

    Raises:
        GraphCaptureError: the method does not exist or every capture failed.
    """
    name = type(model).__name__
    if driver is None and method == "forward" and type(model).forward is nn.Module.forward:
        raise GraphCaptureError(f"{name} has no forward() to trace; its methods: {_methods(model)}. "
                                f"Trace the one training calls with method='name'. {WAYS_OUT}")
    if driver is None and not callable(getattr(model, method, None)):
        raise GraphCaptureError(f"{name} has no method {method!r} to trace; its methods: "
                                f"{_methods(model)}. {WAYS_OUT}")
    # export refuses a ScriptModule root even when PYTORCH_JIT=0 left its code in Python
    if driver is not None:
        root, prefix = _Driver(model, driver), "model."
    elif method != "forward" or isinstance(model, torch.jit.ScriptModule):
        root, prefix = _MethodCall(model, method), "model."
    else:
        root, prefix = model, ""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    try:
        with _quiet_export(), _restoring_attributes(model):
            program = torch.export.export(root, inputs, kwargs=kwargs, strict=False)
        return Captured(flat_graph(program), parameter_names(model, program, prefix),
                        user_inputs(program), "torch.export")
    except Exception as error:  # export raises many unrelated types; all mean "no graph"
        export_error = error
    try:
        with _quiet_export(), _restoring_attributes(model):
            return _capture_real(model, root, prefix, inputs, kwargs)
    except Exception as error:  # the model fails on its own example: report export's reason
        if isinstance(error, GraphCaptureError):
            raise
    traced = "the driver" if driver is not None else f"{name}.{method}()"
    detail = " ".join(str(export_error).split())[:300]
    raise GraphCaptureError(
        f"could not capture {traced} with torch.export{_where(export_error)} "
        f"({type(export_error).__name__}: {detail}), nor by recording it on the real example "
        f"values. Data-dependent sizes (PackedSequence lengths) and unsupported ops stop the "
        f"capture.{_script_hint(model)}{_types_hint(model)} {WAYS_OUT}"
    ) from export_error


class _Recorder(TorchDispatchMode):
    """Records every aten op run on the real values as an fx graph (the values themselves
    decide ``if``/``while``, so the branch the example takes is the one recorded)."""

    def __init__(self, graph: fx.Graph, nodes: dict[int, fx.Node]) -> None:
        super().__init__()
        self.graph, self.nodes, self.alive = graph, nodes, []

    def _node(self, value):
        return self.nodes.get(id(value), value) if isinstance(value, torch.Tensor) else value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        node = self.graph.call_function(func, pytree.tree_map(self._node, tuple(args)),
                                        pytree.tree_map(self._node, dict(kwargs)))
        node.meta["val"] = _shape_of(out)
        outputs = out if isinstance(out, (tuple, list)) else [out]
        for index, value in enumerate(outputs):
            # an in-place op returns its input: later reads still name the tensor written
            if isinstance(value, torch.Tensor) and id(value) not in self.nodes:
                self.nodes[id(value)] = (node if outputs is not out
                                         else self.graph.call_function(operator.getitem, (node, index)))
                self.nodes[id(value)].meta["val"] = _shape_of(value)
                self.alive.append(value)  # ids stay unique while recording
        return out


def _shape_of(value):
    """A storage-free stand-in with the value's shape and dtype (node_shape reads it)."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, (tuple, list)):
        return type(value)(_shape_of(v) for v in value)
    return value


def _capture_real(model: nn.Module, root: nn.Module, prefix: str, inputs: tuple, kwargs: dict) -> Captured:
    """Run ``root`` once on the real example values under :class:`_Recorder`, on copies of
    the parameters and buffers (the model's own tensors are not touched)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    graph, nodes, parameters, user = fx.Graph(), {}, {}, set()
    state = {}
    for name, parameter in root.named_parameters():
        copy = parameter.detach().clone().requires_grad_(parameter.requires_grad)
        node = graph.placeholder(f"p_{len(parameters)}")
        node.meta["val"] = _shape_of(copy)
        parameters[node.name] = canonical.get(id(parameter), name[len(prefix):])
        nodes[id(copy)], state[name] = node, copy
    for name, buffer in root.named_buffers():
        copy = buffer.detach().clone()
        node = graph.placeholder(f"b_{len(state)}")
        node.meta["val"] = _shape_of(copy)
        nodes[id(copy)], state[name] = node, copy
    leaves, spec = pytree.tree_flatten((inputs, kwargs))
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            node = graph.placeholder(f"x_{len(user)}")
            node.meta["val"] = _shape_of(leaf)
            nodes[id(leaf)] = node
            user.add(node.name)
    recorder = _Recorder(graph, nodes)
    with recorder:
        torch.func.functional_call(root, state, inputs, kwargs, tie_weights=True, strict=False)
    return Captured(graph, parameters, user, "recorded on the real values")


# Higher-order ops that only call their body on the operands after it, inside a context
# (torch.no_grad() burn-in steps, torch.autocast, activation checkpointing).
_REGION_OPS = {"wrap_with_set_grad_enabled", "wrap_with_autocast", "tag_activation_checkpoint", "wrap"}


def flat_graph(program: torch.export.ExportedProgram) -> torch.fx.Graph:
    """The program's graph with the bodies of region ops copied in place of the calls, so
    the steps run under ``torch.no_grad()`` or ``autocast`` are seen like the others."""
    module = program.graph_module
    _inline_regions(module)
    return module.graph


def _inline_regions(module: torch.fx.GraphModule) -> None:
    graph = module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or getattr(node.target, "__name__", "") not in _REGION_OPS:
            continue
        index = next((i for i, a in enumerate(node.args) if isinstance(a, torch.fx.Node)
                      and a.op == "get_attr"), None)
        body = getattr(module, node.args[index].target, None) if index is not None else None
        if not isinstance(body, torch.fx.GraphModule):
            continue
        _inline_regions(body)
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        with graph.inserting_before(node):
            outputs = graph.graph_copy(body.graph, dict(zip(placeholders, node.args[index + 1:])))
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        for user in list(node.users):
            if user.target is operator.getitem:
                user.replace_all_uses_with(outputs[user.args[1]])
                graph.erase_node(user)
        if not node.users:
            graph.erase_node(node)


def parameter_names(model: nn.Module, program, prefix: str) -> dict[str, str]:
    """Placeholder name -> key in ``model.named_parameters()`` (tied weights resolved)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    names = {}
    for spec in program.graph_signature.input_specs:
        if spec.kind != torch.export.graph_signature.InputKind.PARAMETER:
            continue
        target = spec.target[len(prefix):] if spec.target.startswith(prefix) else spec.target
        try:
            names[spec.arg.name] = canonical.get(id(model.get_parameter(target)), target)
        except AttributeError:
            names[spec.arg.name] = target
    return names


def user_inputs(program) -> set[str]:
    """Placeholder names of the traced method's own inputs."""
    kind = torch.export.graph_signature.InputKind.USER_INPUT
    return {s.arg.name for s in program.graph_signature.input_specs if s.kind == kind}
