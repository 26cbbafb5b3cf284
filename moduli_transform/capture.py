"""Capturing a model for the dataflow pass: ``torch.export`` without side effects.

:func:`capture` runs non-strict ``torch.export`` on ``model.<method>`` and returns the
program. The model is left exactly as it was: forward code that stores tensors on the
module (AWD-LSTM's weight drop sets ``rnn.weight_hh_l0`` each call, stateful models keep
``self.hidden``) would otherwise keep the fake tensors of the trace. When export fails,
:class:`GraphCaptureError` says where (the line of the model's code), what PyTorch's
layer types would give instead, and the ways out.
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

import torch
from torch import nn

__all__ = ["GraphCaptureError", "WAYS_OUT", "capture", "flat_graph", "parameter_names", "user_inputs"]

WAYS_OUT = (
    "Ways out: (1) if training calls another method, or one without the untraceable part "
    "exists, trace that one: attach(model, example_inputs=(x,), method='name'); "
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
    user = [i for i, f in enumerate(frames)
            if not f.filename.startswith((_TORCH_DIR, _PACKAGE_DIR, _STDLIB_DIR))]
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


def capture(model: nn.Module, example_inputs: tuple, method: str = "forward",
            example_kwargs: dict | None = None) -> tuple[torch.export.ExportedProgram, str]:
    """Capture ``model.<method>(*example_inputs)`` with non-strict ``torch.export``.

    Returns:
        The exported program and the prefix its parameter names carry ("" or "model.").

    Raises:
        GraphCaptureError: the method does not exist or export failed.
    """
    name = type(model).__name__
    if not callable(getattr(model, method, None)):
        raise GraphCaptureError(f"{name} has no method {method!r} to trace. {WAYS_OUT}")
    # export refuses a ScriptModule root even when PYTORCH_JIT=0 left its code in Python
    wrap = method != "forward" or isinstance(model, torch.jit.ScriptModule)
    root, prefix = (_MethodCall(model, method), "model.") if wrap else (model, "")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        with _quiet_export(), _restoring_attributes(model):
            program = torch.export.export(root, inputs, kwargs=dict(example_kwargs or {}), strict=False)
    except Exception as error:  # export raises many unrelated types; all mean "no graph"
        detail = " ".join(str(error).split())[:300]
        raise GraphCaptureError(
            f"could not capture {name}.{method}() with torch.export{_where(error)} "
            f"({type(error).__name__}: {detail}). Data-dependent control flow (Python `if`/"
            f"`while` on tensor values), data-dependent sizes (PackedSequence lengths) and "
            f"unsupported ops stop the capture.{_script_hint(model)}{_types_hint(model)} {WAYS_OUT}"
        ) from error
    return program, prefix


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
