"""Magnitude sparsifier and schedules."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from moduli_transform.pruning import MagnitudeSparsifier
from moduli_transform.schedules import get_schedule


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 20), cols=st.integers(1, 20), sparsity=st.floats(0, 0.99), seed=st.integers(0, 1000))
def test_per_tensor_pruning_is_exact(rows, cols, sparsity, seed):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(rows, cols, dtype=torch.bool)
    MagnitudeSparsifier().update_masks({"w": weight}, {"w": mask}, sparsity)
    assert int((~mask).sum()) == round(sparsity * rows * cols)
    if (~mask).any() and mask.any():
        assert weight[~mask].abs().max() <= weight[mask].abs().min()


def test_exact_even_with_ties():
    weight = torch.ones(10, 10)
    mask = torch.ones(10, 10, dtype=torch.bool)
    MagnitudeSparsifier().update_masks({"w": weight}, {"w": mask}, 0.37)
    assert int((~mask).sum()) == 37


def test_global_scope_counts_over_all_blocks():
    small = torch.full((4, 4), 0.01)
    large = torch.full((4, 4), 5.0)
    masks = {"a": torch.ones(4, 4, dtype=torch.bool), "b": torch.ones(4, 4, dtype=torch.bool)}
    MagnitudeSparsifier("global").update_masks({"a": small, "b": large}, masks, 0.5)
    assert int((~masks["a"]).sum()) == 16 and bool(masks["b"].all())


def test_pruned_weights_are_never_revived():
    weight = torch.arange(1.0, 17.0).view(4, 4)
    mask = torch.ones(4, 4, dtype=torch.bool)
    sparsifier = MagnitudeSparsifier()
    sparsifier.update_masks({"w": weight}, {"w": mask}, 0.25)
    pruned = ~mask.clone()
    weight[pruned] = 100.0  # a pruned weight that grew back must stay pruned
    sparsifier.update_masks({"w": weight}, {"w": mask}, 0.5)
    assert bool((~mask)[pruned].all()) and int((~mask).sum()) == 8


def test_unknown_scope_is_refused():
    with pytest.raises(ValueError, match="unknown scope 'layer'.*global"):
        MagnitudeSparsifier("layer")


def test_schedules():
    linear = get_schedule("linear", 0.9, 10)
    assert [linear(k) for k in (0, 9, 20)] == [0.0, pytest.approx(0.9), pytest.approx(0.9)]
    assert linear(3) == pytest.approx(0.9 * 3 / 9)
    cubic = get_schedule("cubic", 0.8, 4)
    assert cubic(0) == 0.0 and cubic(4) == pytest.approx(0.8)
    assert cubic(2) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    oneshot = get_schedule("oneshot", 0.5, 3)
    assert [oneshot(k) for k in range(5)] == [0.0, 0.0, 0.0, 0.5, 0.5]
    custom = get_schedule(lambda step: 0.1 * step, 0.9, 3)
    assert custom(2) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="unknown schedule 'cosine'; expected one of cubic, linear, oneshot"):
        get_schedule("cosine", 0.9, 3)
