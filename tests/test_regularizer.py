"""ModuliRegularizer: penalty against a brute-force loop, gradients, gates, controls."""

from __future__ import annotations

import math

import pytest
import torch

from moduli_transform.inhibitors import get_inhibitor
from moduli_transform.manifolds import get_manifold
from moduli_transform.regularizer import ModuliRegularizer
from moduli_transform.targets import Target


def make(target: Target, manifold: str = "torus", inhibitor: str = "dog", **options) -> ModuliRegularizer:
    return ModuliRegularizer(target, get_manifold(manifold), get_inhibitor(inhibitor),
                             generator=torch.Generator().manual_seed(3), **options)


def brute_force(reg: ModuliRegularizer, weight: torch.Tensor) -> float:
    t = reg.target
    manifold, inhibitor = reg.manifold, reg.inhibitor
    rows, cols = reg.row_embedding, reg.col_embedding
    block = t.block(weight)
    total, count = 0.0, 0
    distances = manifold.distance(rows, cols)
    coefficients = inhibitor(distances)  # inversion (max - f) is defined over the matrix
    for g in range(t.gates):
        for i in range(t.out_features):
            for j in range(t.in_features):
                w = block[g * t.out_features + i, j]
                magnitude = float(w.norm()) if t.kind == "conv" else abs(float(w))
                total += float(coefficients[i, j]) * magnitude ** reg.power
                count += 1
    if reg.reduction == "mean":
        total /= count
    return reg.strength * total


CASES = [
    dict(target=Target("w", (6, 6)), manifold="torus", inhibitor="dog"),
    dict(target=Target("w", (12, 4), gates=3), manifold="circle", inhibitor="diffusion"),
    dict(target=Target("w", (5, 7), kind="linear"), manifold="sphere", inhibitor="ricker", reduction="sum"),
    dict(target=Target("w", (6, 10), cols=slice(4, 10)), manifold="klein", inhibitor="sinusoid", power=2),
    dict(target=Target("w", (4, 3, 3, 3), kind="conv"), manifold="r3", inhibitor="gaussian"),
    dict(target=Target("w", (8, 8)), manifold="torus6", inhibitor="dog", share_embedding=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['manifold']}-{c['inhibitor']}")
def test_penalty_equals_brute_force_double_loop(case):
    case = dict(case)
    target = case.pop("target")
    reg = make(target, strength=0.3, **case)
    weight = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    assert float(reg.penalty(weight)) == pytest.approx(brute_force(reg, weight), rel=1e-5)


def test_gradient_wrt_weight_matches_finite_differences():
    reg = make(Target("w", (9, 3), gates=3), strength=0.7, power=2)
    weight = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reg.penalty, (weight,))


@pytest.mark.parametrize("manifold", ["torus", "circle", "sphere", "r3"])
def test_gradient_wrt_embeddings_matches_finite_differences(manifold):
    # Separate row/column points: no zero distances, where arccos and sqrt have no derivative.
    reg = make(Target("w", (5, 5)), manifold=manifold, trained=True, strength=1.0, share_embedding=False)
    reg.col_points = reg.col_points.detach().double()
    points = reg.row_points.detach().double().requires_grad_(True)
    weight = torch.randn(5, 5, dtype=torch.float64)

    def penalty_of(points):
        reg.row_points = points
        reg.invalidate()
        return reg.penalty(weight)

    assert torch.autograd.gradcheck(penalty_of, (points,), eps=1e-6, atol=1e-4)


def test_gates_tile_one_coefficient_matrix():
    single = make(Target("w", (4, 4)), reduction="sum")
    gated = make(Target("w", (16, 4), gates=4), reduction="sum")
    weight = torch.randn(16, 4)
    per_gate = sum(float(single.penalty(weight[4 * g:4 * (g + 1)])) for g in range(4))
    assert float(gated.penalty(weight)) == pytest.approx(per_gate, rel=1e-5)
    assert gated.coefficients().shape == (4, 4)


def test_shuffled_control_permutes_the_same_multiset():
    moduli = make(Target("w", (10, 10)))
    shuffled = make(Target("w", (10, 10)), control="shuffled")
    a, b = moduli.coefficients().flatten(), shuffled.coefficients().flatten()
    assert torch.equal(a.sort().values, b.sort().values)
    assert not torch.equal(a, b)
    again = make(Target("w", (10, 10)), control="shuffled")
    assert torch.equal(again.coefficients(), shuffled.coefficients())


def test_l1_control_matches_mean_moduli_strength():
    moduli = make(Target("w", (10, 10)))
    l1 = make(Target("w", (10, 10)), control="l1")
    assert torch.allclose(l1.coefficients(), torch.full((10, 10), float(moduli.coefficients().mean())))
    plain = make(Target("w", (10, 10)), control="l1", l1_coefficient="one")
    assert torch.equal(plain.coefficients(), torch.ones(10, 10))


def test_none_control_gives_zero_penalty():
    reg = make(Target("w", (6, 6)), control="none")
    assert float(reg.penalty(torch.randn(6, 6))) == 0.0


def test_fixed_embeddings_cache_one_matrix_and_trained_recompute():
    fixed = make(Target("w", (32, 32)))
    assert fixed.coefficients() is fixed.coefficients()
    assert fixed.coefficient_bytes() == 32 * 32 * 4
    trained = make(Target("w", (32, 32)), trained=True)
    assert trained.coefficients().requires_grad
    assert trained.coefficient_bytes() == 0


def test_square_targets_share_and_others_separate_embeddings():
    assert make(Target("w", (6, 6))).shared
    assert not make(Target("w", (6, 6)), share_embedding=False).shared
    rect = make(Target("w", (6, 4), kind="linear"))
    assert not rect.shared
    assert rect.row_embedding.shape[0] == 6 and rect.col_embedding.shape[0] == 4


def test_retract_puts_trained_embeddings_back_on_the_torus():
    reg = make(Target("w", (6, 6)), trained=True)
    with torch.no_grad():
        reg.row_points.add_(25.0)
    reg.retract()
    assert bool(((reg.row_points >= 0) & (reg.row_points < 10)).all())


def test_unknown_control_and_elementwise_target_are_refused():
    with pytest.raises(ValueError, match="unknown control 'l3'"):
        make(Target("w", (4, 4)), control="l3")
    with pytest.raises(ValueError, match="elementwise"):
        make(Target("u", (4,), kind="elementwise"))


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("move", ["meta", "double"])   # 'meta' stands in for CUDA
def test_trained_embeddings_stay_optimizable_leaves_after_a_move(share, move):
    reg = make(Target("w", (8, 8)), trained=True, share_embedding=share)
    moved = reg.to("meta") if move == "meta" else reg.double()
    for points in moved.embedding_tensors():
        assert points.is_leaf and points.requires_grad
        assert points.device.type == ("meta" if move == "meta" else "cpu")
    torch.optim.Adam(moved.embedding_tensors(), lr=0.1)   # raised "can't optimize a non-leaf Tensor"
    fixed = make(Target("w", (8, 8))).double()
    assert not any(points.requires_grad for points in fixed.embedding_tensors())
    assert fixed.coefficients().dtype == torch.float64
