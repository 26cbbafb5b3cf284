"""Parametrized weights: prune through a parametrization only where zeros survive it,
penalize the weight the model computes with, measure sparsity on that weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal, weight_norm

import moduli_transform as mt
from moduli_transform.effective import keeps_zeros, parametrized

H = 6


class Skew(nn.Module):
    """geotorch style: the stored tensor's upper triangle defines a skew-symmetric matrix."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        upper = x.triu(1)
        return upper - upper.transpose(-2, -1)


class MatrixExp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matrix_exp(x)


class Mask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


class Loop(nn.Module):
    def __init__(self, recurrent: nn.Linear) -> None:
        super().__init__()
        self.input, self.recurrent = nn.Linear(3, H), recurrent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            h = torch.tanh(self.input(x[:, t]) + self.recurrent(h))
        return h


def geotorch_style() -> nn.Linear:
    linear = nn.Linear(H, H, bias=False)
    parametrize.register_parametrization(linear, "weight", Skew())
    parametrize.register_parametrization(linear, "weight", MatrixExp())
    return linear


def masked() -> nn.Linear:
    linear = nn.Linear(H, H, bias=False)
    parametrize.register_parametrization(linear, "weight", Mask((torch.rand(H, H) < 0.8).float()))
    return linear


FACTORIES = {"torch_orthogonal": lambda: orthogonal(nn.Linear(H, H, bias=False)),
             "geotorch_skew_matrix_exp": geotorch_style}
x = torch.randn(2, 3, 3)


@pytest.mark.parametrize("name", FACTORIES)
def test_pruning_through_an_orthogonal_parametrization_is_refused(name):
    torch.manual_seed(0)
    model = Loop(FACTORIES[name]())
    with pytest.raises(ValueError, match=r"cannot prune 'recurrent.parametrizations.weight.original'.*sparsity=None"):
        mt.attach(model, example_inputs=(x,), sparsity=0.5)
    assert not keeps_zeros(parametrized(model, "recurrent.parametrizations.weight.original"))


@pytest.mark.parametrize("name", FACTORIES)
def test_the_penalty_acts_on_the_computed_weight(name):
    torch.manual_seed(0)
    explicit, auto = Loop(FACTORIES[name]()), Loop(FACTORIES[name]())
    auto.load_state_dict(explicit.state_dict())
    handle = mt.attach(explicit, example_inputs=(x,), strength=1.0)
    target = "recurrent.parametrizations.weight.original"
    regularizer = handle.regularizers[target]
    assert torch.equal(handle.penalty(), regularizer.penalty(explicit.recurrent.weight))
    handle.penalty().backward()
    auto_handle = mt.attach(auto, example_inputs=(x,), strength=1.0, auto=True)
    (auto(x).sum() * 0).backward()
    stored = dict(explicit.named_parameters())[target]
    assert stored.grad.abs().sum() > 0
    assert torch.allclose(dict(auto.named_parameters())[target].grad, stored.grad, atol=1e-6)
    # sparsity() measures the computed (orthogonal, dense) weight
    assert auto_handle.sparsity()[target] == int((auto.recurrent.weight == 0).sum()) == 0


@pytest.mark.parametrize("factory", [masked, lambda: weight_norm(nn.Linear(H, H, bias=False))],
                         ids=["mask", "weight_norm"])
def test_zero_keeping_parametrizations_are_pruned_through_and_measured_on_the_weight(factory):
    torch.manual_seed(0)
    model = Loop(factory())
    handle = mt.attach(model, example_inputs=(x,), sparsity=0.5, total_steps=1)
    handle.step()
    for target in handle.targets:
        if target.kind == "elementwise":
            continue
        assert keeps_zeros(parametrized(model, target.name))
        weight = model.recurrent.weight
        assert handle.sparsity()[target.name] == int((weight == 0).sum()) / weight.numel()
        assert handle.sparsity()[target.name] >= 0.5
