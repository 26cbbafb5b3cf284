"""Command-line sub-commands of the export package (export and bench sections)."""

from __future__ import annotations

import argparse
import os
import sys


# --------------------------------------------------------------------------- export
# `moduli-transform export` (entry point moduli_transform.export.cli:register_export).
def register_export(subparsers) -> None:
    """Add ``moduli-transform export``: a model factory (+ weights) -> safetensors and/or ONNX."""
    parser = subparsers.add_parser(
        "export", help="write a pruned model as CSR safetensors and/or ONNX",
        description="Build the model with a factory, load weights, write safetensors / ONNX.")
    parser.add_argument("source", nargs="?", default=None, metavar="CHECKPOINT_OR_FACTORY",
                        help="a module:factory spec, or a .safetensors file (same as --state)")
    parser.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                        help="callable returning the nn.Module (e.g. mypkg.models:make_rnn)")
    parser.add_argument("--run", default=None, metavar="RUN_DIR",
                        help="a `moduli-transform train` run folder: its task's model and weights.safetensors")
    parser.add_argument("--state", default=None, metavar="PATH.safetensors",
                        help="weights (and masks) to load, written by moduli_transform.export.save_safetensors")
    parser.add_argument("--input-shape", default=None, metavar="B,T,F",
                        help="shape of the example input for ONNX, e.g. 1,16,2")
    parser.add_argument("--sequence-axis", type=int, default=None, help="time axis of the input")
    parser.add_argument("--onnx", default=None, metavar="OUT.onnx", help="write ONNX here")
    parser.add_argument("--sparse-initializers", action="store_true",
                        help="store recurrent weights as ONNX sparse initializers")
    parser.add_argument("--safetensors", default=None, metavar="OUT.safetensors",
                        help="write CSR safetensors here")
    parser.set_defaults(func=run_export)


def _load_factory(spec: str):
    """``module:factory`` or ``file.py:factory`` (the same rule as ``inspect``)."""
    from moduli_transform.inspection import load_factory

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return load_factory(spec)


def _read_weights(path: str):
    """Weights and masks from an export file or from the ``weights.safetensors`` of a run."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from moduli_transform.export import read_safetensors

    if not os.path.isfile(path):
        raise ValueError(f"--state {path}: no such file")
    with safe_open(path, framework="pt") as handle:
        is_run = (handle.metadata() or {}).get("format") == "moduli-transform-run"
    if not is_run:
        loaded = read_safetensors(path)
        return loaded.state_dict, loaded.masks
    tensors = load_file(path)  # the run folder's layout: parameters, and masks under mask/<name>
    masks = {name[len("mask/"):]: t.bool() for name, t in tensors.items() if name.startswith("mask/")}
    return {name: t for name, t in tensors.items() if not name.startswith("mask/")}, masks


def _from_run(run_dir: str):
    """The model factory and weights of a ``moduli-transform train`` run folder."""
    import json

    from moduli_transform.tasks import get_task

    config_path = os.path.join(run_dir, "config.json")
    weights = os.path.join(run_dir, "weights.safetensors")
    if not (os.path.isfile(config_path) and os.path.isfile(weights)):
        raise ValueError(f"--run {run_dir}: not a finished run folder (needs config.json and weights.safetensors)")
    run = json.loads(open(config_path).read())["run"]
    task_class = get_task(run["task"])
    task = task_class(task_class.get_preset(run["preset"]))
    return task.build_model, weights


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--input-shape {text!r} is not a comma-separated list of integers") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"--input-shape {text!r} needs positive sizes")
    return shape


def run_export(args: argparse.Namespace) -> int:
    """Carry out ``moduli-transform export``; returns the exit status."""
    import torch

    from moduli_transform.export import save_safetensors, to_onnx

    spec, state_path = args.model, args.state
    if args.source is not None:
        if args.source.endswith(".safetensors"):
            state_path = state_path or args.source
        else:
            spec = spec or args.source
    try:
        factory = None
        if args.run:
            factory, state_path = _from_run(args.run)
            state_path = args.state or state_path
        if spec is None and factory is None:
            raise ValueError("give the model factory: moduli-transform export module:factory [--state W.safetensors]")
        if not (args.onnx or args.safetensors):
            raise ValueError("nothing to write: pass --onnx OUT.onnx and/or --safetensors OUT.safetensors")
        if args.onnx and not args.input_shape:
            raise ValueError("--onnx needs --input-shape (e.g. 1,16,2)")
        model = (_load_factory(spec) if spec else factory)()
        masks = None
        if state_path:
            state_dict, masks = _read_weights(state_path)
            model.load_state_dict(state_dict, strict=True)
        model.eval()
        if args.safetensors:
            document = save_safetensors(model, args.safetensors, masks=masks)
            sparse = [e for e in document["entries"] if e["storage"] == "csr"]
            print(f"safetensors: {args.safetensors} ({os.path.getsize(args.safetensors)} bytes, "
                  f"{len(document['entries'])} tensors, {len(sparse)} CSR, "
                  f"overall sparsity {document['sparsity'].get('overall', 0.0):.3f})")
        if args.onnx:
            example = torch.randn(_parse_shape(args.input_shape), generator=torch.Generator().manual_seed(0))
            report = to_onnx(model, (example,), args.onnx, masks=masks,
                             sparse_initializers=args.sparse_initializers, sequence_axis=args.sequence_axis)
            limit = "any" if report.dynamic_sequence else f"exactly {report.traced_sequence_length} (unrolled)"
            errors = ", ".join(f"T={t}: {e:.2e}" for t, e in report.max_abs_error.items())
            print(f"onnx: {args.onnx} ({report.file_bytes} bytes, sequence length {limit}, "
                  f"max abs error vs PyTorch {errors}, {len(report.sparse_initializers)} sparse initializers)")
    except (ValueError, ImportError, OSError, RuntimeError, KeyError) as error:
        print(f"moduli-transform export: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------- bench
# `moduli-transform bench` (entry point moduli_transform.export.cli:register_bench): the sparse-runtime
# benchmark of export/bench.py.  Kept in its own section; the export command lives above.
def register_bench(subparsers) -> None:
    """Add ``moduli-transform bench``: dense vs. CSR vs. tiled vs. ONNX Runtime timings."""
    from moduli_transform.export import bench

    parser = subparsers.add_parser(
        "bench", help="time dense PyTorch / ONNX Runtime vs. the sparse runtime",
        description=bench.__doc__.splitlines()[0])
    bench.add_arguments(parser)
    parser.set_defaults(func=bench.main)
