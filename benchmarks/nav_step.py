"""One navigation training step against its GEMM floor, and against the authors' step (issue 13).

Times, in interleaved rounds, at the same sizes and thread count:

* ``floor``: the matrix products one step cannot avoid, each timed with ``torch.mm`` at
  its shape in this run: the recurrence forward and backward (``T`` products of
  ``(B, Ng) x (Ng, Ng)`` each), the recurrent weight gradient (one ``(Ng, BT) x (BT, Ng)``),
  the decoder forward and its two gradients, and the encoder's three small ones.
* ``ours``: the runner's training step (``_Run.train_step``: batch, forward, loss,
  moduli penalty, backward, AdamW, masks) at 90% sparsity, batches drawn ahead in a
  background thread (``tasks/prefetch.py``), as ``train``/``reproduce`` run it.
* ``ours, in series``: the same step drawing its batch first (``run(..., prefetch=False)``).
* ``ours, nn.RNN recurrence``: the same step through ``nn.RNN`` instead of the model's fused
  recurrence (``tasks/fused_rnn.py``).
* ``authors`` (with ``--authors``): their ``Trainer.train_step`` after ``next(generator)``,
  from a local checkout of github mackeynations/Moduli-regularizers ``navigation/``, their
  torus inverted-DoG penalty, the four matrices pruned globally to 90% with
  ``torch.nn.utils.prune`` as their ``trainer.py`` does. One change: their step saves the
  model to disk whenever the batch error improves; that save is switched off here
  (``besterr = -inf``), so their figure does not count disk writes.

Each cell is the median over rounds of the mean step time within a round; "x floor, per
round" is the median (and range) of each round's own ratio to that round's floor; "system
ms" is the process's kernel time per step (page faults, mostly). Every variant runs with
the allocator setting the ``moduli-transform`` command uses (``--allocator default`` for
glibc's own), the authors' step included, since all run in this one process.

    python benchmarks/nav_step.py --threads 2 --rounds 5 --steps 6 \\
        --authors /path/to/Moduli-regularizers/navigation --out runs/bench/nav_step.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from moduli_transform.allocator import reuse_large_blocks
from moduli_transform.tasks.navigation import PRESETS
from moduli_transform.tasks.prefetch import BatchPrefetcher
from moduli_transform.tasks.runner import RunConfig, _Run


def gemm_shapes(batch: int, length: int, grid: int, place: int) -> list[tuple[str, int, int, int, int]]:
    """``(name, count, m, k, n)``: ``count`` products of ``(m, k) x (k, n)`` per step."""
    rows = batch * length
    return [
        ("recurrence forward", length, batch, grid, grid),
        ("recurrence backward (state)", length, batch, grid, grid),
        ("recurrent weight gradient", 1, grid, rows, grid),
        ("decoder forward", 1, rows, grid, place),
        ("decoder backward (input)", 1, rows, place, grid),
        ("decoder weight gradient", 1, place, rows, grid),
        ("encoder forward", 1, batch, place, grid),
        ("encoder backward (input, weight)", 1, batch + place, grid, place),
    ]


def time_gemms(shapes: list[tuple[str, int, int, int, int]], repeats: int = 3) -> dict[str, float]:
    """Seconds per step of each shape's products (best of ``repeats``)."""
    times = {}
    for name, count, m, k, n in shapes:
        a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
        torch.mm(a, b, out=out)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(count):
                torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - started)
        times[name] = best
    return times


def our_step(args: argparse.Namespace, prefetch: bool, fused: bool = True) -> tuple[Callable[[], None], Callable[[], None]]:
    """The runner's step at the benchmark's sizes, pruned to 90%; returns ``(step, close)``.

    ``fused=False`` trains through ``nn.RNN`` (a no-op forward hook on the layer turns the
    model's fused recurrence off, as any hook does)."""
    preset = replace(PRESETS["paper"], place_cells=args.Np, grid_cells=args.Ng, batch_size=args.batch,
                     sequence_length=args.T, steps=30 * 10, steps_per_epoch=10)
    PRESETS["bench-step"] = preset  # a preset of this script only; nothing is written
    config = RunConfig(task="navigation", preset="bench-step", sparsity=0.9,
                       out=tempfile.mkdtemp(prefix="nav-step-"), threads=args.threads)
    state = _Run(config)
    state.handle.prune_now(0.9)
    if not fused:
        state.model.rnn.register_forward_hook(lambda *_: None)
    if prefetch:
        state._batches = BatchPrefetcher(lambda generator: state.task.train_batch(0, generator), state.generator)

    def close() -> None:
        if state._batches is not None:
            state._batches.close()
        state.handle.remove()

    return lambda: state.train_step("prune", 0) and None, close


