"""Cross-entropy against soft targets with a hand-written backward: the navigation loss.

``soft_cross_entropy(logits, targets)`` is ``-(targets * log_softmax(logits, -1)).sum(-1).mean()``
(the authors' path-integration loss over place-cell codes), computed in fewer passes over the
``(B, T, Np)`` tensors, which at the paper's sizes are 10^4 x 512 floats each:

* on CPU float32 (the training case), both directions are compiled row kernels
  (:mod:`moduli_transform.tasks.loss_kernels`): forward reads each row of logits and
  targets once and keeps two floats per row (log-sum-exp and the targets' sum), backward
  writes ``(softmax * targets.sum(-1) - targets) / rows`` in one more pass. At 10^4 x 512,
  forward and backward took 7 ms against 24 ms for the PyTorch path below;
* elsewhere (another device or dtype, or numba missing), PyTorch: forward one 2-D
  ``log_softmax`` (ATen's 3-D one is slower) and one dot product with the targets; backward
  an ``exp`` of the saved log-probabilities and two in-place updates in one fresh buffer.
  That ``exp`` is :func:`moduli_transform.numerics.exp_no_underflow`, and the kernels' own
  ``exp`` does the same: probabilities below 1.2e-38 count as 1.2e-38, because
  ``torch.exp`` took a slow path on them (10^4 x 512 logits with half their
  log-probabilities below -87.3: 105 -> 9 ms).

Values and gradients equal the plain expression up to float rounding (tests compare both in
double precision, with targets that do not sum to one too). First derivatives only: asking
for a second (``create_graph=True``) raises, as ``once_differentiable`` does.

Example:
    >>> logits, targets = torch.randn(4, 3, 6), torch.softmax(torch.randn(4, 3, 6), -1)
    >>> plain = -(targets * torch.log_softmax(logits, -1)).sum(-1).mean()
    >>> bool(torch.allclose(soft_cross_entropy(logits, targets), plain))
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moduli_transform.numerics import exp_no_underflow

from . import loss_kernels

__all__ = ["soft_cross_entropy"]


def _compiled(logits: Tensor, targets: Tensor) -> bool:
    """Whether the compiled row kernels (:mod:`moduli_transform.tasks.loss_kernels`) take
    this call: CPU float32 tensors, numba installed."""
    return (loss_kernels.AVAILABLE and logits.device.type == "cpu" and targets.device.type == "cpu"
            and logits.dtype == torch.float32 and targets.dtype == torch.float32 and logits.numel() > 0)


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor) -> Tensor:
        classes = logits.shape[-1]
        flat_logits = logits.reshape(-1, classes)
        flat_targets = targets.reshape(-1, classes)
        ctx.shape = logits.shape
        ctx.compiled = _compiled(logits, targets)
        if ctx.compiled:
            flat_logits, flat_targets = flat_logits.contiguous(), flat_targets.contiguous()
            loss, log_sum_exp, target_sums = loss_kernels.forward(
                flat_logits.numpy(), flat_targets.numpy(), torch.get_num_threads())
            ctx.save_for_backward(flat_logits, flat_targets, torch.from_numpy(log_sum_exp),
                                  torch.from_numpy(target_sums))
            return torch.tensor(loss, dtype=logits.dtype)
        log_probs = torch.log_softmax(flat_logits, dim=-1)
        ctx.save_for_backward(log_probs, flat_targets)
        return -torch.dot(log_probs.view(-1), flat_targets.reshape(-1)) / log_probs.shape[0]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, Tensor | None]:
        if ctx.compiled:
            return _SoftCrossEntropy._compiled_backward(ctx, grad_loss)
        log_probs, targets = ctx.saved_tensors
        scale = grad_loss / log_probs.shape[0]
        grad_logits = grad_targets = None
        if ctx.needs_input_grad[0]:
            # d/dz of -sum_j y_j (z_j - lse(z)) = softmax(z) * sum_j y_j - y
            # one buffer: exp, then scale and subtract in place
            weight = targets.sum(-1, keepdim=True) * scale
            # exp_no_underflow: probabilities below 1.2e-38 count as 1.2e-38 (torch.exp took
            # a slow path on them: 105 vs 9 ms on 10^4 x 512 logits with half of them there)
            grad_logits = exp_no_underflow(log_probs).mul_(weight).addcmul_(targets, scale, value=-1)
            grad_logits = grad_logits.view(ctx.shape)
        if ctx.needs_input_grad[1]:
            grad_targets = (-scale * log_probs).view(ctx.shape)
        return grad_logits, grad_targets

    @staticmethod
    def _compiled_backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, Tensor | None]:
        logits, targets, log_sum_exp, target_sums = ctx.saved_tensors
        scale = float(grad_loss) / logits.shape[0]   # rows > 0: _compiled
        grad_logits = grad_targets = None
        if ctx.needs_input_grad[0]:
            grad_logits = torch.from_numpy(loss_kernels.backward(
                logits.numpy(), targets.numpy(), log_sum_exp.numpy(), target_sums.numpy(), scale,
                torch.get_num_threads())).view(ctx.shape)
        if ctx.needs_input_grad[1]:   # d/dy = -log_softmax(z) * scale
            grad_targets = ((log_sum_exp[:, None] - logits) * scale).view(ctx.shape)
        return grad_logits, grad_targets


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of ``-sum(targets * log_softmax(logits))`` along the last dimension.

    Args:
        logits: ``(..., C)`` scores.
        targets: ``(..., C)`` target distributions (any non-negative weights), same shape.

    Raises:
        ValueError: the shapes differ.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits and targets must have the same shape, got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    return _SoftCrossEntropy.apply(logits, targets)
