"""The navigation loss's fused soft-target cross-entropy against the plain expression."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moduli_transform.tasks import loss_kernels
from moduli_transform.tasks import soft_cross_entropy as sce
from moduli_transform.tasks.soft_cross_entropy import soft_cross_entropy

needs_kernels = pytest.mark.skipif(not loss_kernels.AVAILABLE, reason="numba is not installed")


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


def test_pytorch_path_float32_gradient_unchanged_bitwise_when_nothing_underflows(monkeypatch):
    monkeypatch.setattr(sce, "_compiled", lambda *_: False)   # the path without the kernels
    torch.manual_seed(4)
    logits = torch.randn(30, 64, requires_grad=True)
    targets = torch.softmax(torch.randn(30, 64), -1)
    soft_cross_entropy(logits, targets).backward()
    log_probs = torch.log_softmax(logits.detach(), -1)
    scale = 1.0 / logits.shape[0]
    expected = torch.exp(log_probs).mul_(targets.sum(-1, keepdim=True) * scale).addcmul_(targets, torch.tensor(scale),
                                                                                        value=-1)
    assert torch.equal(logits.grad, expected)


@needs_kernels
@pytest.mark.parametrize("shape", [(7, 1), (5, 9), (3, 4, 37), (64, 512)])
def test_compiled_float32_path_matches_the_plain_expression_in_double(shape, monkeypatch):
    calls = []
    forward = loss_kernels.forward
    monkeypatch.setattr(loss_kernels, "forward", lambda *a: calls.append(a[0].shape) or forward(*a))
    torch.manual_seed(5)
    logits, targets = (4 * torch.randn(shape)).requires_grad_(), (1.5 * torch.rand(shape)).requires_grad_()
    loss = soft_cross_entropy(logits, targets)   # targets not normalised
    (0.7 * loss).backward()
    assert calls == [(logits.numel() // shape[-1], shape[-1])]   # the kernels ran
    # the same float32 inputs in double precision
    reference_logits = logits.detach().double().requires_grad_()
    reference_targets = targets.detach().double().requires_grad_()
    reference = plain(reference_logits, reference_targets)
    (0.7 * reference).backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - reference.item()) <= 2e-7 * abs(reference.item())
    # float32 rounding of softmax * sum(y) - y: within 2e-6 of the largest gradient
    # (PyTorch's own float32 path: 7e-7 at 10^4 x 512; these kernels 1.0e-6)
    for got, want in ((logits.grad, reference_logits.grad), (targets.grad, reference_targets.grad)):
        assert (got.double() - want).abs().max() <= 2e-6 * want.abs().max()


@needs_kernels
def test_compiled_path_is_bitwise_the_same_on_one_and_two_threads():
    torch.manual_seed(6)
    logits = (5 * torch.randn(300, 70)).numpy()
    targets = torch.softmax(torch.randn(300, 70), -1).numpy()
    one = loss_kernels.forward(logits, targets, threads=1)
    two = loss_kernels.forward(logits, targets, threads=2)
    assert one[0] == two[0] and np.array_equal(one[1], two[1]) and np.array_equal(one[2], two[2])
    grads = [loss_kernels.backward(logits, targets, one[1], one[2], 0.01, threads=t) for t in (1, 2)]
    assert np.array_equal(grads[0], grads[1])


@needs_kernels
def test_compiled_path_keeps_nan_and_infinite_losses():
    targets = torch.full((3, 4), 0.25)
    nan_row = torch.zeros(3, 4)
    nan_row[1, 2] = float("nan")
    assert torch.isnan(soft_cross_entropy(nan_row, targets))
    inf_row = torch.zeros(3, 4)
    inf_row[0, 0] = float("inf")
    assert torch.isnan(soft_cross_entropy(inf_row, targets))      # as log_softmax gives
    minus_inf = torch.zeros(3, 4)
    minus_inf[2, 3] = -float("inf")
    assert soft_cross_entropy(minus_inf, targets).item() == float("inf")
    assert torch.isnan(soft_cross_entropy(torch.zeros(0, 4), torch.zeros(0, 4)))   # empty: nan, as .mean()
    with pytest.raises(ValueError, match=r"non-empty \(rows, classes\) shape, got \(0, 4\)"):
        loss_kernels.forward(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32), threads=1)


@needs_kernels
def test_compiled_exp_is_within_3e_7_and_never_subnormal():
    from numba import njit

    @njit
    def exp_all(values, out):
        for i in range(values.shape[0]):
            out[i] = loss_kernels._exp(values[i])

    values = np.concatenate([np.linspace(-87.3, 88.0, 200001), [-87.4, -100.0, -np.inf, np.nan]]).astype(np.float32)
    out = np.empty_like(values)
    exp_all(values, out)
    inside = values[:200001].astype(np.float64)
    relative = np.abs(out[:200001] / np.exp(inside) - 1)
    assert relative.max() < 3e-7
    tiny = np.finfo(np.float32).tiny
    assert np.all(out[200001:204] == out[200001]) and tiny <= out[200001] < 1.2e-38 * 1.0001
    assert np.isnan(out[-1])
