"""``moduli-transform train`` and ``moduli-transform table``: entry points of the tasks package.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(); register_train(parser.add_subparsers())
    >>> args = parser.parse_args(["train", "adding", "--preset", "test", "--lottery", "--sparsity", "0.5"])
    >>> config_from_args(args).sparsity, config_from_args(args).lottery
    (0.5, True)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from moduli_transform.device import DEVICE_HELP, resolve_device

from . import LOTTERY_EMBEDDINGS, TASKS
from .run_folder import RunFolderError, claim_run_folder
from .runner import EMBEDDINGS, GRANULARITIES, REGULARIZERS, RunConfig, RunConfigError, run

__all__ = ["register_train", "register_table", "config_from_args", "validate_names"]


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``table`` (one run, or the axes of a grid of runs)."""
    parser.add_argument("--preset", default="cpu", help="test | cpu | paper | legacy (default: cpu; cpu and paper "
                                                        "are the authors' protocol, legacy our earlier one)")
    parser.add_argument("--inhibitor", default="dog", help="inhibitor name (default: dog)")
    parser.add_argument("--embedding", default="fixed", choices=EMBEDDINGS)
    parser.add_argument("--lottery", action="store_true", help="retrain the lottery ticket (random re-init)")
    parser.add_argument("--lottery-embedding", default=None, choices=LOTTERY_EMBEDDINGS,
                        help="lottery penalty: reuse C or draw a new embedding (default: the preset's, as the authors)")
    parser.add_argument("--strength", type=float, default=None, help="regularization strength (default: preset)")
    parser.add_argument("--steps", type=int, default=None, help="training steps before the lottery (default: preset)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--data", default=None, help="corpus for the language model (file or WikiText-2 folder)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="auto", help=f"where to train: {DEVICE_HELP}; not part of a run's "
                                                         "identity (a run resumes on another device)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def register_train(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train TASK [options]``: one run, summary printed as JSON."""
    parser = subparsers.add_parser(
        "train", help="train, prune and evaluate one task",
        description="Train with moduli regularization, prune gradually, optionally retrain the lottery ticket.")
    parser.add_argument("task", choices=sorted(TASKS))
    _add_run_options(parser)
    parser.add_argument("--manifold", default="torus", help="manifold name (default: torus)")
    parser.add_argument("--regularizer", default="moduli", choices=list(REGULARIZERS),
                        help="moduli; l1 (coefficient 1, the authors' standard); l1-mean (the authors' mean "
                             "variant); l1-matched (ours: moduli's mean coefficient); shuffled; none")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--granularity", default="element", choices=GRANULARITIES,
                        help="prune single weights or whole 16x16 tiles in the manifold order")
    parser.add_argument("--out", default=None, help="run directory (default: runs/<task>-<preset>-...)")
    parser.add_argument("--overwrite", action="store_true",
                        help="move an existing run in --out aside to <out>.old-<timestamp> (never deleted)")
    parser.set_defaults(func=_train)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(task=args.task, preset=args.preset, manifold=args.manifold, inhibitor=args.inhibitor,
                     regularizer=args.regularizer, embedding=args.embedding, sparsity=args.sparsity,
                     lottery=args.lottery, seed=args.seed, out=args.out, strength=args.strength, steps=args.steps,
                     resume=args.resume, data=args.data, checkpoint_every=args.checkpoint_every,
                     threads=args.threads, granularity=getattr(args, "granularity", "element"),
                     lottery_embedding=args.lottery_embedding)


def validate_names(manifold: str | None, inhibitor: str | None) -> None:
    """Raise ``ValueError`` (naming the choices) for an unknown manifold or inhibitor name."""
    from moduli_transform.inhibitors import get_inhibitor
    from moduli_transform.manifolds import get_manifold

    if manifold is not None:
        get_manifold(manifold)
    if inhibitor is not None:
        get_inhibitor(inhibitor)


def _check_data(data: str | None) -> None:
    if data is not None and not Path(data).exists():
        raise ValueError(f"--data {data}: no such file or folder (a text file or a WikiText-2 folder)")


def _train(args: argparse.Namespace) -> int:
    # Every user mistake is found here, before any training starts.
    main = os.environ.get("RANK", "0") == "0"  # torchrun: rank 0 alone checks and moves the folder
    try:
        config = config_from_args(args)
        device = resolve_device(args.device)  # cuda:LOCAL_RANK under torchrun
        validate_names(config.manifold, config.inhibitor)
        _check_data(config.data)
        notes = claim_run_folder(config.out, config.identity(), resume=config.resume,
                                 overwrite=args.overwrite) if main else []
    except ValueError as error:  # RunConfigError, RunFolderError, DeviceError, unknown names
        print(f"moduli-transform train: error: {error}", file=sys.stderr)
        return 2
    from moduli_transform.distributed import cleanup_distributed, is_main_process

    for note in notes:
        print(note, file=sys.stderr)
    if main:
        print(f"run folder: {config.out} (device {device})", file=sys.stderr)
    try:
        summary = run(config, progress=not args.no_progress, device=device)
    except (RunConfigError, RunFolderError) as error:  # other settings recorded, or a run appeared there
        print(f"moduli-transform train: error: {error}", file=sys.stderr)
        return 2
    if is_main_process():  # under torchrun every rank returns the same summary
        print(json.dumps(summary, indent=1, sort_keys=True))
        print(f"run written to {config.out}", file=sys.stderr)
    cleanup_distributed()
    return 0


def register_table(subparsers: argparse._SubParsersAction) -> None:
    """Add ``table TASK``: the grid of one of the paper's tables (see :mod:`moduli_transform.tasks.table`)."""
    parser = subparsers.add_parser("table", help="run the paper's comparison grid for a task and tabulate it",
                                   description="Run (or reuse) a grid of runs and write markdown/CSV tables "
                                               "and figures.")
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--preset", default="cpu", help="test | cpu | paper (default: cpu)")
    parser.add_argument("--grid", default="controls", choices=("controls", "manifolds", "embeddings", "tiles", "all"))
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds per cell (default: 5, as the authors)")
    parser.add_argument("--sparsities", nargs="+", type=float, default=None,
                        help="default: the paper's levels for the task plus 0.99")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: preset)")
    parser.add_argument("--data", default=None, help="corpus for the language model")
    parser.add_argument("--out", default=None, help="folder of the runs and tables (default: runs/table-TASK)")
    parser.add_argument("--jobs", type=int, default=1, help="local runs at once (one thread each when > 1)")
    parser.add_argument("--backend", default="local", choices=("local", "ray"))
    parser.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray instance)")
    parser.add_argument("--device", default="auto", help=f"where every run trains: {DEVICE_HELP}")
    parser.set_defaults(func=_table)


def _table(args: argparse.Namespace) -> int:
    from .table import run_table

    try:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        for sparsity in args.sparsities or []:
            if not 0.0 <= sparsity < 1.0:
                raise ValueError(f"--sparsities: {sparsity} is not in [0, 1)")
        if args.steps is not None and args.steps < 3:
            raise ValueError(f"--steps must be >= 3, got {args.steps}")
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
        _check_data(args.data)
        resolve_device(args.device)
        if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
            raise RunFolderError(f"--out {args.out} is a file, not a folder")
    except ValueError as error:
        print(f"moduli-transform table: error: {error}", file=sys.stderr)
        return 2
    args.out = args.out or f"runs/table-{args.task}"
    try:
        return int(run_table(args) or 0)
    except RunFolderError as error:  # a planned run folder holds another run: refused before any training
        print(f"moduli-transform table: error: {error}", file=sys.stderr)
        return 2
