"""Tiny models shared by the core tests (CPU, seeded)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a busy two-core machine run many times faster on one thread
    (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyRNNRegressor(nn.Module):
    """nn.RNN + linear read-out: the adding-problem shape of model."""

    def __init__(self, hidden: int = 12, layers: int = 1, cell: type = nn.RNN) -> None:
        super().__init__()
        self.rnn = cell(2, hidden, num_layers=layers, batch_first=True)
        self.readout = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.readout(out[:, -1]).squeeze(-1)


class CellLoopModel(nn.Module):
    """An RNNCell called in a Python loop, trained through a method other than forward."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.cell = nn.GRUCell(2, hidden)
        self.readout = nn.Linear(hidden, 1)

    def rollout(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.readout(h).squeeze(-1)


def toy_batch(seed: int, batch: int = 16, steps: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, steps, 2, generator=generator)
    return x, x[..., 0].sum(1) * 0.2


@pytest.fixture
def tiny_rnn() -> TinyRNNRegressor:
    torch.manual_seed(0)
    return TinyRNNRegressor()
