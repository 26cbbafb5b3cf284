"""`moduli-transform demo`: the README's main job, end to end in a few minutes on 2 cores.

Navigation (grid-cell path integration) at the ``cpu`` preset's sizes, 1200 steps: torus moduli
regularization pruned to 90% sparsity plus its lottery ticket, with the paper's controls
(no regularization, L1, shuffled coefficients) trained beside it; then a table, a figure,
the handle's summary, an export of the pruned model (CSR safetensors + ONNX) and a short
dense-vs-sparse timing of its recurrent layer.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from moduli_transform.device import DEVICE_HELP, DeviceError, process_context, resolve_device

from .ray_backend import split_finished
from .run_folder import RunFolderError, claim_run_folder
from .runner import EMBEDDINGS_FILE, WEIGHTS_FILE, RunConfig, run

__all__ = ["register", "run_demo"]

CONTROLS = ("moduli", "none", "l1", "shuffled")


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
    return run(config, progress=False, device=device)


def _plan(args: argparse.Namespace) -> list[RunConfig]:
    steps = 200 if args.quick else args.steps
    return [RunConfig(task="navigation", preset="cpu", manifold="torus", inhibitor="dog", regularizer=control,
                      sparsity=args.sparsity, lottery=True, seed=0, steps=steps, threads=1,
                      out=str(Path(args.out) / control)) for control in CONTROLS]


def _train_all(plans: list[RunConfig], jobs: int, fresh: bool, device: torch.device) -> list[dict[str, Any]]:
    summaries: dict[str, dict[str, Any]] = {}
    todo = []
    finished, pending = split_finished(plans) if not fresh else ({}, list(range(len(plans))))
    for index, config in enumerate(plans):
        if index in finished:
            summaries[config.out] = finished[index]
        else:
            todo.append(config)
    for config in todo:  # a run left with other settings is never replaced silently
        for note in claim_run_folder(config.out, config.identity(), resume=False, overwrite=fresh):
            print(note)
    if todo:
        print(f"training {len(todo)} runs ({jobs} at a time, device {device}): "
              f"{', '.join(c.regularizer for c in todo)}")
        train = functools.partial(_train, device=str(device))
        with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=process_context(device)) as pool:
            for config, summary in zip(todo, pool.map(train, todo)):
                print(f"  {config.regularizer:9s} done in {summary['wall_time_s']:.0f} s")
                summaries[config.out] = summary
    return [summaries[config.out] for config in plans]


def _table(summaries: list[dict[str, Any]]) -> str:
    sparsity = int(round(100 * summaries[0]["sparsity"]))
    lines = [f"| regularizer | dense (cm) | {sparsity}% sparse (cm) | lottery (cm) | wall time (s) |",
             "|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['regularizer']} | {s['dense_metric']:.1f} | {s['sparse_metric']:.1f} | "
                     f"{s['lottery_metric']:.1f} | {s['wall_time_s']:.0f} |")
    return "\n".join(lines)


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


def _export_and_bench(run_dir: Path, out: Path) -> None:
    """Export the pruned moduli model and time its recurrent layer dense vs sparse."""
    from moduli_transform.export import save_safetensors, to_onnx
    from moduli_transform.export.sparse_runtime import SparseRNN

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
    sparse = SparseRNN.from_module(model.rnn, kernel="csr")
    inputs, state = torch.randn(1, 50, 2), torch.rand(1, 1, model.rnn.hidden_size)
    timings = {}
    with torch.no_grad():
        for label, layer in (("PyTorch dense nn.RNN", model.rnn), ("sparse runtime (CSR int32)", sparse)):
            layer(inputs, state)
            started = time.perf_counter()
            for _ in range(20):
                layer(inputs, state)
            timings[label] = (time.perf_counter() - started) / 20
    dense_time = timings["PyTorch dense nn.RNN"]
    print("recurrent layer, batch 1, T=50 (see `moduli-transform bench` for the full benchmark):")
    for label, seconds in timings.items():
        print(f"  {label:28s} {1000 * seconds:7.2f} ms   x{dense_time / seconds:.1f}")


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
        summaries = _train_all(plans, args.jobs, args.fresh, device)
    except (RunFolderError, DeviceError) as error:
        print(f"moduli-transform demo: error: {error}".replace("--resume to continue it", "nothing (a finished "
              "run with the same settings is reused)").replace("--overwrite", "--fresh"), file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    table = _table(summaries)
    (out / "table.md").write_text(table + "\n")
    print("\n" + table)
    figure = _figure(summaries, out / "moduli", out / "demo.png")
    if figure:
        print(f"\nfigure: {figure}")
    print("\n" + (out / "moduli" / "handle.txt").read_text().rstrip())
    _export_and_bench(out / "moduli", out)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; everything is in {out}/")
    return 0
