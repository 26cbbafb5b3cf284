"""One batch-1 tile-runtime call split into its parts (issue 13): where the time beyond the
byte floor goes.

Times, in interleaved rounds, for an Elman layer of ``--hidden`` units pruned to
``--sparsity`` in 16 x 16 tiles (``bench``'s "tiled" pattern), one sequence of ``--steps``:

* ``whole call``: ``SparseRNN(...)(x)``, as ``bench`` times it;
* ``projection + kernel ordering its outputs``: what the call runs, outside the runtime: the
  kernel writes each step's state in the module's unit order (``run_layer(..., inverse)``);
* ``projection + kernel + gather after``: the kernel's outputs in the tiles' order, then one
  gather of the whole sequence (the runtime's way before);
* ``projection + kernel``: without any reordering;
* ``input projection alone``: ``torch.addmm`` of the sequence's inputs, fresh output;
* ``tile kernel alone``: the fused sequence on a projection made once;
* ``byte floor``: reading the bytes of one step (``nbytes_per_step``) with ``Tensor.sum``,
  times the steps (the L3 figure when they fit in L3, as here at 98%).

Each cell is the median over rounds of a round's median call. Pin the process
(``taskset -c 0``) and keep that core to it: a process sharing it preempts calls of a few
ms for a whole scheduler slice (docs/BENCHMARKS.md, "Busy cores").

    taskset -c 0 python benchmarks/tile_call_parts.py --sparsity 0.98 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from moduli_transform.export.bench import BenchConfig, build_module
from moduli_transform.export.sparse_runtime import SparseRNN, _take_columns, layers_from_module


def _median_ms(call: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def parts(hidden: int, sparsity: float, steps: int, threads: int) -> dict[str, Callable[[], object]]:
    """The calls to time, by name (see the module docstring)."""
    module, perms = build_module(BenchConfig(hidden, 1, sparsity), "tiled")
    runtime = SparseRNN(layers_from_module(module), kernel="tiles", perms=perms, threads=threads)
    inputs = torch.randn(steps, 1, module.input_size)
    weight_ih, bias = runtime.layers[0].weight_ih, runtime._input_bias[0]
    kernel, inverse = runtime.kernel(0, 1), runtime._inverse[0]
    h0 = torch.zeros(1, hidden)

    def project() -> torch.Tensor:
        return torch.addmm(bias, inputs.reshape(steps, -1), weight_ih.t()).view(steps, 1, -1)

    projected = project()
    step_bytes = torch.ones(runtime.nbytes_per_step(1) // 4)
    return {
        "whole call": lambda: runtime(inputs),
        "projection + kernel ordering its outputs":
            lambda: kernel.run_layer("RNN_TANH", project(), h0, inverse=inverse)[0],
        "projection + kernel + gather after":
            lambda: _take_columns(kernel.run_layer("RNN_TANH", project(), h0)[0], inverse),
        "projection + kernel": lambda: kernel.run_layer("RNN_TANH", project(), h0),
        "input projection alone": project,
        "tile kernel alone": lambda: kernel.run_layer("RNN_TANH", projected, h0),
        "byte floor": lambda: [step_bytes.sum() for _ in range(steps)],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--sparsity", type=float, default=0.98)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15, help="calls per part and round")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        parser.error(f"--rounds and --repeats must be at least 1, got {args.rounds} and {args.repeats}")
    torch.set_num_threads(args.threads)
    calls = parts(args.hidden, args.sparsity, args.steps, args.threads)
    for call in calls.values():   # compile, fault in, warm the caches
        for _ in range(3):
            call()
    rounds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            rounds[name].append(_median_ms(call, args.repeats))
    floor = statistics.median(rounds["byte floor"])
    print(f"H={args.hidden}, {args.sparsity:.0%} sparse, T={args.steps}, batch 1, {args.threads} thread(s)")
    print(f"| part | ms (median of {args.rounds} rounds) | range | x byte floor |")
    print("|---|---|---|---|")
    for name, values in rounds.items():
        middle = statistics.median(values)
        print(f"| {name} | {middle:.3f} | {min(values):.2f}-{max(values):.2f} | {middle / floor:.2f} |")


if __name__ == "__main__":
    main()