def authors_step(args: argparse.Namespace) -> tuple[Callable[[], None], Callable[[], None]]:
    """The authors' step from their checkout ``args.authors`` (see the module docstring)."""
    folder = Path(args.authors).resolve()
    sys.path.insert(0, str(folder))
    workdir = Path(tempfile.mkdtemp(prefix="authors-step-"))
    (workdir / "models").mkdir()
    cwd = os.getcwd()
    os.chdir(workdir)  # their trainer writes relative paths
    import numpy

    if not hasattr(numpy, "Inf"):  # their trainer.py:29 uses np.Inf, gone in NumPy 2
        numpy.Inf = numpy.inf
    import model1  # noqa: E402  (their modules, from --authors)
    import place_cells
    import trainer
    import trajectory_generator
    from torch.nn.utils import prune

    # Their main.py defaults (main.py:27-128), the torus inverted-DoG moduli run, our sizes.
    options = Namespace(
        save_dir=str(workdir / "models"), n_epochs=30, n_steps=1000, batch_size=args.batch,
        sequence_length=args.T, learning_rate=1e-4, Np=args.Np, Ng=args.Ng, place_cell_rf=0.12,
        surround_scale=2, RNN_type="RNN", activation="relu", weight_decay=0.1, DoG=True, periodic=False,
        box_width=2.2, box_height=2.2, device="cpu", regularizer="torus", regpower="DoG", permute=False,
        changeembed=False, regtype=1, savefile="bench", save_repo=str(workdir) + "/", invert=True,
        trainembed=False, target_perc=90.0, run_ID="bench")
    cells = place_cells.PlaceCells(options)
    model = model1.RNN(options, cells)
    walks = trajectory_generator.TrajectoryGenerator(options, cells)
    their_trainer = trainer.Trainer(options, model, walks)
    their_trainer.besterr = -float("inf")  # no best-model save to disk inside the timed step
    prune.global_unstructured(((model.encoder, "weight"), (model.RNN, "weight_hh_l0"),
                               (model.RNN, "weight_ih_l0"), (model.decoder, "weight")),
                              pruning_method=prune.L1Unstructured, amount=0.9)
    batches = walks.get_generator()
    os.chdir(cwd)

    def step() -> None:
        inputs, codes, positions = next(batches)
        their_trainer.train_step(inputs, codes, positions, options)

    return step, lambda: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--Np", type=int, default=512, help="place cells (authors: 512)")
    parser.add_argument("--Ng", type=int, default=512, help="grid cells, the RNN's width (authors: 4096)")
    parser.add_argument("--batch", type=int, default=200, help="walks per batch (authors: 200)")
    parser.add_argument("--T", type=int, default=50, help="steps per walk (authors: 50)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant and round")
    parser.add_argument("--authors", help="a checkout of the authors' navigation/ folder (optional)")
    parser.add_argument("--out", help="CSV of the per-round times (refuses an existing file)")
    parser.add_argument("--allocator", choices=("reuse", "default"), default="reuse",
                        help="reuse: large freed blocks stay mapped, as the moduli-transform command "
                             "runs (moduli_transform/allocator.py), for every variant in this process; "
                             "default: glibc's own settings")
    args = parser.parse_args()
    if args.out and Path(args.out).exists():
        parser.error(f"--out {args.out} exists; give a new file")
    torch.set_num_threads(args.threads)
    reused = reuse_large_blocks() if args.allocator == "reuse" else False
    shapes = gemm_shapes(args.batch, args.T, args.Ng, args.Np)
    flops = sum(2 * count * m * k * n for _, count, m, k, n in shapes)

    variants = {"ours": our_step(args, prefetch=True), "ours, in series": our_step(args, prefetch=False),
                "ours, nn.RNN recurrence": our_step(args, prefetch=True, fused=False)}
    if args.authors:
        variants["authors"] = authors_step(args)
    rows = []
    for round_ in range(args.rounds):
        gemms = time_gemms(shapes)
        rows.append({"round": round_, "variant": "floor", "seconds": sum(gemms.values()), "system_seconds": 0.0})
        for name, (step, _) in variants.items():
            step()  # warm: allocator, the producer's first batch
            system, started = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
            for _ in range(args.steps):
                step()
            rows.append({"round": round_, "variant": name, "seconds": (time.perf_counter() - started) / args.steps,
                         "system_seconds": (resource.getrusage(resource.RUSAGE_SELF).ru_stime - system) / args.steps})
        print(f"round {round_ + 1}/{args.rounds}: " +
              ", ".join(f"{r['variant']} {1000 * r['seconds']:.0f} ms" for r in rows if r["round"] == round_),
              file=sys.stderr, flush=True)
    for _, close in variants.values():
        close()

    median = {name: statistics.median(r["seconds"] for r in rows if r["variant"] == name)
              for name in ["floor", *variants]}
    print(f"\nNavigation step, Np={args.Np} Ng={args.Ng} batch {args.batch} T={args.T}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} steps; GEMM work {flops / 1e9:.1f} GFLOP "
          f"({flops / median['floor'] / 1e9:.0f} GFLOPS at the floor); allocator: "
          f"{'large blocks reused' if reused else 'glibc default'}\n")
    # On a shared host the floor moves between rounds; a round's own ratio compares
    # measurements made seconds apart, so its median is the steadier figure.
    by_round = {(r["round"], r["variant"]): r["seconds"] for r in rows}

    def round_ratio(numerator: str, denominator: str) -> str:
        ratios = [by_round[(k, numerator)] / by_round[(k, denominator)] for k in range(args.rounds)]
        return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"

    system = {name: statistics.median(r["system_seconds"] for r in rows if r["variant"] == name) for name in median}
    print("| variant | ms per step | system ms per step | x floor | x floor, per round: median (range) | authors / this |")
    print("|---|---|---|---|---|---|")
    for name, seconds in median.items():
        versus = f"{median['authors'] / seconds:.2f}" if "authors" in median and name != "floor" else ""
        per_round = round_ratio(name, "floor") if name != "floor" else ""
        print(f"| {name} | {1000 * seconds:.0f} | {1000 * system[name]:.1f} | {seconds / median['floor']:.2f} "
              f"| {per_round} | {versus} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "x", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=["round", "variant", "seconds", "system_seconds"])
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
