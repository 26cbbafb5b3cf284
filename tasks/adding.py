"""The adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015): sum two marked values.

Each input step is ``(value, marker)`` with values U(0, 1); two distinct positions anywhere
in the sequence are marked (``markers="anywhere"``, the authors') or one in each half
(``markers="halves"``, ours before), and the target is the sum of the two marked values. Always predicting 1 scores an RMSE of ``sqrt(1/6) ~ 0.408`` (the sum's standard
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

from moduli_transform.device import to_device

from . import Preset, Task, register_task

__all__ = ["AddingPreset", "AddingTask", "AddingRNN", "ElmanCat", "adding_batch", "rmse", "MARKERS", "MODELS"]

MARKERS = ("anywhere", "halves")
MODELS = ("elman_cat", "rnn")


def adding_batch(batch_size: int, length: int, generator: torch.Generator,
                 markers: str = "anywhere") -> tuple[Tensor, Tensor]:
    """``(inputs (B, T, 2), targets (B,))`` of the adding problem.

    Raises:
        ValueError: ``length < 2`` (two marked positions), or unknown ``markers``.
    """
    if length < 2:
        raise ValueError(f"adding-problem sequences need length >= 2 (two marked positions); got {length}")
    if markers not in MARKERS:
        raise ValueError(f"unknown markers {markers!r}; expected one of {', '.join(MARKERS)}")
    values = torch.rand(batch_size, length, generator=generator)
    if markers == "anywhere":  # two distinct positions, uniform: adding_problem/main.py:118 (15ef708)
        first = torch.randint(0, length, (batch_size,), generator=generator)
        second = torch.randint(0, length - 1, (batch_size,), generator=generator)
        second = second + (second >= first).long()
    else:
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


class ElmanCat(nn.Module):
    """The authors' Elman RNN: ``h = relu(i2h(cat([x, h])))``, read-out ``h2o(h_T)``.

    adding_problem/main.py:125-165 (15ef708). Only ``i2h.weight[:, input_size:]`` is
    recurrent; the graph pass finds that column slice.
    """

    def __init__(self, hidden_size: int, input_size: int = 2) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.i2h = nn.Linear(input_size + hidden_size, hidden_size)
        self.h2o = nn.Linear(hidden_size, 1)

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = inputs.new_zeros(inputs.shape[0], self.hidden_size)
        for step in range(inputs.shape[1]):
            hidden = torch.relu(self.i2h(torch.cat([inputs[:, step], hidden], dim=1)))
        return self.h2o(hidden).squeeze(-1)


@dataclass(frozen=True)
class AddingPreset(Preset):
    length: int = 50
    hidden_size: int = 128
    batch_size: int = 50
    eval_size: int = 2000
    model: str = "rnn"
    markers: str = "halves"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model not in MODELS:
            raise ValueError(f"unknown adding model {self.model!r}; expected one of {', '.join(MODELS)}")
        if self.markers not in MARKERS:
            raise ValueError(f"unknown markers {self.markers!r}; expected one of {', '.join(MARKERS)}")


# The authors' protocol, adding_problem/main.py (15ef708); line numbers cited beside each value.
_AUTHORS = dict(
    model="elman_cat",                 # main.py:125-165, Linear on cat([x, h]) + h2o, ReLU (main.py:42-44)
    markers="anywhere",                # main.py:118, two distinct positions anywhere
    length=50,                         # main.py:28-31, seq_length 50
    hidden_size=128,                   # main.py:36-38, nhid 128
    batch_size=32,                     # main.py:24-27
    lr=1e-4,                           # main.py:32-35, Adam (main.py:186)
    strength=1e-3,                     # main.py:45-48 weight_decay, times mean(C*|W_hh|) (main.py:176, 211)
    clip=0.5,                          # main.py:220
    schedule="epochs",                 # main.py:194-204, epoch 0 dense, target*e/(n-1) at each epoch start
    steps_per_epoch=313,               # main.py:179-180, 10,000 samples / batch 32 (their last batch has 16)
    epochs=100,                        # main.py:103
    stabilizer_epochs=10,              # main.py:232, with the penalty (main.py:240)
    lottery_epochs=100,                # main.py:273, num_epochs again
    scope="global",                    # main.py:187, 202: global L1 over i2h (input columns too) and h2o
    prune_also=("i2h.weight", "h2o.weight"),
    lottery_penalty=True,              # main.py:281, penalty re-applied
    lottery_embedding="reuse",         # main.py:267, model2.reg = model.reg (same C)
)
# Deliberate differences: our metric is RMSE on a fixed held-out set, evaluated once per epoch
# (the authors log the training loss per epoch); every batch has 32 samples; the 'mean' L1
# control averages the inhibitor over the run's own embedding, not a fresh one.

PRESETS = {
    "test": AddingPreset(**{**_AUTHORS, "length": 10, "hidden_size": 16, "batch_size": 16, "lr": 1e-3,
                            "steps_per_epoch": 4, "epochs": 4, "stabilizer_epochs": 2, "lottery_epochs": 3},
                         eval_size=256, eval_every=4, log_every=2, checkpoint_every=4),
    # The authors' protocol at 40% of the epochs (same steps per epoch, same ramp shape).
    "cpu": AddingPreset(**{**_AUTHORS, "epochs": 40, "stabilizer_epochs": 4, "lottery_epochs": 40},
                        eval_every=313, log_every=50, checkpoint_every=1565),
    "paper": AddingPreset(**_AUTHORS, eval_every=313, log_every=50, checkpoint_every=1565),
    # Not the authors' protocol (a labelled difference): the paper preset at lr 1e-3 instead of
    # their 1e-4 (adding_problem/main.py). At 1e-4 no control leaves the 0.41 plateau at 99%; the
    # issue's independent run at 1e-3 learned there. This preset tests that one setting.
    "paper-lr1e-3": AddingPreset(**{**_AUTHORS, "lr": 1e-3}, eval_every=313, log_every=50, checkpoint_every=1565),
    # Our earlier protocol (nn.RNN, markers in halves, Adam 1e-3, strength 0.1, phases, W_hh only).
    "legacy": AddingPreset(steps=5000, length=50, hidden_size=128, batch_size=50, lr=1e-3, clip=0.5,
                           strength=0.1, dense_fraction=0.5, prune_fraction=0.3, eval_every=250, log_every=25,
                           checkpoint_every=500),
    "legacy-test": AddingPreset(steps=30, length=10, hidden_size=16, batch_size=16, eval_size=256, lr=1e-3,
                                eval_every=10, log_every=5, checkpoint_every=4, strength=0.1, clip=0.5),
}


@register_task("adding")
class AddingTask(Task):
    """Adding problem; metric: RMSE on a fixed held-out set (lower is better)."""

    metric_name = "rmse"
    higher_is_better = False
    learned_threshold = 0.1  # predicting 1 always scores 0.408
    presets = PRESETS
    # Batches depend on the generator alone, but a batch is ~1% of a step here: drawing it in
    # a thread would cost more than it hides, so the runner draws in series.
    prefetch_batches = False
    preset: AddingPreset

    def __init__(self, preset: AddingPreset, data: str | None = None) -> None:
        super().__init__(preset, data)
        self._held_out = {split: adding_batch(preset.eval_size, preset.length, torch.Generator().manual_seed(seed),
                                              preset.markers)
                          for split, seed in (("valid", 1_000_001), ("test", 2_000_002))}

    def to(self, device: str | torch.device) -> "AddingTask":
        """The held-out sets on ``device``."""
        super().to(device)
        self._held_out = to_device(self._held_out, self.device)
        return self

    def build_model(self) -> nn.Module:
        if self.preset.model == "elman_cat":
            return ElmanCat(self.preset.hidden_size)
        return AddingRNN(self.preset.hidden_size)

    def example_inputs(self) -> tuple[Tensor]:
        """Two time steps, for the graph pass that finds the recurrent slice of ``i2h``."""
        return (torch.zeros(1, 2, 2),)

    def train_batch(self, step: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return adding_batch(self.preset.batch_size, self.preset.length, generator, self.preset.markers)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, float]:
        inputs, targets = batch
        prediction = model(inputs)
        loss = nn.functional.mse_loss(prediction, targets)
        return loss, float(loss.detach().sqrt())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "valid") -> float:
        inputs, targets = self._held_out[split]
        return rmse(model(inputs), targets)
