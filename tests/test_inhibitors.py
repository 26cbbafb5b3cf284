"""Inhibitor functions: paper defaults, inversion, callables, registry errors."""

from __future__ import annotations

import math

import pytest
import torch

from moduli_transform.inhibitors import INHIBITORS, get_inhibitor
from moduli_transform.manifolds import UnknownNameError

D = torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0])


def test_difference_of_gaussians_paper_default_is_inverted():
    raw = 100 * (torch.exp(-D ** 2 / 5) - torch.exp(-4 * D ** 2))
    assert torch.allclose(get_inhibitor("dog", invert=False)(D), raw)
    assert torch.allclose(get_inhibitor("dog")(D), raw.max() - raw)


def test_diffusion_and_sinusoid_paper_defaults():
    assert torch.allclose(get_inhibitor("diffusion")(D), D ** 2)
    assert torch.allclose(get_inhibitor("sinusoid")(D), 50 + 50 * torch.cos(2 * D))


def test_ricker_gaussian_identity_constant():
    ricker = get_inhibitor("ricker", invert=False, sigma=1.0, amplitude=1.0)
    assert torch.allclose(ricker(D), (1 - D ** 2) * torch.exp(-D ** 2 / 2))
    gaussian = get_inhibitor("gaussian", invert=False, sigma=1.0, amplitude=2.0)
    assert torch.allclose(gaussian(D), 2 * torch.exp(-D ** 2 / 2))
    assert torch.equal(get_inhibitor("identity")(D), D)
    assert torch.equal(get_inhibitor("constant", value=3.0)(D), torch.full_like(D, 3.0))


def test_invert_subtracts_from_the_maximum():
    f = get_inhibitor("identity", invert=True)
    assert torch.equal(f(D), D.max() - D)


def test_any_callable_is_an_inhibitor():
    f = get_inhibitor(lambda d: d ** 3)
    assert torch.equal(f(D), D ** 3)
    assert get_inhibitor(math.exp.__class__ and torch.sqrt)(torch.tensor([4.0])).item() == 2.0


def test_inhibitors_are_differentiable():
    for name in INHIBITORS:
        d = torch.tensor([0.3, 1.2, 2.5], dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(get_inhibitor(name), (d,)), name


def test_spec_round_trip_and_unknown_names():
    for name in INHIBITORS:
        f = get_inhibitor(name)
        assert get_inhibitor(f.spec).spec == f.spec
    with pytest.raises(UnknownNameError, match="unknown inhibitor 'dogg'; expected one of constant, diffusion, dog"):
        get_inhibitor("dogg")
    with pytest.raises(ValueError, match="bad parameters"):
        get_inhibitor("dog", width=3)
