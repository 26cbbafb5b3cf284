"""Dense learning curves of the navigation task for a grid of sizes (the `cpu` preset search).

Each configuration trains the dense path-integration RNN (no penalty, no pruning) with
the task's own optimizer for ``--steps`` steps on one thread and records the held-out
decoding error every ``--eval-every`` steps. One CSV row per configuration goes to
``--out/search.csv`` (final error, best error, seconds per step), the curve of each to
``--out/curve-<name>.csv``.

    python benchmarks/nav_search.py --out runs/nav-search \\
        --config Np=256,Ng=256,T=20,B=100,lr=3e-3,steps=2000
"""

from __future__ import annotations

import argparse
import csv
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from moduli_transform.tasks.navigation import PRESETS, NavigationTask

KEYS = {"Np": ("place_cells", int), "Ng": ("grid_cells", int), "T": ("sequence_length", int),
        "B": ("batch_size", int), "lr": ("lr", float), "steps": ("steps", int),
        "warmup": ("lr_warmup", int), "half": ("lr_half_life", int), "wd": ("weight_decay", float)}


def parse_config(text: str) -> dict[str, object]:
    """``"Np=256,Ng=256,lr=3e-3"`` -> preset field changes."""
    changes: dict[str, object] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in KEYS:
            raise ValueError(f"unknown key {key!r} in {text!r}; expected one of {', '.join(KEYS)}")
        field, kind = KEYS[key]
        changes[field] = kind(value)
    return changes


def train_curve(changes: dict[str, object], eval_every: int, seed: int) -> tuple[list[tuple[int, float, float]], float]:
    """Dense training; returns ``[(step, valid error cm, seconds so far)]`` and seconds per step."""
    preset = replace(PRESETS["cpu"], **changes)
    task = NavigationTask(preset)
    torch.manual_seed(seed)
    model = task.build_model()
    optimizer = task.make_optimizer(model)
    generator = torch.Generator().manual_seed(seed)
    curve = [(0, task.evaluate(model), 0.0)]
    train_time = 0.0
    for step in tqdm(range(1, preset.steps + 1), desc=str(changes), leave=False):
        started = time.perf_counter()
        batch = task.train_batch(step, generator)
        loss, _ = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        train_time += time.perf_counter() - started
        if step % eval_every == 0 or step == preset.steps:
            model.eval()
            curve.append((step, task.evaluate(model), train_time))
            model.train()
    return curve, train_time / preset.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, help="e.g. Np=256,Ng=256,T=20,lr=3e-3")
    parser.add_argument("--out", default="runs/nav-search")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "search.csv"
    new_file = not summary_path.exists()
    with open(summary_path, "a", newline="") as summary:
        writer = csv.writer(summary)
        if new_file:
            writer.writerow(["config", "seed", "final_cm", "best_cm", "s_per_step", "total_s"])
        for text in args.config:
            curve, per_step = train_curve(parse_config(text), args.eval_every, args.seed)
            name = text.replace(",", "_").replace("=", "")
            with open(out / f"curve-{name}-s{args.seed}.csv", "w", newline="") as file:
                csv.writer(file).writerows([("step", "valid_cm", "train_s"), *curve])
            final, best = curve[-1][1], min(error for _, error, _ in curve)
            writer.writerow([text, args.seed, f"{final:.2f}", f"{best:.2f}", f"{per_step:.4f}", f"{curve[-1][2]:.0f}"])
            summary.flush()
            print(f"{text} seed {args.seed}: final {final:.2f} cm, best {best:.2f} cm, {per_step * 1e3:.1f} ms/step")


if __name__ == "__main__":
    main()
