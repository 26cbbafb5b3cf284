"""Task quality of tile pruning vs unstructured magnitude pruning at the same sparsity.

Trains one dense, moduli-regularized model (torus embedding, no pruning), then prunes its
recurrent matrix one-shot (no fine-tuning) two ways: unstructured magnitude pruning and
16x16 tile pruning in the torus order of the neurons; reports the task metric of both.
Gradual tile pruning during training is compared by
``moduli-transform table adding --grid tiles`` (see docs/BENCHMARKS.md).

    python benchmarks/tile_quality.py --task adding --preset cpu --sparsities 0.5 0.75 0.9
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file

from moduli_transform.export.tiles import tile_vs_unstructured_quality
from moduli_transform.manifolds import get_manifold
from moduli_transform.tasks import get_task
from moduli_transform.tasks.runner import EMBEDDINGS_FILE, WEIGHTS_FILE, RunConfig, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="adding")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.75, 0.9])
    parser.add_argument("--out", default="runs/tile-quality")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out) / f"{args.task}-{args.preset}-dense-seed{args.seed}"
    if not (out / "summary.json").exists():
        run(RunConfig(task=args.task, preset=args.preset, sparsity=0.0, steps=args.steps, seed=args.seed,
                      out=str(out), threads=1), progress=True)
    task_class = get_task(args.task)
    task = task_class(task_class.get_preset(args.preset))
    model = task.build_model()
    tensors = load_file(str(out / WEIGHTS_FILE))
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("mask/")})
    embeddings = {k[: -len("/rows")]: v for k, v in load_file(str(out / EMBEDDINGS_FILE)).items() if k.endswith("/rows")}
    print(f"| sparsity | dense {task.metric_name} | unstructured | 16x16 tiles (torus order) |\n|---|---|---|---|")
    for sparsity in args.sparsities:
        result = tile_vs_unstructured_quality(model, lambda m: task.evaluate(m, "test"), sparsity,
                                              embeddings=embeddings, manifold=get_manifold("torus"))
        print(f"| {sparsity:.2f} | {result.dense:.4g} | {result.unstructured:.4g} | {result.tile:.4g} |")


if __name__ == "__main__":
    main()
