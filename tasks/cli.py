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
import sys

from . import LOTTERY_EMBEDDINGS, TASKS
from .runner import EMBEDDINGS, GRANULARITIES, REGULARIZERS, RunConfig, RunConfigError, run

__all__ = ["register_train", "register_table", "config_from_args"]


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
    parser.set_defaults(func=_train)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(task=args.task, preset=args.preset, manifold=args.manifold, inhibitor=args.inhibitor,
                     regularizer=args.regularizer, embedding=args.embedding, sparsity=args.sparsity,
                     lottery=args.lottery, seed=args.seed, out=args.out, strength=args.strength, steps=args.steps,
                     resume=args.resume, data=args.data, checkpoint_every=args.checkpoint_every,
                     threads=args.threads, granularity=getattr(args, "granularity", "element"),
                     lottery_embedding=args.lottery_embedding)


def _train(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except RunConfigError as error:
        print(f"moduli-transform train: error: {error}", file=sys.stderr)
        return 2
    from moduli_transform.distributed import cleanup_distributed, is_main_process

    summary = run(config, progress=not args.no_progress)
    if is_main_process():  # under torchrun every rank returns the same summary
        print(json.dumps(summary, indent=1, sort_keys=True))
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
    parser.set_defaults(func=_table)


def _table(args: argparse.Namespace) -> int:
    from .table import run_table

    args.out = args.out or f"runs/table-{args.task}"
    return int(run_table(args) or 0)
