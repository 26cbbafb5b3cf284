"""`moduli-transform demo`: the README's main job, end to end in minutes on 2 cores.

Navigation (grid-cell path integration) at the ``cpu`` preset's sizes, 1200 steps: torus moduli
regularization pruned to 90% sparsity plus its lottery ticket, with the paper's controls
(no regularization, L1, shuffled coefficients) trained beside it, each run logging its
progress; then a table that explains itself (the chance level, the dense value named for
when it is read, the locality of the kept recurrent weights per regularizer), a figure,
the handle's summary, an export of the pruned model (CSR safetensors + ONNX) and a timing
of a dense against a sparse recurrent layer at a size where sparsity pays
(:data:`TIMING_HIDDEN` units).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from concurrent.futures import as_completed
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file

from moduli_transform.device import DEVICE_HELP, DeviceError, resolve_device

from .locality import run_locality
from .navigation import CHANCE_LEVEL_CM
from .ray_backend import split_finished
from .run_folder import RunFolderError, claim_run_folder, continue_or_refuse
from .runner import EMBEDDINGS_FILE, WEIGHTS_FILE, RunConfig, run
from .workers import training_pool

__all__ = ["register", "run_demo", "demo_table", "time_dense_vs_sparse", "CONTROLS", "TIMING_HIDDEN"]

CONTROLS = ("moduli", "none", "l1", "shuffled")
RECURRENT = "rnn.weight_hh_l0"
# Dense vs sparse is timed at this hidden size: at the demo's 256 units a 256x256 matrix-vector
# product is too small for the sparse kernel's overhead to pay, and the ratio flips with noise.
TIMING_HIDDEN = 2048
TIMING_STEPS = 50
TIMING_ROUNDS = 7
DEMO_REMEDY = "--fresh moves it aside (never deleted), or pass another --out"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="navigation at 90%% sparsity with the controls, table, figure, export")
    parser.add_argument("--out", default=None,
                        help="folder for the runs, table and figure (default: runs/demo, runs/demo-quick with --quick)")
    parser.add_argument("--steps", type=int, default=1200,
                        help="training steps per run, and as many for the lottery ticket (default: 1200)")
    parser.add_argument("--quick", action="store_true", help="200 steps per run: a smoke test, not a result")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once (one thread each)")
    parser.add_argument("--fresh", action="store_true",
                        help="retrain runs that already finished (the old ones are moved aside, not deleted)")
    parser.add_argument("--device", default="auto", help=f"where the runs train: {DEVICE_HELP}")
    parser.set_defaults(func=run_demo)


def _train(config: RunConfig, device: str = "cpu") -> dict[str, Any]:
    # Several runs share the terminal: periodic log lines, never interleaved bars.
    return run(config, progress="log", device=device)


def _plan(args: argparse.Namespace) -> list[RunConfig]:
    steps = 200 if args.quick else args.steps
    return [RunConfig(task="navigation", preset="cpu", manifold="torus", inhibitor="dog", regularizer=control,
                      sparsity=args.sparsity, lottery=True, seed=0, steps=steps, threads=1,
                      out=str(Path(args.out) / control)) for control in CONTROLS]


def _claim(plans: list[RunConfig], fresh: bool) -> tuple[dict[int, dict[str, Any]], list[RunConfig]]:
    """Finished runs to reuse (by index) and the runs to train; nothing is replaced.

    A partial run with the same settings is continued; a folder with another run is refused
    unless ``fresh`` moves it aside. Raises :class:`RunFolderError` before any training.
    """
    if fresh:
        for config in plans:
            for note in claim_run_folder(config.out, config.identity(), resume=False, overwrite=True):
                print(note)
        return {}, list(plans)
    finished, pending = split_finished(plans)
    return finished, [continue_or_refuse(plans[index], DEMO_REMEDY) for index in pending]


def _train_all(plans: list[RunConfig], finished: dict[int, dict[str, Any]], todo: list[RunConfig],
               jobs: int, device: torch.device, asked: str | None = None) -> list[dict[str, Any]]:
    """Train ``todo`` (``jobs`` at a time), a line per finished run; the summaries in plan order."""
    summaries = {plans[index].out: summary for index, summary in finished.items()}
    if finished:
        print(f"reusing {len(finished)} finished runs: {', '.join(plans[i].regularizer for i in finished)}")
    if todo:
        print(f"training {len(todo)} runs ({jobs} at a time, device {device}): "
              f"{', '.join(c.regularizer for c in todo)}", flush=True)
        # Each run logs its own steps, time and eta (progress_bar in "log" mode, on stderr).
        pool, run_device = training_pool(asked or str(device), device, max(1, jobs))
        with pool:
            futures = {pool.submit(_train, config, run_device): config for config in todo}
            for done, future in enumerate(as_completed(futures), 1):
                config, summary = futures[future], future.result()
                print(f"  run {done}/{len(todo)}: {config.regularizer} finished in {summary['wall_time_s']:.0f} s, "
                      f"{100 * summary['sparsity']:.0f}% sparse {summary['sparse_metric']:.1f} cm, "
                      f"lottery {summary['lottery_metric']:.1f} cm", flush=True)
                summaries[config.out] = summary
    return [summaries[config.out] for config in plans]


def demo_table(summaries: Sequence[dict[str, Any]], localities: Sequence[tuple[float, float] | None],
               chance: float = CHANCE_LEVEL_CM) -> str:
    """The demo's markdown table: one row per regularizer, then the chance level.

    Args:
        summaries: the runs' summaries (``regularizer``, ``sparsity``, the three metrics, wall time).
        localities: per run, ``(kept, all pairs)`` mean torus distance of ``W_hh`` (see
            :func:`~moduli_transform.tasks.locality.locality`; kept NaN: no weight kept), or
            None where not measured.
        chance: the error of always answering the arena's mean position (cm).

    Example:
        >>> row = {"regularizer": "moduli", "sparsity": 0.9, "dense_metric": 40.0, "sparse_metric": 20.0,
        ...        "lottery_metric": 25.0, "wall_time_s": 100.0}
        >>> print(demo_table([row], [(2.5, 3.8)]))  # doctest: +NORMALIZE_WHITESPACE
        | regularizer | after dense epoch (cm) | 90% sparse (cm) | lottery (cm) | kept W_hh distance | all pairs | wall time (s) |
        |---|---|---|---|---|---|---|
        | moduli | 40.0 | 20.0 | 25.0 | 2.50 | 3.80 | 100 |
        | chance (always the mean position) | 84.2 | 84.2 | 84.2 | - | - | - |
    """
    sparsity = int(round(100 * summaries[0]["sparsity"]))
    lines = [f"| regularizer | after dense epoch (cm) | {sparsity}% sparse (cm) | lottery (cm) | kept W_hh distance | "
             "all pairs | wall time (s) |", "|---|---|---|---|---|---|---|"]
    for summary, measured in zip(summaries, localities):
        kept, every = ("-", "-") if measured is None else \
            ("none kept" if math.isnan(measured[0]) else f"{measured[0]:.2f}", f"{measured[1]:.2f}")
        lines.append(f"| {summary['regularizer']} | {summary['dense_metric']:.1f} | {summary['sparse_metric']:.1f} | "
                     f"{summary['lottery_metric']:.1f} | {kept} | {every} | {summary['wall_time_s']:.0f} |")
    lines.append(f"| chance (always the mean position) | {chance:.1f} | {chance:.1f} | {chance:.1f} | - | - | - |")
    return "\n".join(lines)


def _notes(summary: dict[str, Any], localities: Sequence[tuple[float, float] | None]) -> str:
    """What the table's columns are, in the runs' own step counts."""
    phases = summary["phases"]
    sparse_end = phases["dense"] + phases["prune"] + phases["finetune"]
    emptied = any(measured is not None and math.isnan(measured[0]) for measured in localities)
    return "\n".join([
        f"after dense epoch: test error after the first epoch ({phases['dense']} of {sparse_end} steps), before "
        "any pruning; a snapshot early in training, not a fully trained dense model, so a sparse value "
        f"below it (after {sparse_end} steps) is no paradox",
        f"{100 * summary['sparsity']:.0f}% sparse: after all {sparse_end} steps; lottery: the same mask retrained "
        f"from a random initialisation for {phases['lottery']} steps",
        "kept W_hh distance: mean torus distance between the neurons each kept recurrent weight joins, on the "
        "embedding the run pruned with; all pairs: the same over every weight (below it = local wiring)"
        + ("; none kept: the global pruning ranking (the authors' scope) removed every recurrent weight"
           if emptied else ""),
        f"chance: {CHANCE_LEVEL_CM:.2f} cm, the error of always answering the arena's mean position",
    ])


def _localities(plans: Sequence[RunConfig]) -> list[tuple[float, float] | None]:
    measured: list[tuple[float, float] | None] = []
    for config in plans:
        try:
            measured.append(run_locality(config.out, RECURRENT))
        except (OSError, ValueError, KeyError) as error:  # a run folder from another version: say so, go on
            print(f"no locality for {config.out}: {error}")
            measured.append(None)
    return measured


def _figure(summaries: list[dict[str, Any]], moduli_dir: Path, path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install '.[plots]'): no figure")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .figures import plot_incoming_weights

    figure, (bars, torus) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [s["regularizer"] for s in summaries]
    width = 0.27
    for offset, (key, label) in enumerate((("dense_metric", "dense"), ("sparse_metric", "sparse"),
                                           ("lottery_metric", "lottery"))):
        bars.bar([i + (offset - 1) * width for i in range(len(names))], [s[key] for s in summaries], width, label=label)
    bars.set_xticks(range(len(names)), names)
    bars.set_ylabel("decoding error (cm)")
    bars.set_title(f"navigation, {int(round(100 * summaries[0]['sparsity']))}% sparse")
    bars.legend()
    weights = load_file(str(moduli_dir / WEIGHTS_FILE))["rnn.weight_hh_l0"]
    embedding = load_file(str(moduli_dir / EMBEDDINGS_FILE))["rnn.weight_hh_l0/rows"]
    plot_incoming_weights(torus, weights, embedding, neuron=int(weights.abs().sum(1).argmax()))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _export(run_dir: Path, out: Path) -> None:
    """Export the pruned moduli model: CSR safetensors and ONNX (checked against PyTorch)."""
    from moduli_transform.export import save_safetensors, to_onnx

    from . import get_task

    task_class = get_task("navigation")
    task = task_class(task_class.get_preset("cpu"))
    model = task.build_model()
    tensors = load_file(str(run_dir / WEIGHTS_FILE))
    masks = {k[len("mask/"):]: v for k, v in tensors.items() if k.startswith("mask/")}
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("mask/")}, strict=True)
    model.eval()
    save_safetensors(model, out / "navigation-pruned.safetensors", masks=masks)
    velocities, start_code = torch.randn(1, 20, 2) * 0.1, torch.softmax(torch.randn(1, model.encoder.in_features), -1)
    report = to_onnx(model, (velocities, start_code), out / "navigation-pruned.onnx", masks=masks)
    sizes = {p.suffix: p.stat().st_size for p in (out / "navigation-pruned.safetensors", out / "navigation-pruned.onnx")}
    print(f"\nexported: {out / 'navigation-pruned.safetensors'} ({sizes['.safetensors'] / 1e3:.0f} kB, CSR), "
          f"{out / 'navigation-pruned.onnx'} ({sizes['.onnx'] / 1e3:.0f} kB, ONNX Runtime max abs error "
          f"{max(report.max_abs_error.values()):.1e})")


def time_dense_vs_sparse(hidden: int = TIMING_HIDDEN, sparsity: float = 0.9, steps: int = TIMING_STEPS,
                         rounds: int = TIMING_ROUNDS, seed: int = 0) -> tuple[float, float]:
    """Seconds per call of a dense ``nn.RNN`` and of the CSR sparse runtime on the same pruned weights.

    The layer is the navigation model's (ReLU, no bias, 2 inputs) with ``hidden`` units and
    ``W_hh`` pruned at random to ``sparsity``; batch 1, ``steps`` time steps, one thread.
    The two are timed alternately, ``rounds`` times each, and the medians returned, so a
    background load hits both alike.

    Returns:
        ``(dense_seconds, sparse_seconds)``.
    """
    from moduli_transform.export.sparse_runtime import SparseRNN

    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.RNN(2, hidden, nonlinearity="relu", bias=False, batch_first=True)
    with torch.no_grad():
        layer.weight_hh_l0.mul_(torch.rand(hidden, hidden, generator=generator) >= sparsity)
        layer.weight_hh_l0.mul_(0.5)  # keeps the ReLU states bounded over the steps
    sparse = SparseRNN.from_module(layer, kernel="csr")
    inputs = torch.randn(1, steps, 2, generator=generator)
    state = torch.rand(1, 1, hidden, generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    try:
        with torch.no_grad():
            for candidate in (layer, sparse):
                candidate(inputs, state)  # warm-up: allocations, kernel choice
            for _ in range(rounds):
                for name, candidate in (("dense", layer), ("sparse", sparse)):
                    started = time.perf_counter()
                    candidate(inputs, state)
                    times[name].append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times["dense"]), statistics.median(times["sparse"])


def _print_timing(sparsity: float) -> None:
    dense, sparse = time_dense_vs_sparse(sparsity=sparsity)
    print(f"\nrecurrent layer at hidden {TIMING_HIDDEN}, W_hh {100 * sparsity:.0f}% pruned at random, batch 1, "
          f"T={TIMING_STEPS}, 1 thread, median of {TIMING_ROUNDS} interleaved rounds "
          "(`moduli-transform bench` for the full benchmark):")
    print(f"  PyTorch dense nn.RNN        {1000 * dense:8.2f} ms")
    print(f"  sparse runtime (CSR int32)  {1000 * sparse:8.2f} ms")
    verdict = "sparse faster" if sparse < dense else "dense faster"
    print(f"  dense / sparse = x{dense / sparse:.2f} ({verdict})")


def run_demo(args: argparse.Namespace) -> int:
    if args.out is None:  # a smoke run never replaces the real demo's results
        args.out = "runs/demo-quick" if args.quick else "runs/demo"
    out = Path(args.out)
    try:
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"--out {out} is a file, not a folder")
        if not 0.0 <= args.sparsity < 1.0 or args.steps < 3 or args.jobs < 1:
            raise RunFolderError(f"need 0 <= --sparsity < 1, --steps >= 3, --jobs >= 1; got {args.sparsity}, "
                                 f"{args.steps}, {args.jobs}")
        device = resolve_device(args.device)
        plans = _plan(args)
        started = time.perf_counter()
        finished, todo = _claim(plans, args.fresh)  # refuses a foreign run before any training
    except (RunFolderError, DeviceError) as error:
        print(f"moduli-transform demo: error: {error}", file=sys.stderr)
        return 2
    summaries = _train_all(plans, finished, todo, args.jobs, device, args.device)
    out.mkdir(parents=True, exist_ok=True)
    print("\nmeasuring the locality of the kept recurrent weights", flush=True)
    localities = _localities(plans)
    table = demo_table(summaries, localities)
    notes = _notes(summaries[0], localities)
    (out / "table.md").write_text(table + "\n\n" + notes + "\n")
    print("\n" + table + "\n\n" + notes)
    figure = _figure(summaries, out / "moduli", out / "demo.png")
    if figure:
        print(f"\nfigure: {figure}")
    print("\n" + (out / "moduli" / "handle.txt").read_text().rstrip())
    _export(out / "moduli", out)
    _print_timing(args.sparsity)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; everything is in {out}/")
    return 0
