"""Figures (PNG, matplotlib): metric vs sparsity, weights on the manifold, persistence.

* :func:`plot_metric_vs_sparsity`: one line per regularizer, error bars = std over seeds;
* :func:`plot_incoming_weights`: one neuron's incoming recurrent weights drawn at the
  other neurons' embedding coordinates (paper fig. 7);
* :func:`persistence_diagram` / :func:`plot_persistence`: H0/H1 persistence of trained
  embeddings from the manifold's own distance matrix (paper appendix H; ripser).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy
import torch
from torch import Tensor

__all__ = ["plot_metric_vs_sparsity", "plot_incoming_weights", "persistence_diagram", "plot_persistence",
           "save_incoming_weights_figure"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric_vs_sparsity(rows: Sequence[dict[str, Any]], path: str | Path, metric_name: str = "metric") -> Path:
    """``rows``: dicts with ``variant``, ``sparsity``, ``mean``, ``std`` (one per point)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    for variant in sorted({r["variant"] for r in rows}):
        points = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["sparsity"])
        axes.errorbar([100 * p["sparsity"] for p in points], [p["mean"] for p in points],
                      yerr=[p["std"] for p in points], marker="o", capsize=3, label=variant)
    axes.set_xlabel("sparsity (%)")
    axes.set_ylabel(metric_name)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def _planar_coordinates(embedding: Tensor) -> tuple[numpy.ndarray, numpy.ndarray, str, str]:
    """2-D drawing coordinates: torus/R^n first two axes, circle angle, sphere lon/lat."""
    points = embedding.detach().double()
    if points.shape[1] == 2 and torch.allclose(points.norm(dim=1), torch.ones(len(points), dtype=points.dtype), atol=1e-4):
        angle = torch.atan2(points[:, 1], points[:, 0])
        return angle.numpy(), numpy.zeros(len(points)), "angle", ""
    if points.shape[1] == 3 and torch.allclose(points.norm(dim=1), torch.ones(len(points), dtype=points.dtype), atol=1e-4):
        longitude = torch.atan2(points[:, 1], points[:, 0])
        latitude = torch.asin(points[:, 2].clamp(-1, 1))
        return longitude.numpy(), latitude.numpy(), "longitude", "latitude"
    if points.shape[1] == 1:
        return points[:, 0].numpy(), numpy.zeros(len(points)), "x", ""
    return points[:, 0].numpy(), points[:, 1].numpy(), "x1", "x2"


def plot_incoming_weights(axes: Any, weight: Tensor, embedding: Tensor, neuron: int) -> None:
    """Draw ``weight[neuron, :]`` (one gate block) at the input neurons' coordinates."""
    hidden = embedding.shape[0]
    row = weight[neuron % weight.shape[0], :hidden].detach().float()
    x, y, xlabel, ylabel = _planar_coordinates(embedding)
    limit = float(row.abs().max()) or 1.0
    scatter = axes.scatter(x, y, c=row.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, s=14,
                           edgecolors=numpy.where(row.numpy() == 0, "lightgrey", "none"), linewidths=0.4)
    axes.scatter([x[neuron % hidden]], [y[neuron % hidden]], marker="*", s=160, c="black", label=f"neuron {neuron}")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    nonzero = int((row != 0).sum())
    axes.set_title(f"incoming weights of neuron {neuron} ({nonzero}/{hidden} kept)")
    axes.legend(loc="upper right", fontsize=8)
    axes.figure.colorbar(scatter, ax=axes, shrink=0.8)


def save_incoming_weights_figure(weight: Tensor, embedding: Tensor, neuron: int, path: str | Path) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.5, 4.5))
    plot_incoming_weights(axes, weight, embedding, neuron)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def persistence_diagram(distances: Tensor, max_dimension: int = 1) -> list[numpy.ndarray]:
    """Vietoris-Rips persistence (ripser) of a distance matrix: one (k, 2) array per dimension.

    Example:
        >>> angles = torch.linspace(0, 2 * math.pi, 13)[:-1]
        >>> circle = torch.stack([angles.cos(), angles.sin()], 1)
        >>> h0, h1 = persistence_diagram(torch.cdist(circle, circle))
        >>> len(h1), bool(h1[0, 1] - h1[0, 0] > 1.0)
        (1, True)
    """
    from ripser import ripser

    matrix = distances.detach().double().numpy()
    return ripser(matrix, distance_matrix=True, maxdim=max_dimension)["dgms"]


def plot_persistence(diagrams: list[numpy.ndarray], path: str | Path, title: str = "") -> Path:
    """Birth/death scatter per homology dimension; infinite bars drawn on the top edge."""
    plt = _pyplot()
    finite = [d[numpy.isfinite(d[:, 1])] for d in diagrams]
    top = max((float(d[:, 1].max()) for d in finite if len(d)), default=1.0) * 1.1
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    for dimension, diagram in enumerate(diagrams):
        deaths = numpy.where(numpy.isfinite(diagram[:, 1]), diagram[:, 1], top)
        axes.scatter(diagram[:, 0], deaths, s=14, label=f"H{dimension} ({len(diagram)})")
    axes.plot([0, top], [0, top], color="grey", linewidth=0.8)
    axes.set_xlabel("birth")
    axes.set_ylabel("death")
    axes.set_title(title or "persistence diagram")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)
