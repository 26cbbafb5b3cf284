"""The ``moduli-transform`` command line.

Sub-commands are entry points in the group ``moduli_transform.commands``: each is a
function ``register(subparsers)`` that adds its parser and sets ``func(args) -> int``.
The library only knows its own ``inspect`` command; ``tasks`` and ``export`` plug theirs
in from pyproject.toml, so the library never imports them.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from typing import Sequence

from moduli_transform.allocator import reuse_large_blocks

__all__ = ["build_parser", "main"]

ENTRY_POINT_GROUP = "moduli_transform.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moduli-transform",
        description="Moduli regularization and pruning for PyTorch RNNs (arXiv 2406.06290).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    from .inspection import register as register_inspect

    register_inspect(subparsers)
    for entry_point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            register = entry_point.load()
        except (ImportError, AttributeError) as error:
            subparsers.add_parser(entry_point.name, help=f"(unavailable: {error})")
            continue
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    reuse_large_blocks()   # this process is ours: large tensors' memory is reused (allocator.py)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
