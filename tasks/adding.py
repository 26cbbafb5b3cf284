"""The adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015): sum two marked values.

Each input step is ``(value, marker)`` with values U(0, 1); one marker sits in the first
half of the sequence and one in the second, and the target is the sum of the two marked
values. Always predicting 1 scores an RMSE of ``sqrt(1/6) ~ 0.408`` (the sum's standard
deviation), the baseline a model must beat.

Example:
    >>> inputs, targets = adding_batch(4, 10, torch.Generator().manual_seed(0))
    >>> inputs.shape, targets.shape
    (torch.Size([4, 10, 2]), torch.Size([4]))
    >>> bool(torch.allclose((inputs[..., 0] * inputs[..., 1]).sum(1), targets))
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import Preset, Task, register_task

__all__ = ["AddingPreset", "AddingTask", "AddingRNN", "adding_batch", "rmse"]


def adding_batch(batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(inputs (B, T, 2), targets (B,))`` of the adding problem.

    Raises:
        ValueError: ``length < 2`` (each half needs a marked position).
    """
    if length < 2:
        raise ValueError(f"adding-problem sequences need length >= 2 (one mark per half); got {length}")
    values = torch.rand(batch_size, length, generator=generator)
    half = length // 2
    first = torch.randint(0, half, (batch_size,), generator=generator)
    second = torch.randint(half, length, (batch_size,), generator=generator)
    markers = torch.zeros(batch_size, length)
    rows = torch.arange(batch_size)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    targets = values[rows, first] + values[rows, second]
    return torch.stack([values, markers], dim=-1), targets


def rmse(prediction: Tensor, target: Tensor) -> float:
    return float(torch.sqrt(torch.mean((prediction - target) ** 2)))


class AddingRNN(nn.Module):
    """Elman RNN (``nn.RNN``, ReLU) with a linear read-out of the last hidden state."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden_size, nonlinearity="relu", batch_first=True)
        self.readout = nn.Linear(hidden_size, 1)

    def forward(self, inputs: Tensor) -> Tensor:
        states, _ = self.rnn(inputs)
        return self.readout(states[:, -1]).squeeze(-1)


@dataclass(frozen=True)
class AddingPreset(Preset):
    length: int = 50
    hidden_size: int = 128
    batch_size: int = 50
    eval_size: int = 2000


PRESETS = {
    "test": AddingPreset(steps=30, length=10, hidden_size=16, batch_size=16, eval_size=256, lr=1e-3,
                         eval_every=10, log_every=5, checkpoint_every=4, strength=0.1, clip=0.5),
    # Half the steps dense: the ReLU RNN sits on the 0.41 plateau for ~1300 steps before it learns.
    "cpu": AddingPreset(steps=5000, length=50, hidden_size=128, batch_size=50, lr=1e-3, clip=0.5,
                        strength=0.1, dense_fraction=0.5, prune_fraction=0.3, eval_every=250, log_every=25,
                        checkpoint_every=500),
    "paper": AddingPreset(steps=30000, length=50, hidden_size=128, batch_size=50, lr=1e-3, clip=0.5,
                          strength=0.1, eval_every=1000, log_every=100, checkpoint_every=2000),
}


@register_task("adding")
class AddingTask(Task):
    """Adding problem; metric: RMSE on a fixed held-out set (lower is better)."""

    metric_name = "rmse"
    higher_is_better = False
    presets = PRESETS
    preset: AddingPreset

    def __init__(self, preset: AddingPreset, data: str | None = None) -> None:
        super().__init__(preset, data)
        self._held_out = {split: adding_batch(preset.eval_size, preset.length, torch.Generator().manual_seed(seed))
                          for split, seed in (("valid", 1_000_001), ("test", 2_000_002))}

    def build_model(self) -> nn.Module:
        return AddingRNN(self.preset.hidden_size)

    def train_batch(self, step: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return adding_batch(self.preset.batch_size, self.preset.length, generator)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, float]:
        inputs, targets = batch
        prediction = model(inputs)
        loss = nn.functional.mse_loss(prediction, targets)
        return loss, float(loss.detach().sqrt())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "valid") -> float:
        inputs, targets = self._held_out[split]
        return rmse(model(inputs), targets)
