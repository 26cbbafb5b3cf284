"""`moduli-transform reproduce`: run (or reuse) the paper's grids and write their report (REPRODUCTION.md).

Every cell of a task's grid (regularizer x sparsity, plus the dense baseline at sparsity 0)
is one run per seed, in ``<runs>/<task>-<preset>/<variant>-s<sparsity>-seed<seed>``.
Runs go in priority order (:data:`STAGES`): the cells that make one complete comparison come
first for three seeds, then the rest, then seeds 3 and 4, so a partial run folder already
holds whole table columns.

A run folder is only ever written by the run it records:

* ``finished``: ``summary.json`` and a ``config.json`` recording this run (run options and
  preset): reused, never run again;
* ``partial``: a matching ``config.json`` but no summary: resumed from its checkpoints;
* ``conflict``: the folder records another run (other options, or a preset changed since),
  or holds files but no readable config: left alone and reported, never overwritten;
* ``new``: absent or empty: run.

Example:
    >>> plans = plan("adding", "test", seeds=1, runs="runs/r")
    >>> plans[0].out, plans[0].regularizer, plans[0].sparsity
    ('runs/r/adding-test/moduli-s0.9-seed0', 'moduli', 0.9)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import as_completed
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Sequence

from moduli_transform.device import DEVICE_HELP, resolve_device

from . import TASKS, get_task
from .ray_backend import read_summary, same_recorded_run
from .runner import RunConfig, run
from .workers import training_pool

__all__ = ["GRID", "STAGES", "Stage", "plan", "run_status", "execute", "register", "DEFAULT_SEEDS"]

DEFAULT_SEEDS = 5  # as the authors (navigation/multiruns.sh, word_example/Graphs/traindata: five runs per cell)
DENSE = 0.0


@dataclass(frozen=True)
class Stage:
    """Cells ``(regularizer, sparsity)`` run for seeds ``seeds[0] <= seed < seeds[1]``, seed-major."""

    cells: tuple[tuple[str, float], ...]
    seeds: tuple[int, int]


# The grid of each task: the controls at the paper's sparsities and 99%, and the dense baseline.
GRID: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "adding": (("moduli", "l1", "l1-mean", "shuffled", "none"), (0.9, 0.95, 0.99)),
    "navigation": (("moduli", "l1", "l1-mean", "shuffled", "none"), (0.9, 0.95)),
    "language_model": (("moduli", "l1", "shuffled", "none"), (0.9, 0.95, 0.98)),
}


def _cells(task: str, sparsities: Sequence[float], regularizers: Sequence[str] | None = None) -> tuple:
    return tuple((r, s) for s in sparsities for r in (regularizers or GRID[task][0]))


# Priority order of the adding grid on one core (a paper-preset run takes 8 min there, so
# 3 seeds of the whole grid, 60 runs, need 8 hours): the paper's 90% level for moduli, L1,
# shuffled and none first (3 seeds: 12 runs), then the dense baseline and l1-mean at 90%, then
# 99%, then 95% without l1-mean (the first cell dropped when time is short), then seeds 3 and
# 4, then the remaining dense columns and l1-mean at 95%.
_FIRST = ("moduli", "l1", "shuffled", "none")
STAGES: dict[str, tuple[Stage, ...]] = {
    "adding": (
        Stage(_cells("adding", [0.9], _FIRST), (0, 3)),
        Stage((("none", DENSE), ("l1-mean", 0.9)), (0, 3)),
        Stage((*_cells("adding", [0.99]), ("moduli", DENSE)), (0, 3)),
        Stage(_cells("adding", [0.95], _FIRST), (0, 3)),
        Stage((*_cells("adding", [0.9], _FIRST), ("none", DENSE), ("l1-mean", 0.9), *_cells("adding", [0.99]),
               ("moduli", DENSE), *_cells("adding", [0.95], _FIRST)), (3, 5)),
        Stage((("l1", DENSE), ("l1-mean", DENSE), ("shuffled", DENSE), ("l1-mean", 0.95)), (0, 5)),
    ),
    # Navigation (cpu preset ~9 min per run with its lottery ticket): the paper's Table 1
    # columns at 90% and the plain dense model for three seeds first, then everything else.
    "navigation": (
        Stage((*_cells("navigation", [0.9], ("moduli", "l1", "shuffled", "none")), ("none", DENSE)), (0, 3)),
        Stage((*_cells("navigation", [0.9, 0.95]), *((r, DENSE) for r in GRID["navigation"][0])), (0, 5)),
    ),
}


def _stages(task: str, seeds: int) -> tuple[Stage, ...]:
    """The task's stages, or every cell seed-major; seeds above ``seeds`` are cut."""
    regularizers, sparsities = GRID[task]
    stages = STAGES.get(task, (Stage((*_cells(task, sparsities), *((r, DENSE) for r in regularizers)),
                                     (0, DEFAULT_SEEDS)),))
    if seeds > DEFAULT_SEEDS:
        stages = (*stages, Stage((*_cells(task, sparsities), *((r, DENSE) for r in regularizers)),
                                 (DEFAULT_SEEDS, seeds)))
    return stages


