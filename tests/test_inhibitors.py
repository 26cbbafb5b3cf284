"""Inhibitor functions: paper defaults, inversion, callables, registry, specs."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from moduli_transform.inhibitors import (INHIBITORS, CallableInhibitor, Constant, DifferenceOfGaussians, Inhibitor,
                                         Ricker, get_inhibitor, register_inhibitor)
from moduli_transform.manifolds import UnknownNameError

D = torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0, 7.0])

# name -> (raw f(d) with the default parameters, inverted by default?)
PAPER_DEFAULTS = {
    "dog": (lambda d: 100 * (torch.exp(-d ** 2 / 5) - torch.exp(-4 * d ** 2)), True),
    "ricker": (lambda d: 100 * (1 - d ** 2) * torch.exp(-d ** 2 / 2), True),
    "diffusion": (lambda d: d ** 2, False),
    "sinusoid": (lambda d: 50 + 50 * torch.cos(2 * d), False),
    "gaussian": (lambda d: 100 * torch.exp(-d ** 2 / 3), True),  # the authors' small_gauss
    "identity": (lambda d: d, False),
    "constant": (lambda d: torch.ones_like(d), False),
}


def test_every_registered_name_has_a_default_case():
    assert sorted(INHIBITORS) == sorted(PAPER_DEFAULTS)


@pytest.mark.parametrize("name", sorted(PAPER_DEFAULTS))
def test_defaults_raw_and_inverted(name):
    raw, inverted = PAPER_DEFAULTS[name]
    assert get_inhibitor(name).invert is inverted
    torch.testing.assert_close(get_inhibitor(name, invert=False)(D), raw(D))
    torch.testing.assert_close(get_inhibitor(name, invert=True)(D), raw(D).max() - raw(D))


def test_difference_of_gaussians_at_known_distances():
    dog = get_inhibitor("dog")
    f_max = float((100 * (torch.exp(-D ** 2 / 5) - torch.exp(-4 * D ** 2))).max())
    values = dog(D)
    assert float(values[0]) == pytest.approx(f_max - 0.0)  # raw f(0) = 100 (1 - 1) = 0
    assert float(get_inhibitor("dog", invert=False)(torch.tensor(1.0))) == pytest.approx(
        100 * (math.exp(-1 / 5) - math.exp(-4)))
    assert bool((values >= 0).all())


def test_invert_uses_the_maximum_over_the_whole_given_tensor():
    distances = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    f = get_inhibitor("identity", invert=True)
    assert torch.equal(f(distances), 3.0 - distances)
    assert torch.equal(f(distances[0]), 1.0 - distances[0])  # the maximum is per call
    assert f(torch.empty(0, 3)).shape == (0, 3)


def test_inverted_maximum_is_differentiated():
    d = torch.tensor([0.3, 1.2, 2.5], requires_grad=True)
    get_inhibitor("diffusion", invert=True)(d).sum().backward()
    # d/dd sum(f_max - d^2) = 3 * df_max/dd - 2d; f_max = 2.5^2 moves with the last entry only.
    assert torch.allclose(d.grad, torch.tensor([-0.6, -2.4, 3 * 5.0 - 5.0]))


@pytest.mark.parametrize("name", sorted(PAPER_DEFAULTS))
def test_inhibitors_are_differentiable(name):
    d = torch.tensor([[0.3, 1.2], [2.5, 6.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(get_inhibitor(name, invert=False), (d,))


@pytest.mark.parametrize("name, params, d, expected", [
    ("ricker", dict(sigma=2.0, amplitude=1.0), 2.0, 0.0),
    ("ricker", dict(sigma=1.0, amplitude=1.0), 0.0, 1.0),
    ("gaussian", dict(sigma=1.0, amplitude=2.0), 1.0, 2 * math.exp(-0.5)),
    ("diffusion", dict(scale=3.0), 2.0, 12.0),
    ("sinusoid", dict(offset=1.0, amplitude=2.0, frequency=0.5), math.pi, 1.0),
    ("dog", dict(amplitude=1.0, wide=1.0, narrow=2.0), 1.0, math.exp(-1) - math.exp(-0.5)),
    ("constant", dict(value=3.0), 5.0, 3.0),
])
def test_parameters(name, params, d, expected):
    f = get_inhibitor(name, invert=False, **params)
    assert float(f(torch.tensor([d]))) == pytest.approx(expected, abs=1e-6)


def test_constant_is_plain_l1():
    weights = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    coefficients = get_inhibitor("constant")(torch.rand(4, 4))
    assert float((coefficients * weights.abs()).sum()) == pytest.approx(float(weights.abs().sum()))


def cube(distance: torch.Tensor) -> torch.Tensor:
    return distance ** 3


def test_any_callable_is_an_inhibitor():
    f = get_inhibitor(cube)
    assert isinstance(f, CallableInhibitor) and f.invert is False
    assert torch.equal(f(D), D ** 3)
    assert torch.equal(get_inhibitor(cube, invert=True)(D), D.max() ** 3 - D ** 3)
    assert f.spec == {"name": "callable", "function": f"{cube.__module__}.cube", "invert": False}
    assert get_inhibitor(torch.sqrt)(torch.tensor([4.0])).item() == 2.0
    assert torch.allclose(get_inhibitor(lambda d: 2 * d)(D), 2 * D)
    assert torch.allclose(get_inhibitor(functools.partial(torch.mul, other=3.0))(D), 3 * D)


def test_callable_errors():
    with pytest.raises(ValueError, match="cannot apply to the function"):
        get_inhibitor(cube, sigma=1.0)
    with pytest.raises(ValueError, match=r"returned float .*same shape"):
        get_inhibitor(lambda d: 1.0)(D)
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        get_inhibitor(get_inhibitor(cube).spec)


def test_instances_and_classes():
    dog = DifferenceOfGaussians()
    assert get_inhibitor(dog) is dog
    raw = get_inhibitor(dog, invert=False, amplitude=1.0)
    assert raw.invert is False and raw.amplitude == 1.0 and dog.invert is True  # a copy
    assert get_inhibitor(Ricker, sigma=3.0) == Ricker(sigma=3.0)
    with pytest.raises(TypeError):
        Inhibitor()  # abstract


@pytest.mark.parametrize("name", sorted(PAPER_DEFAULTS))
def test_spec_round_trips_through_json(name):
    for f in (get_inhibitor(name), get_inhibitor(name, invert=not get_inhibitor(name).invert)):
        spec = json.loads(json.dumps(f.spec))
        assert spec["name"] == name
        rebuilt = get_inhibitor(spec)
        assert rebuilt == f and rebuilt.spec == f.spec
        torch.testing.assert_close(rebuilt(D), f(D))
    assert get_inhibitor("sinusoid", frequency=1.0).spec == {
        "name": "sinusoid", "invert": False, "offset": 50.0, "amplitude": 50.0, "frequency": 1.0}


def test_unknown_names_are_named_with_the_valid_choices():
    with pytest.raises(UnknownNameError, match=(
            "unknown inhibitor 'dogg'; expected one of constant, diffusion, dog, gaussian, identity, ricker, "
            "sinusoid, or a callable .* \\(did you mean 'dog'\\?\\)")):
        get_inhibitor("dogg")


@pytest.mark.parametrize("call, message", [
    (lambda: get_inhibitor("dog", width=3), "bad parameters .*width"),
    (lambda: get_inhibitor("ricker", sigma=0.0), "sigma=0.0"),
    (lambda: get_inhibitor("gaussian", sigma=-1.0), "sigma=-1.0"),
    (lambda: get_inhibitor("dog", narrow=0), "narrow=0"),
    (lambda: get_inhibitor("dog", invert="yes"), "invert='yes'"),
    (lambda: get_inhibitor("constant", value=float("inf")), "value, got inf"),
    (lambda: get_inhibitor({"sigma": 1.0}), "'name'"),
    (lambda: get_inhibitor(3), "got 3"),
    (lambda: register_inhibitor("x")(cube), "Inhibitor subclasses"),
])
def test_bad_parameters_raise_value_errors_naming_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_register_inhibitor_adds_a_name():
    from dataclasses import dataclass

    @register_inhibitor("step")
    @dataclass
    class Step(Inhibitor):
        threshold: float = 1.0

        def profile(self, distance):
            return (distance > self.threshold).to(distance.dtype)

    try:
        f = get_inhibitor("step", threshold=2.0)
        assert torch.equal(f(D), (D > 2.0).float())
        assert get_inhibitor(f.spec) == f and f.spec["name"] == "step"
    finally:
        del INHIBITORS["step"]
    assert isinstance(get_inhibitor("constant"), Constant)
