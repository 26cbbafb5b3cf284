"""Learning curve of a run folder: validation metric vs step as CSV and PNG (matplotlib).

Reads ``<run>/metrics.jsonl`` (the runner's ``valid`` records), writes ``<out>.csv``
(step, phase, metric, sparsity) and ``<out>.png`` with the task's chance level and the
"learned" threshold drawn as dashed lines when the task has them.

    python benchmarks/nav_curve.py /work/runs/nav-dense-cpu --out docs/figures/navigation-cpu-dense
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from moduli_transform.tasks import get_task


def read_curve(run: Path) -> list[dict]:
    """The ``valid`` records of ``run/metrics.jsonl``, in step order."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sorted((r for r in records if r["kind"] == "valid"), key=lambda r: r["step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="path without suffix")
    args = parser.parse_args()
    config = json.loads((args.run / "config.json").read_text())
    task = get_task(config["run"]["task"])
    curve = read_curve(args.run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["step", "phase", task.metric_name, "sparsity"])
        writer.writerows([r["step"], r["phase"], f"{r['metric']:.3f}", f"{r['sparsity']:.4f}"] for r in curve)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([r["step"] for r in curve], [r["metric"] for r in curve], label="validation")
    for value, label in ((getattr(task, "chance_level", None), "chance"),
                         (getattr(task, "learned_threshold", None), "learned below")):
        if value is not None:
            axes.axhline(value, linestyle="--", linewidth=1, color="grey")
            axes.annotate(f"{label} {value:.0f}", (0, value), textcoords="offset points", xytext=(4, 3), fontsize=8)
    summary = config["run"]
    axes.set(xlabel="step", ylabel=task.metric_name, ylim=(0, None),
             title=f"{summary['task']}, preset {summary['preset']}: {summary['regularizer']}, "
                   f"sparsity {summary['sparsity']:g}, seed {summary['seed']}")
    figure.tight_layout()
    figure.savefig(args.out.with_suffix(".png"), dpi=120)
    print(f"written: {args.out.with_suffix('.csv')}, {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
