"""Manifolds: known distances, identifications, metric axioms, gradients, retraction."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from moduli_transform.manifolds import (Euclidean, KleinBottle, Manifold, ProductManifold, Torus,
                                        UnknownNameError, get_manifold)

NAMES = ["circle", "torus", "torus6", "sphere", "s3", "klein", "r3", "circle*sphere", "torus*r3"]


def test_torus_wraps_around():
    torus = get_manifold("torus")
    a, b = torch.tensor([[0.5, 3.0]]), torch.tensor([[9.5, 3.0]])
    assert float(torus.distance(a, b)) == pytest.approx(1.0)
    assert float(torus.distance(torch.tensor([[0.0, 0.0]]), torch.tensor([[5.0, 5.0]]))) == pytest.approx(math.sqrt(50))


def test_circle_and_sphere_use_five_times_the_angle():
    circle, sphere = get_manifold("circle"), get_manifold("sphere")
    assert float(circle.distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))) == pytest.approx(5 * math.pi / 2)
    assert float(sphere.distance(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.0, 0.0, -1.0]]))) == pytest.approx(5 * math.pi)


def test_klein_glide_image_is_at_distance_zero():
    klein = KleinBottle()
    points = torch.tensor([[1.0, 2.0], [3.5, 9.0], [7.0, 0.5]])
    glide = torch.stack([points[:, 0] + 10.0, 10.0 - points[:, 1]], dim=1)
    assert torch.allclose(klein.distance(points, glide).diagonal(), torch.zeros(3), atol=1e-5)
    # Crossing the x seam flips y: (9.5, 2) is next to (0.5, 8), not to (0.5, 2).
    assert float(klein.distance(torch.tensor([[9.5, 2.0]]), torch.tensor([[0.5, 8.0]]))) == pytest.approx(1.0)
    assert float(klein.distance(torch.tensor([[5.0, 9.5]]), torch.tensor([[5.0, 0.5]]))) == pytest.approx(1.0)


@pytest.mark.parametrize("name", NAMES)
def test_symmetric_zero_diagonal_non_negative(name):
    manifold = get_manifold(name)
    points = manifold.sample(20, torch.Generator().manual_seed(0))
    distance = manifold.distance(points, points)
    assert distance.shape == (20, 20)
    assert torch.allclose(distance, distance.T, atol=1e-5)
    assert torch.allclose(distance.diagonal(), torch.zeros(20), atol=2e-3)
    assert bool((distance >= 0).all())


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(NAMES), seed=st.integers(0, 10_000))
def test_triangle_inequality(name, seed):
    manifold = get_manifold(name)
    points = manifold.sample(3, torch.Generator().manual_seed(seed)).double()
    d = manifold.distance(points, points)
    assert float(d[0, 2]) <= float(d[0, 1] + d[1, 2]) + 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_distance_gradient_matches_finite_differences(name):
    manifold = get_manifold(name)
    generator = torch.Generator().manual_seed(1)
    a = manifold.sample(4, generator).double().requires_grad_(True)
    b = manifold.sample(3, generator).double()
    assert torch.autograd.gradcheck(lambda x: manifold.distance(x, b), (a,), eps=1e-6, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_no_nan_gradient_through_a_full_matrix_with_zero_diagonal(name):
    manifold = get_manifold(name)
    points = manifold.sample(6, torch.Generator().manual_seed(2)).requires_grad_(True)
    manifold.distance(points, points).sum().backward()
    assert bool(torch.isfinite(points.grad).all())


@pytest.mark.parametrize("name", NAMES)
def test_sampling_is_seeded_and_retraction_is_idempotent(name):
    manifold = get_manifold(name)
    a = manifold.sample(50, torch.Generator().manual_seed(7))
    b = manifold.sample(50, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (50, manifold.dim)
    assert torch.allclose(manifold.retract(a), a, atol=1e-6)


def test_retraction_lands_on_the_manifold_and_keeps_torus_distances():
    torus = get_manifold("torus")
    points = torus.sample(10, torch.Generator().manual_seed(0))
    moved = points + torch.tensor([23.0, -17.0])
    assert bool(((torus.retract(moved) >= 0) & (torus.retract(moved) < 10)).all())
    assert torch.allclose(torus.distance(torus.retract(moved), points), torus.distance(moved, points), atol=1e-4)
    sphere = get_manifold("s3")
    assert torch.allclose(sphere.retract(torch.randn(5, 4) * 3).norm(dim=1), torch.ones(5))
    klein = KleinBottle()
    p = torch.tensor([[12.0, 3.0]])
    assert torch.allclose(klein.retract(p), torch.tensor([[2.0, 7.0]]))


def test_sphere_samples_are_roughly_uniform():
    points = get_manifold("sphere").sample(4000, torch.Generator().manual_seed(0))
    assert points.mean(0).abs().max() < 0.05


def test_products_and_euclidean_dimension():
    product = get_manifold("circle*sphere")
    assert isinstance(product, ProductManifold) and product.dim == 5
    a, b = product.sample(2, torch.Generator().manual_seed(0)).split(1)
    circle, sphere = get_manifold("circle"), get_manifold("sphere")
    expected = math.sqrt(float(circle.distance(a[:, :2], b[:, :2])) ** 2 + float(sphere.distance(a[:, 2:], b[:, 2:])) ** 2)
    assert float(product.distance(a, b)) == pytest.approx(expected, rel=1e-5)
    assert get_manifold("euclidean", dim=5).dim == 5
    assert get_manifold("torus6").dim == 6


def test_unknown_names_and_bad_options_are_named():
    with pytest.raises(UnknownNameError, match="unknown manifold 'toruss'; expected one of circle, euclidean, klein"):
        get_manifold("toruss")
    with pytest.raises(UnknownNameError, match="'sphre'"):
        get_manifold("circle*sphre")
    with pytest.raises(ValueError, match="dim=0"):
        get_manifold("euclidean", dim=0)


def test_custom_manifold_subclass_is_accepted_and_spec_round_trips():
    class Line(Manifold):
        name, dim = "line", 1

        def sample(self, n, generator=None):
            return torch.rand(n, 1, generator=generator)

        def distance(self, a, b):
            return (a - b.T).abs()

        def retract(self, x):
            return x

    line = Line()
    assert get_manifold(line) is line
    for name in NAMES:
        manifold = get_manifold(name)
        assert get_manifold(manifold.spec).spec == manifold.spec
    assert isinstance(get_manifold({"name": "torus", "dim": 3}), Torus)
    assert isinstance(get_manifold("r3"), Euclidean)
