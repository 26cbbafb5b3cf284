"""exp_no_underflow: torch.exp except that float32 results never go subnormal."""

from __future__ import annotations

import torch

from moduli_transform.numerics import LOWEST_NORMAL_EXPONENT, exp_no_underflow

TINY = torch.finfo(torch.float32).tiny


def test_equals_exp_bitwise_wherever_the_result_is_normal():
    torch.manual_seed(0)
    x = torch.cat([torch.empty(10_000).uniform_(-87.3, 80.0), torch.tensor([0.0, -87.3, 88.0])])
    assert torch.equal(exp_no_underflow(x), torch.exp(x))


def test_below_the_bound_the_result_is_the_smallest_normal_not_a_subnormal():
    x = torch.tensor([-87.5, -100.0, -104.0, -1e4, float("-inf")])
    assert torch.exp(x).lt(TINY).all()                      # plain exp: subnormal or 0
    got = exp_no_underflow(x)
    assert got.ge(TINY).all() and got.le(TINY * 1.0001).all()
    assert float(LOWEST_NORMAL_EXPONENT) < -87.33 and float(LOWEST_NORMAL_EXPONENT) > -87.34


def test_other_dtypes_nan_and_gradients():
    x64 = torch.tensor([-100.0, -800.0, 1.0], dtype=torch.float64)
    assert torch.equal(exp_no_underflow(x64), torch.exp(x64))  # float64 untouched
    assert exp_no_underflow(torch.tensor([float("nan")])).isnan().all()
    x = torch.tensor([1.0, -200.0], requires_grad=True)
    exp_no_underflow(x).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([torch.e, 0.0]))