def plan(task: str, preset: str, seeds: int = DEFAULT_SEEDS, runs: str | Path = "runs/reproduce",
         lottery: bool = False, **run_options: Any) -> list[RunConfig]:
    """Every run of ``task``'s grid at ``preset``, in priority order, each once.

    Raises:
        ValueError: unknown task (no grid) or seeds < 1.
    """
    if task not in GRID:
        raise ValueError(f"no reproduction grid for task {task!r}; expected one of {', '.join(GRID)}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    folder = Path(runs) / f"{task}-{preset}"
    plans: dict[str, RunConfig] = {}
    for stage in _stages(task, seeds):
        for seed in range(stage.seeds[0], min(stage.seeds[1], seeds)):
            for regularizer, sparsity in stage.cells:
                suffix = "-lottery" if lottery else ""
                out = str(folder / f"{regularizer}-s{sparsity:g}-seed{seed}{suffix}")
                plans.setdefault(out, RunConfig(task=task, preset=preset, regularizer=regularizer, sparsity=sparsity,
                                                seed=seed, lottery=lottery, out=out, threads=1, **run_options))
    return list(plans.values())


def _preset_matches(config: RunConfig, recorded: dict[str, Any]) -> bool:
    """The recorded preset is the current one; fields added since must still hold their defaults."""
    preset = get_task(config.task).get_preset(config.preset)
    current = json.loads(json.dumps(preset.to_dict()))
    defaults = {f.name: f.default for f in fields(preset)}
    for key, value in current.items():
        if key in recorded:
            if recorded[key] != value:
                return False
        elif json.loads(json.dumps(defaults.get(key))) != value:
            return False
    return True


def run_status(config: RunConfig) -> str:
    """``"finished"``, ``"partial"``, ``"conflict"`` or ``"new"`` (see the module docstring)."""
    out = Path(config.out)
    if not out.exists() or not any(out.iterdir()):
        return "new"
    try:
        recorded = json.loads((out / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "conflict"
    if not (same_recorded_run(config, out) and _preset_matches(config, recorded.get("preset", {}))):
        return "conflict"
    return "finished" if read_summary(out) is not None else "partial"


def _run_one(config: RunConfig, device: str = "cpu") -> dict[str, Any]:
    return run(replace(config, resume=True), progress=False, device=device)


def execute(configs: Sequence[RunConfig], jobs: int = 1, on_result: Any = None,
            device: str = "cpu") -> dict[str, Any]:
    """Run what is new or partial, in order, on ``device``; returns ``{out: summary | error string | status}``.

    ``on_result(out, result)`` is called after every run (the report is rewritten there).
    The device is not part of a run's identity: a partial run resumes on any device and a
    finished one is reused whichever device made it.
    """
    asked, resolved = device, resolve_device(device)
    device = str(resolved)
    results: dict[str, Any] = {}
    todo = []
    for config in configs:
        status = run_status(config)
        if status == "finished":
            results[config.out] = read_summary(Path(config.out))
        elif status == "conflict":
            results[config.out] = "conflict"
            print(f"left alone: {config.out} records another run (other options or preset)", file=sys.stderr)
        else:
            todo.append(config)
    print(f"{len(configs)} runs planned: {len(configs) - len(todo)} finished or left alone, {len(todo)} to run",
          flush=True)

    def record(config: RunConfig, outcome: Any, started: float) -> None:
        results[config.out] = outcome
        state = f"{time.time() - started:.0f} s" if isinstance(outcome, dict) else f"failed: {outcome}"
        print(f"{time.strftime('%H:%M:%S')} {config.out}: {state}", flush=True)
        if on_result is not None:
            on_result(config.out, outcome)

    if jobs <= 1:
        for config in todo:
            started = time.time()
            try:
                outcome: Any = _run_one(config, device)
            except Exception as error:  # one failed run does not stop the others
                outcome = repr(error)
            record(config, outcome, started)
        return results
    pool, run_device = training_pool(asked, resolved, jobs)
    with pool:
        started = time.time()
        futures = {pool.submit(_run_one, config, run_device): config for config in todo}
        for future in as_completed(futures):
            try:
                outcome = future.result()
            except Exception as error:
                outcome = repr(error)
            record(futures[future], outcome, started)
    return results


# -- command line -----------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``reproduce [--tasks ...] [--preset P] [--jobs N] [--runs DIR] [--report PATH]``."""
    parser = subparsers.add_parser(
        "reproduce", help="run the paper's grids (reusing finished runs) and write their REPRODUCTION.md report",
        description="Run, resume or reuse every run of the paper's grids in --runs, then write the "
                    "reproduction report: the paper's numbers beside ours. Safe to run again at any time.")
    parser.add_argument("--tasks", nargs="+", default=["adding"], help=f"tasks to run (of {', '.join(GRID)})")
    parser.add_argument("--preset", default="cpu", help="preset to run (default: cpu); the report shows every "
                                                        "preset found in --runs")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help=f"seeds per cell (default: {DEFAULT_SEEDS})")
    parser.add_argument("--lottery", action="store_true", help="also retrain each run's lottery ticket")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    parser.add_argument("--runs", default="runs/reproduce", help="run folder (default: runs/reproduce)")
    parser.add_argument("--report", default=None,
                        help="report path (default: REPRODUCTION.md inside --runs); an existing file is replaced "
                             "only if it is an earlier report")
    parser.add_argument("--data", default=None, help="corpus for the language model")
    parser.add_argument("--report-only", action="store_true", help="write the report from the runs there; run nothing")
    parser.add_argument("--device", default="auto", help=f"where the runs train: {DEVICE_HELP}")
    parser.set_defaults(func=_reproduce)


def _fail(message: str) -> int:
    print(f"moduli-transform reproduce: error: {message}", file=sys.stderr)
    return 2


def _reproduce(args: argparse.Namespace) -> int:
    from .reproduction import check_report_path, write_report

    unknown = [t for t in args.tasks if t not in GRID]
    if unknown:
        return _fail(f"unknown task {unknown[0]!r}; expected one of {', '.join(GRID)}")
    if args.jobs < 1 or args.seeds < 1:
        return _fail(f"--jobs and --seeds must be >= 1; got {args.jobs} and {args.seeds}")
    missing = [t for t in args.tasks if args.preset not in TASKS[t].presets]
    if missing:
        return _fail(f"unknown preset {args.preset!r} for task {missing[0]!r}; expected one of "
                     f"{', '.join(TASKS[missing[0]].presets)}")
    try:
        device = resolve_device(args.device)
        configs = [c for t in args.tasks for c in plan(t, args.preset, args.seeds, args.runs, args.lottery,
                                                       data=args.data if t == "language_model" else None)]
    except ValueError as error:  # DeviceError too
        return _fail(str(error))

    report_path = Path(args.report) if args.report is not None else Path(args.runs) / "REPRODUCTION.md"
    try:
        check_report_path(report_path)  # before any run: a foreign file is never replaced
    except FileExistsError as error:
        return _fail(str(error))

    def report(*_: Any) -> None:
        write_report(args.runs, report_path)

    if not args.report_only:
        results = execute(configs, args.jobs, on_result=report, device=str(device))
        failed = [out for out, outcome in results.items() if isinstance(outcome, str) and outcome != "conflict"]
        for out in failed:
            print(f"failed: {out}: {results[out]}", file=sys.stderr)
    report()
    print(f"written: {report_path}")
    return 0
