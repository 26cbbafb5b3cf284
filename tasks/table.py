"""`moduli-transform table TASK`: the paper's comparison tables from our own runs.

Grids (each at the task's paper sparsity levels plus 99%, every cell over ``seeds`` seeds):

* ``controls``: moduli vs none vs L1 (coefficient 1) vs the authors' L1 ``mean`` vs shuffled
  (torus, difference of Gaussians);
* ``manifolds``: torus, circle, sphere, Klein bottle, 6-torus (moduli);
* ``embeddings``: fixed vs trained embeddings on the torus and on R^3 (moduli).

Run folders are never replaced: a folder that holds a partial run with the plan's settings
is continued from its checkpoints, and one that holds another run (other settings, or no
readable config) stops the sweep before any training, with one line naming it
(:func:`~moduli_transform.tasks.run_folder.continue_or_refuse`).

Every variant also gets a dense baseline: a separate full-length run at sparsity 0
(``<out>/<variant>-dense-seed<seed>``, no lottery). Runs land in
``<out>/<variant>-s<sparsity>-seed<seed>``; a run whose ``summary.json`` exists is reused, so
re-running a sweep only runs what is missing or failed. The table is written as markdown and
CSV in the paper's form: one column per variant, a "Dense" row (the sparsity-0 runs, each value
once) and "% Sparse" / "% Lottery" rows per sparsity, cells "mean (std)" over seeds of each
run's metric (the mean of its last 5% of evaluations), followed by "k/n", the seeds that
learned the task, when the task has a ``learned_threshold``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import statistics
from concurrent.futures import as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from moduli_transform.device import resolve_device

from .progress import progress_bar
from .ray_backend import RunFailure, execute_ray, split_finished
from .run_folder import continue_or_refuse
from .runner import RunConfig, run
from .workers import training_pool

__all__ = ["GRIDS", "PAPER_SPARSITIES", "plan_runs", "claim_runs", "execute", "aggregate", "format_markdown",
           "write_tables", "run_table"]

PAPER_SPARSITIES = {"navigation": (0.9, 0.95), "adding": (0.9, 0.95), "language_model": (0.9, 0.95, 0.98)}
EXTRA_SPARSITY = 0.99

# variant name -> RunConfig fields
GRIDS: dict[str, dict[str, dict[str, str]]] = {
    "controls": {name: {"regularizer": name} for name in ("moduli", "none", "l1", "l1-mean", "shuffled")},
    "manifolds": {name: {"manifold": name} for name in ("torus", "circle", "sphere", "klein", "torus6")},
    "embeddings": {f"{manifold}-{embedding}": {"manifold": manifold, "embedding": embedding}
                   for manifold in ("torus", "r3") for embedding in ("fixed", "trained")},
    # Not a paper table (so not in "all"): gradual 16x16 tile pruning (torus order) against unstructured pruning.
    "tiles": {"moduli": {}, "moduli-tiles": {"granularity": "tile"}},
}
PAPER_GRIDS = ("controls", "manifolds", "embeddings")


def plan_runs(task: str, preset: str, grid: str, seeds: int, sparsities: Sequence[float], out: str | Path,
              **run_options: Any) -> list[tuple[str, RunConfig]]:
    """(variant, RunConfig) for every cell of the grid, seed and sparsity.

    Example:
        >>> plans = plan_runs("adding", "test", "controls", 2, [0.9], "runs/t")
        >>> len(plans), plans[0][0], plans[0][1].out, plans[2][1].out
        (20, 'moduli', 'runs/t/moduli-s0.9-seed0', 'runs/t/moduli-dense-seed0')
    """
    grids = {name: GRIDS[name] for name in PAPER_GRIDS} if grid == "all" else {grid: GRIDS[grid]} if grid in GRIDS else None
    if grids is None:
        raise ValueError(f"unknown grid {grid!r}; expected one of {', '.join([*GRIDS, 'all'])}")
    plans = []
    for variants in grids.values():
        for variant, fields in variants.items():
            for sparsity in sparsities:
                for seed in range(seeds):
                    config = RunConfig(task=task, preset=preset, sparsity=sparsity, seed=seed, lottery=True,
                                       out=str(Path(out) / f"{variant}-s{sparsity:g}-seed{seed}"),
                                       **{**run_options, **fields})
                    plans.append((variant, config))
            for seed in range(seeds):  # the dense baseline: its own full-length run
                plans.append((variant, RunConfig(task=task, preset=preset, sparsity=0.0, seed=seed, lottery=False,
                                                 out=str(Path(out) / f"{variant}-dense-seed{seed}"),
                                                 **{**run_options, **fields})))
    # The torus moduli run appears in several grids: plan it once.
    unique = {config.out: (variant, config) for variant, config in plans}
    return list(unique.values())


def _run_quietly(config: RunConfig, device: str = "cpu") -> dict[str, Any]:
    return run(config, progress=False, device=device)


TABLE_REMEDY = "move it away, or pass another --out for this table"


def claim_runs(configs: Sequence[RunConfig]) -> list[RunConfig]:
    """The configs to execute under the run-folder rule: finished runs as they are, a partial
    run with the same settings resumed, a folder holding another run refused.

    Raises:
        RunFolderError: a planned folder holds another run (before any run starts).
    """
    finished, pending = split_finished(configs)
    claimed = list(configs)
    for index in pending:
        claimed[index] = continue_or_refuse(configs[index], TABLE_REMEDY)
    return claimed


def execute(configs: Sequence[RunConfig], backend: str = "local", jobs: int = 1, address: str | None = None,
            cpus_per_run: float = 1, gpus_per_run: float | None = None, device: str = "cpu"
            ) -> list[dict | RunFailure]:
    """Run the unfinished configs (local processes or Ray) on ``device``; finished ones are read back.

    On Ray a cuda device reserves ``gpus_per_run`` GPUs per run (default 1; 0 for cpu) and
    each run trains on the GPU Ray gives it.

    Raises:
        RunFolderError: a planned run folder holds another run (see :func:`claim_runs`).
    """
    if backend not in ("local", "ray"):
        raise ValueError(f"unknown backend {backend!r}; expected one of local, ray")
    resolved = resolve_device(device)
    cuda = resolved.type == "cuda"
    if backend == "ray":
        configs = [replace(c, threads=c.threads or max(1, int(cpus_per_run))) for c in configs]
        gpus = (1 if cuda else 0) if gpus_per_run is None else gpus_per_run
        run_fn = functools.partial(_run_quietly, device="cuda" if cuda else "cpu")
        return execute_ray(claim_runs(configs), run_fn, address, cpus_per_run, gpus)
    if jobs > 1:  # one thread per run: small RNNs train fastest that way on a shared CPU
        configs = [replace(c, threads=c.threads or 1) for c in configs]
    configs = claim_runs(configs)
    finished, pending = split_finished(configs)
    results: list[Any] = [finished.get(i) for i in range(len(configs))]
    pool, run_device = training_pool(device, resolved, max(1, jobs))
    with pool, \
            progress_bar(len(pending), desc="runs", unit="run", mode="auto" if pending else "off") as bar:
        futures = {pool.submit(_run_quietly, configs[index], run_device): index for index in pending}
        for future in as_completed(futures):
            index = futures[future]
            try:
                results[index] = future.result()
            except Exception as error:  # one failed run does not stop the sweep
                results[index] = RunFailure(configs[index], Path(configs[index].out), repr(error))
            bar.update(1)
    return results


def _cell(values: list[float], threshold: float | None = None, higher_is_better: bool = False) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    text = f"{statistics.mean(values):.4g} ({std:.2g})"
    if threshold is not None:
        learned = sum((v > threshold) if higher_is_better else (v < threshold) for v in values)
        text += f" {learned}/{len(values)}"
    return text


def _metric(result: dict[str, Any], kind: str) -> float | None:
    """The run's number: the last-5% mean, or the single end point of summaries written before it existed."""
    value = result.get(f"{kind}_tail_metric")
    return result.get(f"{kind}_metric") if value is None else value


