"""The ``inspect`` command: show what the dataflow pass finds in a model, before attaching.

    moduli-transform inspect mymodels.py:build_model --input-shape 2,3,8
    moduli-transform inspect word_lm.model:make_lm --input-shape 3,2 --dtype long

``MODULE:FACTORY`` names a callable returning an ``nn.Module``; MODULE is a dotted module
path or a ``.py`` file. One ``--input-shape`` per positional input of the traced method
(random normal values, or random integers in ``[0, --high)`` with ``--dtype long``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .graph import GraphCaptureError, find_recurrent_targets
from .targets import Target

__all__ = ["format_targets", "load_factory", "register"]

COLUMNS = ("parameter", "kind", "shape", "slice", "gates", "why")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "long": torch.long}


def format_targets(targets: Sequence[Target]) -> str:
    """A plain-text table of targets, one row each.

    Example:
        >>> print(format_targets([Target("rnn.weight_hh_l0", (8, 2), gates=4,
        ...                              gate_names=("i", "f", "g", "o"), evidence="fused")]))
        parameter         kind       shape   slice   gates     why
        rnn.weight_hh_l0  recurrent  (8, 2)  [:, :]  4 (ifgo)  fused
    """
    if not targets:
        return "no recurrent weights found"
    rows = [COLUMNS] + [
        (t.name, t.kind, str(t.shape), t.describe_slices(),
         f"{t.gates} ({''.join(t.gate_names)})" if t.gate_names else str(t.gates),
         t.evidence + ("" if t.regularize else " [listed, not regularized]"))
        for t in targets]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + row[-1]
        for row in rows).rstrip()


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """Import ``MODULE:FACTORY`` (MODULE dotted or a ``.py`` path).

    Raises:
        ValueError: the spec has no ``:``, the module or the attribute does not exist.
    """
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"expected MODULE:FACTORY (e.g. mymodels.py:build), got {spec!r}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"no such file {module_name!r} in {spec!r}")
        loaded = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loaded)
        sys.modules.setdefault(path.stem, module)
        loaded.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"cannot import {module_name!r} from {spec!r}: {error}") from error
    if not callable(getattr(module, attribute, None)):
        raise ValueError(f"{module_name!r} has no callable {attribute!r}")
    return getattr(module, attribute)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"input shape must be positive integers like 2,3,8; got {text!r}")
    return shape


def example_inputs(shapes: Sequence[tuple[int, ...]], dtype: str, high: int, seed: int = 0) -> tuple:
    """Random example inputs of the given shapes (normal floats or integers in [0, high))."""
    generator = torch.Generator().manual_seed(seed)
    if DTYPES[dtype] is torch.long:
        return tuple(torch.randint(0, high, shape, generator=generator) for shape in shapes)
    return tuple(torch.randn(shape, generator=generator, dtype=DTYPES[dtype]) for shape in shapes)


def run_inspect(args: argparse.Namespace) -> int:
    """Build the model, trace it, print the table; 2 with the message when tracing fails."""
    try:
        model = load_factory(args.factory)()
    except ValueError as error:
        print(f"moduli-transform inspect: {error}", file=sys.stderr)
        return 2
    if not isinstance(model, nn.Module):
        print(f"moduli-transform inspect: {args.factory} returned {type(model).__name__}, "
              "not an nn.Module", file=sys.stderr)
        return 2
    inputs = example_inputs(args.input_shape or [(2, 3, 8)], args.dtype, args.high)
    shapes = ", ".join("x".join(map(str, x.shape)) for x in inputs)
    method = args.method or "forward"
    # A model without that method is left to discovery, whose error lists the methods it has.
    runnable = hasattr(model, method) and not (method == "forward" and type(model).forward is nn.Module.forward)
    try:  # run it eagerly first: a shape mismatch is then reported as one, not as a capture failure
        if runnable:
            with torch.no_grad():
                getattr(model, method)(*inputs)
    except Exception as error:  # whatever the model raises on these inputs
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"moduli-transform inspect: {args.factory} fails on inputs of shape {shapes} "
              f"(--input-shape): {message}", file=sys.stderr)
        return 2
    try:
        targets = find_recurrent_targets(model, inputs, method=args.method)
    except GraphCaptureError as error:
        print(f"moduli-transform inspect: {error}", file=sys.stderr)
        return 2
    print(format_targets(targets))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``inspect`` sub-command to a ``moduli-transform`` parser."""
    parser = subparsers.add_parser(
        "inspect", help="show the recurrent weights the dataflow pass finds in a model",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("factory", metavar="MODULE:FACTORY",
                        help="callable returning the nn.Module (dotted module or .py path)")
    parser.add_argument("--input-shape", action="append", type=_parse_shape, metavar="D0,D1,...",
                        help="shape of one positional input, with at least 2 time steps "
                             "(repeat per input; default 2,3,8)")
    parser.add_argument("--method", default="forward",
                        help="method that training calls (default: forward)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="dtype of the example inputs (long for token ids)")
    parser.add_argument("--high", type=int, default=10,
                        help="upper bound (exclusive) of random token ids with --dtype long")
    parser.set_defaults(func=run_inspect)
    return parser
