"""Overhead of the moduli penalty on one training step of nn.RNN (CPU).

One step = forward, backward and Adam update of nn.RNN(H, H) on a batch of B sequences
of length T, without the penalty, with fixed embeddings (cached C) and with trained
embeddings (C recomputed each step). Prints the median over repetitions.

    python benchmarks/bench_penalty.py --hidden 1024 --batch 64 --steps 50
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import moduli_transform as mt


def time_steps(mode: str, hidden: int, batch: int, steps: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = nn.RNN(hidden, hidden, batch_first=True)
    handle = None
    if mode != "none":
        handle = mt.attach(model, manifold="torus", embedding=mode, strength=0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, steps, hidden)
    times = []
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        out, _ = model(x)
        loss = out.pow(2).mean()
        if handle is not None:
            loss = loss + handle.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if handle is not None:
            handle.step()
        if repeat:  # the first step warms up allocators and caches C
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"nn.RNN H={args.hidden} batch={args.batch} T={args.steps}, threads={torch.get_num_threads()}")
    print("| penalty | step time (ms) | overhead |\n|---|---|---|")
    # Interleave the modes so machine noise hits all of them alike.
    results: dict[str, list[float]] = {"none": [], "fixed": [], "trained": []}
    for _ in range(3):
        for mode in results:
            results[mode].append(time_steps(mode, args.hidden, args.batch, args.steps, args.repeats))
    base = statistics.median(results["none"])
    for mode, values in results.items():
        value = statistics.median(values)
        print(f"| {mode} | {1000 * value:.1f} | {100 * (value / base - 1):+.1f}% |")


if __name__ == "__main__":
    main()
