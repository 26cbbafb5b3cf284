"""Figures are written as PNGs of the expected size, with the data they are given."""

from __future__ import annotations

import torch
from PIL import Image

from moduli_transform.tasks.figures import plot_metric_vs_sparsity, plot_persistence, save_incoming_weights_figure, persistence_diagram


def test_incoming_weights_figure_for_torus_circle_and_sphere(tmp_path):
    weight = torch.randn(16, 16)
    weight[3, ::2] = 0
    for name, embedding in {
        "torus": torch.rand(16, 2) * 10,
        "circle": torch.nn.functional.normalize(torch.randn(16, 2), dim=1),
        "sphere": torch.nn.functional.normalize(torch.randn(16, 3), dim=1),
    }.items():
        path = save_incoming_weights_figure(weight, embedding, 3, tmp_path / f"{name}.png")
        assert Image.open(path).size == (605, 495)


def test_metric_vs_sparsity_and_persistence_plots(tmp_path):
    rows = [{"variant": v, "sparsity": s, "mean": 1 - s, "std": 0.01} for v in ("moduli", "l1") for s in (0.9, 0.99)]
    assert Image.open(plot_metric_vs_sparsity(rows, tmp_path / "m.png", "rmse")).size == (660, 440)
    points = torch.rand(30, 2)
    diagrams = persistence_diagram(torch.cdist(points, points))
    assert Image.open(plot_persistence(diagrams, tmp_path / "p.png")).size == (495, 495)
