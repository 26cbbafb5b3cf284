"""A bias-free ReLU Elman layer with a hand-written backward: the navigation model's recurrence.

``relu_rnn(x, h0, W_ih, W_hh)`` computes what ``nn.RNN(nonlinearity="relu", bias=False,
batch_first=True)`` computes, ``h_t = relu(W_ih x_t + W_hh h_{t-1})``, with the work
arranged for training on a CPU:

* the states live in one ``(B, T, H)`` buffer that the forward writes in place (one
  ``addmm_`` and one ``relu_`` per step, no per-step outputs to stack, no copy for the
  decoder that reads it);
* the backward walks back through time with one product per step for the state
  gradient, and forms the recurrent weight gradient as **one** product over all steps
  (``(H, B T) x (B T, H)``, plus two ``(H, B) x (B, H)`` corrections) instead of ``T``
  products summed one by one.

Its products are the ones the step cannot avoid (``benchmarks/nav_step.py`` times them as
the floor). Results equal ``nn.RNN``'s up to float rounding (tests compare both, and
check the gradients in double precision).

Example:
    >>> rnn = torch.nn.RNN(2, 8, nonlinearity="relu", bias=False, batch_first=True)
    >>> x, h0 = torch.randn(3, 5, 2), torch.randn(3, 8)
    >>> fused = relu_rnn(x, h0, rnn.weight_ih_l0, rnn.weight_hh_l0)
    >>> bool(torch.allclose(fused, rnn(x, h0[None])[0], atol=1e-6))
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["relu_rnn"]


class _ReluRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, inputs: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor) -> Tensor:
        batch, length, width = inputs.shape
        hidden = weight_hh.shape[0]
        flat_inputs = inputs.reshape(batch * length, width)
        # Batch-major like the output, so the decoder reads it without a copy; states[:, t]
        # is a (B, H) matrix with row stride T*H, which BLAS takes as it is.
        states = (flat_inputs @ weight_ih.t()).view(batch, length, hidden)
        previous = h0
        for t in range(length):
            state = states[:, t]
            state.addmm_(previous, weight_hh.t()).relu_()
            previous = state
        ctx.save_for_backward(flat_inputs, h0, weight_ih, weight_hh, states)
        return states

    @staticmethod
    def backward(ctx: Any, grad_states: Tensor) -> tuple[Tensor | None, ...]:
        flat_inputs, h0, weight_ih, weight_hh, states = ctx.saved_tensors
        batch, length, hidden = states.shape
        grad_states = grad_states.contiguous()
        # grad_pre[:, t]: the gradient at step t before the ReLU.
        grad_pre = torch.empty_like(states)
        incoming = grad_states[:, length - 1].clone()
        for t in reversed(range(length)):
            # relu'(pre) = 0 where the output is 0: ReLU's own backward kernel.
            torch.ops.aten.threshold_backward.grad_input(incoming, states[:, t], 0.0, grad_input=grad_pre[:, t])
            if t > 0:  # the gradient reaching h[t-1]: its own output's plus W_hh's, in one addmm
                torch.addmm(grad_states[:, t - 1], grad_pre[:, t], weight_hh, out=incoming)
        grad_state = grad_pre[:, 0] @ weight_hh
        # sum over b, t of grad_pre[b, t]^T h[b, t-1] (h[b, -1] = h0[b]) as ONE product: row r of
        # the flattened gradient against row r-1 of the flattened states. The rows r = b*T pair
        # across walks (with h[b-1, T-1]); two small products take those out and put h0 in.
        flat_grad = grad_pre.view(batch * length, hidden)
        flat_states = states.view(batch * length, hidden)
        grad_hh = torch.addmm(grad_pre[:, 0].t() @ h0, flat_grad[1:].t(), flat_states[:-1])
        grad_hh.addmm_(grad_pre[1:, 0].t(), states[:-1, length - 1], alpha=-1.0)
        grad_ih = (flat_inputs.t() @ flat_grad).t()
        grad_inputs = None
        if ctx.needs_input_grad[0]:
            grad_inputs = (flat_grad @ weight_ih).view(batch, length, -1)
        return grad_inputs, grad_state, grad_ih, grad_hh


def relu_rnn(inputs: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor) -> Tensor:
    """States ``(B, T, H)`` of the bias-free ReLU RNN on ``inputs (B, T, I)`` from ``h0 (B, H)``.

    The same values as ``nn.RNN(I, H, nonlinearity="relu", bias=False, batch_first=True)``
    with ``h0[None]`` (its first output); differentiable in all four arguments.
    """
    if inputs.dim() != 3 or h0.dim() != 2:
        raise ValueError(f"relu_rnn expects inputs (B, T, I) and h0 (B, H); got {tuple(inputs.shape)} "
                         f"and {tuple(h0.shape)}")
    return _ReluRNN.apply(inputs, h0, weight_ih, weight_hh)