def aggregate(plans: Sequence[tuple[str, RunConfig]], results: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per (variant, sparsity, kind) with the seeds' values, mean and std.

    Kind ``dense`` comes from the sparsity-0 runs only (sparsity 0.0); ``sparse`` and
    ``lottery`` from the pruned runs.
    """
    values: dict[tuple[str, float, str], list[float]] = {}
    for (variant, config), result in zip(plans, results):
        if not isinstance(result, dict):
            continue
        kinds = (("dense", "sparse"),) if config.sparsity == 0.0 else (("sparse", "sparse"), ("lottery", "lottery"))
        for kind, source in kinds:
            value = _metric(result, source)
            if value is not None:
                values.setdefault((variant, config.sparsity, kind), []).append(float(value))
    rows = []
    for (variant, sparsity, kind), seeds in values.items():
        rows.append({"variant": variant, "sparsity": sparsity, "kind": kind, "values": seeds,
                     "mean": statistics.mean(seeds), "std": statistics.stdev(seeds) if len(seeds) > 1 else 0.0})
    return rows


def format_markdown(rows: Sequence[dict[str, Any]], metric_name: str, threshold: float | None = None,
                    higher_is_better: bool = False) -> str:
    """The paper's layout: variants as columns; Dense, then % Sparse / % Lottery per sparsity.

    With ``threshold``, each cell ends with ``k/n``: the seeds whose metric beat it.
    """
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    sparsities = sorted({r["sparsity"] for r in rows if r["kind"] != "dense"})
    lookup = {(r["variant"], r["sparsity"], r["kind"]): r["values"] for r in rows}
    lines = [f"| {metric_name} | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    lines.append("| Dense | " + " | ".join(_cell(lookup.get((v, 0.0, "dense"), []), threshold, higher_is_better)
                                          for v in variants) + " |")
    for sparsity in sparsities:
        for kind, label in (("sparse", "Sparse"), ("lottery", "Lottery")):
            cells = [_cell(lookup.get((v, sparsity, kind), []), threshold, higher_is_better) for v in variants]
            lines.append(f"| {100 * sparsity:g}% {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def devices_note(results: Sequence[Any]) -> str:
    """A line naming the devices that finished the runs, when there are several (the device is
    not part of a run's identity, so a table may mix them); empty otherwise.

    Example:
        >>> devices_note([{"device": "cpu"}, {"device": "cuda:0"}, {"device": "cpu"}, "failed"])
        'Runs finished on several devices: cpu (2), cuda (1); their numbers differ by floating-point rounding, which training amplifies.'
        >>> devices_note([{"device": "cuda:0"}, {"device": "cuda:1"}])
        ''
    """
    counts: dict[str, int] = {}
    for result in results:
        if isinstance(result, dict):
            # by kind (several GPUs of one machine are one kind); summaries from before the
            # device was recorded: the CPU
            device = str(result.get("device", "cpu")).split(":")[0]
            counts[device] = counts.get(device, 0) + 1
    if len(counts) < 2:
        return ""
    listed = ", ".join(f"{device} ({count})" for device, count in sorted(counts.items()))
    return (f"Runs finished on several devices: {listed}; their numbers differ by floating-point "
            "rounding, which training amplifies.")


def write_tables(rows: Sequence[dict[str, Any]], out: str | Path, name: str, metric_name: str,
                 threshold: float | None = None, higher_is_better: bool = False,
                 note: str = "") -> tuple[Path, Path]:
    """``<out>/<name>.md`` (``note`` under the table) and ``<out>/<name>.csv`` (one line per seed value)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / f"{name}.md"
    text = format_markdown(rows, metric_name, threshold, higher_is_better) + "\n"
    markdown.write_text(text + (f"\n{note}\n" if note else ""))
    table = out / f"{name}.csv"
    with table.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["variant", "sparsity", "kind", "mean", "std", "seeds", "values"])
        for r in rows:
            writer.writerow([r["variant"], r["sparsity"], r["kind"], f"{r['mean']:.6g}", f"{r['std']:.6g}",
                             len(r["values"]), " ".join(f"{v:.6g}" for v in r["values"])])
    return markdown, table


def _figures(rows: list[dict[str, Any]], plans: Sequence[tuple[str, RunConfig]], results: Sequence[Any],
             out: Path, name: str, metric_name: str) -> list[Path]:
    try:
        from .figures import persistence_diagram, plot_metric_vs_sparsity, plot_persistence
    except ImportError:
        return []
    paths = [plot_metric_vs_sparsity([r for r in rows if r["kind"] == "sparse"], out / f"{name}-sparsity.png",
                                     metric_name)]
    for (variant, config), result in zip(plans, results):
        if config.embedding == "trained" and config.seed == 0 and isinstance(result, dict):
            from safetensors.torch import load_file

            from moduli_transform.manifolds import get_manifold

            embeddings = load_file(str(Path(config.out) / "embeddings.safetensors"))
            points = next(v for k, v in embeddings.items() if k.endswith("/rows"))[:300]
            manifold = get_manifold(config.manifold)
            diagrams = persistence_diagram(manifold.distance(points, points))
            paths.append(plot_persistence(diagrams, out / f"persistence-{variant}-s{config.sparsity:g}.png",
                                          f"trained {config.manifold} embedding"))
    return paths


def run_table(args: argparse.Namespace) -> int:
    """Plan, run (or reuse) and tabulate; called by ``moduli-transform table``."""
    from . import get_task

    sparsities = args.sparsities or [*PAPER_SPARSITIES[args.task], EXTRA_SPARSITY]
    plans = plan_runs(args.task, args.preset, args.grid, args.seeds, sparsities, args.out,
                      steps=args.steps, data=args.data)
    print(f"{len(plans)} runs planned in {args.out} ({args.grid}, {args.seeds} seeds, sparsities {sparsities})")
    # Namespaces built by hand (not by the CLI) may lack --device: they train on the CPU, as before.
    results = execute([config for _, config in plans], args.backend, args.jobs, args.address,
                      device=getattr(args, "device", "cpu"))
    failures = [r for r in results if isinstance(r, RunFailure)]
    for failure in failures:
        print(f"failed: {failure.run_dir}: {failure.error.strip().splitlines()[-1]}")
    task = get_task(args.task)
    metric_name = task.metric_name
    name = f"{args.task}-{args.grid}"
    rows = aggregate(plans, results)
    markdown, table = write_tables(rows, args.out, name, metric_name, task.learned_threshold, task.higher_is_better,
                                   note=devices_note(results))
    print("\n" + markdown.read_text())
    figures = _figures(rows, plans, results, Path(args.out), name, metric_name)
    print(f"written: {markdown}, {table}" + "".join(f", {p}" for p in figures))
    return 1 if failures else 0
