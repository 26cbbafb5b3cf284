"""Manifolds: known distances, identifications, metric axioms, gradients, retraction, registry."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from moduli_transform.manifolds import (MANIFOLDS, Circle, Euclidean, KleinBottle, Manifold, ProductManifold,
                                        Sphere, Torus, UnknownNameError, get_manifold, register_manifold)

# Everything get_manifold accepts for the built-in manifolds, with the metric-axiom tests run on each.
SPECS = ["circle", "torus", "torus6", "sphere", "s3", "klein", "r3", {"name": "euclidean", "dim": 5},
         "circle*sphere", "torus*r3", "klein*circle"]
IDS = [s if isinstance(s, str) else "euclidean5" for s in SPECS]
FAST = settings(max_examples=25, deadline=None)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- known distances -------------------------------------------------------------------------

def test_torus_wraps_around():
    assert float(Torus(dim=1).distance(torch.tensor([[0.5]]), torch.tensor([[9.5]]))) == pytest.approx(1.0)
    torus = get_manifold("torus")
    assert float(torus.distance(torch.tensor([[0.5, 3.0]]), torch.tensor([[9.5, 3.0]]))) == pytest.approx(1.0)
    farthest = torus.distance(torch.tensor([[0.0, 0.0]]), torch.tensor([[5.0, 5.0]]))
    assert float(farthest) == pytest.approx(math.sqrt(50))


def test_circle_and_sphere_use_five_times_the_angle():
    circle, sphere = get_manifold("circle"), get_manifold("sphere")
    assert float(circle.distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))) == pytest.approx(5 * math.pi / 2)
    assert float(sphere.distance(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.0, 0.0, -1.0]]))) == pytest.approx(5 * math.pi)
    assert float(Circle(scale=1.0).distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, -1.0]]))) == pytest.approx(math.pi / 2)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sphere_distance_is_scaled_arccos(n):
    sphere = Sphere(n)
    a, b = (sphere.retract(sphere.sample(count, seeded(count)).double()) for count in (7, 5))
    expected = 5 * torch.arccos((a @ b.T).clamp(-1, 1))
    assert torch.allclose(sphere.distance(a, b), expected, atol=1e-6)  # arccos itself loses digits near 0


def test_euclidean_and_product_distances():
    assert float(Euclidean(3).distance(torch.tensor([[0.0, 0, 0]]), torch.tensor([[1.0, 2, 2]]))) == pytest.approx(3.0)
    product = get_manifold("circle*sphere")
    assert isinstance(product, ProductManifold) and product.dim == 5 and product.name == "circle*sphere"
    a, b = product.sample(2, seeded(0)).split(1)
    circle, sphere = Circle(), Sphere(2)
    expected = math.hypot(float(circle.distance(a[:, :2], b[:, :2])), float(sphere.distance(a[:, 2:], b[:, 2:])))
    assert float(product.distance(a, b)) == pytest.approx(expected, rel=1e-5)


@FAST
@given(seed=st.integers(0, 10_000), period=st.sampled_from([1.0, 10.0, 7.5]))
def test_torus_distance_is_the_nearest_periodic_image(seed, period):
    torus = Torus(dim=2, period=period)
    generator = seeded(seed)
    a = (torch.rand(4, 2, generator=generator, dtype=torch.float64) - 0.5) * 4 * period
    b = (torch.rand(3, 2, generator=generator, dtype=torch.float64) - 0.5) * 4 * period
    shifts = torch.tensor(list(itertools.product(range(-5, 6), repeat=2)), dtype=torch.float64) * period
    brute = (a[:, None, None, :] - b[None, :, None, :] - shifts).norm(dim=-1).min(-1).values
    assert torch.allclose(torus.distance(a, b), brute, atol=1e-9)


# -- Klein bottle ----------------------------------------------------------------------------

def glide(points: torch.Tensor, steps: int = 1, period: float = 10.0) -> torch.Tensor:
    """The image of points under (x, y) -> (x + L, L - y) applied ``steps`` times (negative: inverse)."""
    for _ in range(abs(steps)):
        points = torch.stack([points[:, 0] + math.copysign(period, steps), period - points[:, 1]], dim=1)
    return points


def test_klein_glide_image_is_at_distance_zero_and_crossing_the_seam_flips_y():
    klein = KleinBottle()
    points = torch.tensor([[1.0, 2.0], [3.5, 9.0], [7.0, 0.5]])
    assert torch.allclose(klein.distance(points, glide(points)).diagonal(), torch.zeros(3), atol=1e-5)
    shifted = points + torch.tensor([0.0, 10.0])
    assert torch.allclose(klein.distance(points, shifted).diagonal(), torch.zeros(3), atol=1e-5)
    # (9.5, 2) is next to (0.5, 8) across the x seam, not to (0.5, 2); the y seam does not flip.
    assert float(klein.distance(torch.tensor([[9.5, 2.0]]), torch.tensor([[0.5, 8.0]]))) == pytest.approx(1.0)
    assert float(klein.distance(torch.tensor([[9.5, 2.0]]), torch.tensor([[0.5, 2.0]]))) > 1.0
    assert float(klein.distance(torch.tensor([[5.0, 9.5]]), torch.tensor([[5.0, 0.5]]))) == pytest.approx(1.0)


@FAST
@given(seed=st.integers(0, 10_000))
def test_klein_distance_is_the_nearest_image_and_symmetric(seed):
    klein = KleinBottle()
    generator = seeded(seed)
    a = (torch.rand(4, 2, generator=generator, dtype=torch.float64) - 0.5) * 40
    b = (torch.rand(3, 2, generator=generator, dtype=torch.float64) - 0.5) * 40
    images = []
    for k, l in itertools.product(range(-7, 8), repeat=2):
        y = 10.0 - b[:, 1] if k % 2 else b[:, 1]
        images.append(torch.stack([b[:, 0] + 10.0 * k, y + 10.0 * l], dim=1))
    brute = torch.stack([(a[:, None, :] - image[None, :, :]).norm(dim=-1) for image in images]).min(0).values
    assert torch.allclose(klein.distance(a, b), brute, atol=1e-9)
    assert torch.allclose(klein.distance(a, b), klein.distance(b, a).T, atol=1e-12)


@FAST
@given(seed=st.integers(0, 10_000), turns=st.integers(-5, 5), lifts=st.integers(-5, 5))
def test_klein_retraction_sends_every_image_to_one_representative(seed, turns, lifts):
    klein = KleinBottle()
    points = klein.sample(5, seeded(seed)).double()
    image = glide(points, turns) + torch.tensor([0.0, 10.0 * lifts], dtype=torch.float64)
    retracted = klein.retract(image)
    assert bool(((retracted >= 0) & (retracted < 10)).all())
    torch.testing.assert_close(retracted, points, atol=1e-9, rtol=0)
    others = klein.sample(4, seeded(seed + 1)).double()
    torch.testing.assert_close(klein.distance(retracted, others), klein.distance(image, others), atol=1e-9, rtol=0)


def test_klein_retraction_convention():
    klein = KleinBottle()
    moved = torch.tensor([[12.0, 3.0], [-1.0, 3.0], [22.0, 3.0], [5.0, 13.0], [5.0, -3.0]])
    expected = torch.tensor([[2.0, 7.0], [9.0, 7.0], [2.0, 3.0], [5.0, 3.0], [5.0, 7.0]])
    assert torch.allclose(klein.retract(moved), expected)


# -- metric axioms -----------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_symmetric_zero_diagonal_non_negative(spec):
    manifold = get_manifold(spec)
    points = manifold.sample(20, seeded(0))
    distance = manifold.distance(points, points)
    assert distance.shape == (20, 20)
    assert torch.allclose(distance, distance.T, atol=1e-5)
    assert torch.equal(distance.diagonal(), torch.zeros(20))
    assert bool((distance >= 0).all())


@settings(max_examples=40, deadline=None)
@given(index=st.integers(0, len(SPECS) - 1), seed=st.integers(0, 10_000))
def test_triangle_inequality(index, seed):
    manifold = get_manifold(SPECS[index])
    points = manifold.sample(3, seeded(seed)).double()
    d = manifold.distance(points, points)
    assert float(d[0, 2]) <= float(d[0, 1] + d[1, 2]) + 1e-9


# -- gradients ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_distance_gradient_matches_finite_differences(spec):
    # Two separate seeded sets: no coincident points, and (for these seeds) none near a cut locus.
    manifold = get_manifold(spec)
    a = manifold.sample(4, seeded(1)).double().requires_grad_(True)
    b = manifold.sample(3, seeded(2)).double()
    assert torch.autograd.gradcheck(lambda x: manifold.distance(x, b), (a,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_no_nan_gradient_through_a_full_matrix_with_zero_diagonal(spec):
    manifold = get_manifold(spec)
    points = manifold.sample(6, seeded(2)).requires_grad_(True)
    manifold.distance(points, points).sum().backward()
    assert bool(torch.isfinite(points.grad).all())
    # The diagonal itself contributes gradient 0.
    fresh = points.detach().clone().requires_grad_(True)
    manifold.distance(fresh, fresh).diagonal().sum().backward()
    assert torch.equal(fresh.grad, torch.zeros_like(fresh))


def test_gradient_is_finite_at_antipodal_points_and_on_the_torus_cut_locus():
    sphere = Sphere(2)
    a = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]], requires_grad=True)
    sphere.distance(a, a).sum().backward()
    assert bool(torch.isfinite(a.grad).all())
    torus = Torus(dim=2)
    x = torch.tensor([[0.0, 0.0], [5.0, 5.0]], requires_grad=True)
    torus.distance(x, x).sum().backward()
    assert bool(torch.isfinite(x.grad).all())


# -- sampling and retraction ---------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_sampling_is_seeded_in_range_and_fixed_by_retraction(spec):
    manifold = get_manifold(spec)
    a, b = manifold.sample(50, seeded(7)), manifold.sample(50, seeded(7))
    assert torch.equal(a, b) and a.shape == (50, manifold.dim)
    assert not torch.equal(a, manifold.sample(50, seeded(8)))
    assert torch.allclose(manifold.retract(a), a, atol=1e-6)
    assert manifold.sample(0).shape == (0, manifold.dim)


@pytest.mark.parametrize("manifold, low, high", [(Torus(3), 0, 10), (KleinBottle(), 0, 10),
                                                 (Euclidean(4, side=2.0), 0, 2), (Torus(2, period=3.0), 0, 3)])
def test_box_samples_lie_in_the_box(manifold, low, high):
    points = manifold.sample(500, seeded(0))
    assert bool(((points >= low) & (points < high)).all())


@pytest.mark.parametrize("manifold", [Circle(), Sphere(2), Sphere(3)], ids=["circle", "sphere", "s3"])
def test_sphere_samples_are_unit_and_roughly_uniform(manifold):
    points = manifold.sample(4000, seeded(0))
    assert torch.allclose(points.norm(dim=1), torch.ones(4000), atol=1e-5)
    assert points.mean(0).abs().max() < 0.05
    # Uniform on S^n: every coordinate has second moment 1 / (n + 1).
    assert torch.allclose((points ** 2).mean(0), torch.full((manifold.dim,), 1 / manifold.dim), atol=0.03)


@FAST
@given(seed=st.integers(0, 10_000), shift=st.tuples(st.integers(-4, 4), st.integers(-4, 4)))
def test_torus_retraction_lands_in_the_domain_and_keeps_distances(seed, shift):
    torus = Torus(dim=2)
    points = torus.sample(10, seeded(seed)).double()
    noise = torch.randn(10, 2, generator=seeded(seed + 1), dtype=torch.float64)
    moved = points + noise + torch.tensor(shift, dtype=torch.float64) * 10
    retracted = torus.retract(moved)
    assert bool(((retracted >= 0) & (retracted < 10)).all())
    torch.testing.assert_close(torus.distance(retracted, points), torus.distance(moved, points), atol=1e-9, rtol=0)


def test_retraction_edge_cases():
    # remainder(-1e-9, 10) rounds to 10.0 in float32; the domain is half open.
    tiny = torch.tensor([[-1e-9, -1e-9]])
    for manifold in (Torus(2), KleinBottle()):
        assert bool(((manifold.retract(tiny) >= 0) & (manifold.retract(tiny) < 10)).all())
    sphere = get_manifold("s3")
    assert torch.allclose(sphere.retract(torch.randn(5, 4, generator=seeded(0)) * 3).norm(dim=1), torch.ones(5))
    x = torch.randn(3, 4, generator=seeded(1))
    assert torch.equal(Euclidean(4).retract(x), x)
    product = get_manifold("circle*torus")
    retracted = product.retract(torch.tensor([[3.0, 4.0, 12.0, -1.0]]))
    assert torch.allclose(retracted, torch.tensor([[0.6, 0.8, 2.0, 9.0]]))


# -- registry, specs, errors -----------------------------------------------------------------

def test_registered_names_and_dimensions():
    assert sorted(MANIFOLDS) == ["circle", "euclidean", "klein", "r3", "s3", "sphere", "torus", "torus6"]
    dims = {"circle": 2, "torus": 2, "torus6": 6, "sphere": 3, "s3": 4, "klein": 2, "r3": 3}
    assert {name: get_manifold(name).dim for name in dims} == dims
    assert get_manifold("euclidean", dim=5).dim == 5
    assert get_manifold("torus", dim=4, period=2.0).spec == {"name": "torus", "dim": 4, "period": 2.0}


@pytest.mark.parametrize("spec", SPECS + [{"name": "torus", "dim": 3, "period": 4.0}, {"name": "sphere", "n": 4}],
                         ids=IDS + ["torus3", "s4"])
def test_spec_round_trips_through_json(spec):
    manifold = get_manifold(spec)
    rebuilt = get_manifold(**json.loads(json.dumps(manifold.spec)))
    assert rebuilt.spec == manifold.spec and type(rebuilt) is type(manifold)
    assert repr(rebuilt) == repr(manifold)
    points = manifold.sample(5, seeded(0))
    assert torch.allclose(rebuilt.distance(points, points), manifold.distance(points, points))


def test_product_of_non_default_factors_round_trips():
    product = ProductManifold([Torus(3, period=2.0), Circle(scale=1.0)])
    assert product.dim == 5
    assert get_manifold(product.spec).spec == product.spec
    assert repr(product).startswith("ProductManifold(factors=[")


def test_unknown_names_are_named_with_the_valid_choices():
    with pytest.raises(UnknownNameError, match=(
            r"unknown manifold 'toruss'; expected one of circle, euclidean, klein, r3, s3, sphere, torus, torus6, "
            r"or a product such as 'circle\*sphere', or a Manifold instance \(did you mean 'torus'\?\)")):
        get_manifold("toruss")
    with pytest.raises(UnknownNameError, match="'sphre'"):
        get_manifold("circle*sphre")
    assert issubclass(UnknownNameError, ValueError)


@pytest.mark.parametrize("call, message", [
    (lambda: get_manifold("euclidean", dim=0), "dim=0"),
    (lambda: get_manifold("euclidean"), "needs dim="),
    (lambda: get_manifold("torus", dim=2.5), "dim=2.5"),
    (lambda: get_manifold("torus", period=-1.0), "period=-1.0"),
    (lambda: get_manifold("klein", period=float("nan")), "period=nan"),
    (lambda: get_manifold("sphere", scale=0), "scale=0"),
    (lambda: get_manifold("circle", radius=2), "bad options .*radius"),
    (lambda: get_manifold("circle*sphere", scale=2), "cannot apply to the product"),
    (lambda: get_manifold(Torus(), dim=3), "instance"),
    (lambda: get_manifold(3), "got 3"),
    (lambda: ProductManifold([Torus()]), "at least two factors"),
    (lambda: Torus().sample(-1), "n=-1"),
    (lambda: Torus().distance(torch.zeros(2, 3), torch.zeros(2, 2)), r"\(n, 2\), got \(2, 3\)"),
    (lambda: register_manifold("a*b"), "'a\\*b'"),
])
def test_bad_options_raise_value_errors_naming_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


class Line(Manifold):
    """A user's manifold: the real line."""

    name, dim = "line", 1

    def sample(self, n, generator=None):
        return torch.rand(n, 1, generator=generator)

    def distance(self, a, b):
        return (a - b.T).abs()

    def retract(self, x):
        return x


def test_custom_manifold_subclass_is_accepted_and_composes():
    line = Line()
    assert get_manifold(line) is line
    product = ProductManifold([line, "circle"])
    assert product.name == "line*circle" and product.dim == 3
    points = product.sample(4, seeded(0))
    assert product.distance(points, points).shape == (4, 4)
    assert repr(line) == "Line()"


def test_register_manifold_adds_a_name():
    @register_manifold("ring")
    def ring(scale: float = 2.0) -> Circle:
        return Circle(scale=scale)

    try:
        assert get_manifold("ring").scale == 2.0
        assert get_manifold("ring*torus").dim == 4
    finally:
        del MANIFOLDS["ring"]
