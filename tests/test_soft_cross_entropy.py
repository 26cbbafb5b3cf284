"""The navigation loss's fused soft-target cross-entropy against the plain expression."""

from __future__ import annotations

import pytest
import torch

from moduli_transform.tasks.soft_cross_entropy import soft_cross_entropy


def plain(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * torch.log_softmax(logits, dim=-1)).sum(-1).mean()


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 9), (2, 1, 3, 6)])
@pytest.mark.parametrize("normalised", [True, False])
def test_value_and_gradients_equal_the_plain_expression_in_double(shape, normalised):
    torch.manual_seed(0)
    logits = (3 * torch.randn(shape, dtype=torch.float64)).requires_grad_()
    targets = torch.rand(shape, dtype=torch.float64)
    targets = (targets / targets.sum(-1, keepdim=True) if normalised else 2 * targets).requires_grad_()
    ours, reference = soft_cross_entropy(logits, targets), plain(logits, targets)
    assert torch.allclose(ours, reference, rtol=1e-12, atol=1e-12)
    weight = torch.tensor(0.7, dtype=torch.float64)  # a non-unit upstream gradient
    grads = torch.autograd.grad(ours * weight, (logits, targets))
    expected = torch.autograd.grad(reference * weight, (logits, targets))
    for got, want in zip(grads, expected):
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(soft_cross_entropy, (logits, targets))


def test_a_retained_graph_stays_correct_and_second_derivatives_refuse():
    torch.manual_seed(1)
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.softmax(torch.randn(4, 6, dtype=torch.float64), -1)
    upstream = torch.ones((), dtype=torch.float64, requires_grad=True)
    grad = torch.autograd.grad(soft_cross_entropy(logits, targets), logits, upstream, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()
    loss = soft_cross_entropy(logits, targets)
    first = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    second = torch.autograd.grad(loss, logits)[0]
    assert torch.equal(first, second)  # the backward does not consume what it saved


def test_float32_navigation_sized_loss_matches_and_targets_need_no_gradient():
    torch.manual_seed(2)
    logits = torch.randn(20, 50, 64, requires_grad=True)
    targets = torch.softmax(torch.randn(20, 50, 64), -1)
    ours = soft_cross_entropy(logits, targets)
    ours.backward()
    reference_logits = logits.detach().clone().requires_grad_()
    plain(reference_logits, targets).backward()
    assert abs(ours.item() - plain(logits.detach(), targets).item()) < 1e-5
    assert torch.allclose(logits.grad, reference_logits.grad, atol=1e-8)


def test_mismatched_shapes_name_both():
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3\) and \(2, 4\)"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4))


def test_float32_gradient_with_log_probabilities_far_below_the_float32_range():
    # peaked predictions: most log-probabilities below -87.3, where exp underflows; the
    # gradient there counts them as 1.2e-38 instead of a subnormal or 0
    torch.manual_seed(3)
    logits64 = 40 * torch.randn(50, 128, dtype=torch.float64)
    targets64 = torch.softmax(torch.randn(50, 128, dtype=torch.float64), -1)
    assert (torch.log_softmax(logits64, -1) < -87.4).double().mean() > 0.3
    logits = logits64.float().requires_grad_()
    soft_cross_entropy(logits, targets64.float()).backward()
    reference = logits64.clone().requires_grad_()
    plain(reference, targets64).backward()
    assert torch.allclose(logits.grad.double(), reference.grad, rtol=1e-5, atol=1e-9)


def test_float32_gradient_unchanged_bitwise_when_nothing_underflows():
    torch.manual_seed(4)
    logits = torch.randn(30, 64, requires_grad=True)
    targets = torch.softmax(torch.randn(30, 64), -1)
    soft_cross_entropy(logits, targets).backward()
    log_probs = torch.log_softmax(logits.detach(), -1)
    scale = 1.0 / logits.shape[0]
    expected = torch.exp(log_probs).mul_(targets.sum(-1, keepdim=True) * scale).addcmul_(targets, torch.tensor(scale),
                                                                                        value=-1)
    assert torch.equal(logits.grad, expected)
