"""The paper's three benchmarks as :class:`Task` objects, found by name in :data:`TASKS`.

A task owns its data (generated or loaded), builds its model, computes the training loss
and evaluates its metric; :mod:`moduli_transform.tasks.runner` owns the training loop, the moduli handle,
checkpoints and the run directory. Each task module holds its presets (``test``: seconds,
for the test suite; ``cpu``: minutes on two cores; ``paper``: the paper's sizes).

Example:
    >>> sorted(TASKS)
    ['adding', 'language_model', 'navigation']
    >>> get_task("adding").metric_name
    'rmse'
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["Preset", "SCHEDULE_SHAPES", "LOTTERY_EMBEDDINGS", "Task", "TASKS", "register_task", "get_task", "UnknownTaskError"]


class UnknownTaskError(ValueError):
    """A task or preset name that is not registered."""


SCHEDULE_SHAPES = ("phases", "epochs")
LOTTERY_EMBEDDINGS = ("reuse", "redraw")


@dataclass(frozen=True)
class Preset:
    """Training sizes and protocol shared by every task; task modules subclass it with their own fields.

    Two schedule shapes (``schedule``):

    * ``"phases"`` (ours, the default of this base class): ``steps`` optimizer steps in three
      phases: dense (``dense_fraction``), a linear pruning ramp (``prune_fraction``) and
      fine-tuning (the rest); the lottery retrain runs ``lottery_steps`` (0: ``steps``).
    * ``"epochs"`` (the authors'): ``epochs`` epochs of ``steps_per_epoch`` steps (0: one pass
      over the task's training data); epoch 0 is dense and at the start of epoch ``e`` the
      target sparsity is ``final * (e + ramp_offset) / (epochs - 1 + ramp_offset)`` (adding:
      offset 0, ``e/(n-1)``; language model: offset 1, ``(e+1)/n``); then ``stabilizer_epochs``
      at the final sparsity; the lottery retrain runs ``lottery_epochs``. The task is evaluated
      at the end of every epoch.

    ``scope`` and ``prune_also`` say what magnitude pruning ranks together (``"global"`` over the
    recurrent blocks and the named parameters, as the authors); ``lottery_penalty`` keeps the
    regularizer on while the lottery ticket retrains and ``lottery_embedding`` reuses its C or
    draws a new embedding. ``l1_also`` names parameters that get a plain L1 term
    ``strength * mean(|W|)`` beside the moduli penalty, whatever the control (the authors' LM).
    The run's metric is the mean of the last ``tail_fraction`` of its periodic evaluations.
    """

    steps: int = 100
    lr: float = 1e-3
    strength: float = 0.1
    clip: float | None = None
    eval_every: int = 50
    log_every: int = 10
    checkpoint_every: int = 100
    dense_fraction: float = 0.4
    prune_fraction: float = 0.4
    lottery_steps: int = 0
    schedule: str = "phases"
    steps_per_epoch: int = 0
    epochs: int = 0
    stabilizer_epochs: int = 0
    lottery_epochs: int = 0
    scope: str = "per_tensor"
    prune_also: tuple[str, ...] = ()
    lottery_penalty: bool = False
    lottery_embedding: str = "reuse"
    tail_fraction: float = 0.05
    ramp_offset: int = 0
    l1_also: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULE_SHAPES:
            raise ValueError(f"unknown preset schedule {self.schedule!r}; expected one of {', '.join(SCHEDULE_SHAPES)}")
        if self.lottery_embedding not in LOTTERY_EMBEDDINGS:
            raise ValueError(f"unknown lottery_embedding {self.lottery_embedding!r}; expected one of "
                             f"{', '.join(LOTTERY_EMBEDDINGS)}")
        if self.schedule == "epochs" and (self.epochs < 2 or self.steps_per_epoch < 0 or self.ramp_offset < 0):
            raise ValueError("the epochs schedule needs epochs >= 2 (epoch 0 is dense), steps_per_epoch >= 0 and "
                             f"ramp_offset >= 0; got epochs={self.epochs}, steps_per_epoch={self.steps_per_epoch}, "
                             f"ramp_offset={self.ramp_offset}")
        if self.steps < 3:
            raise ValueError(f"preset steps must be >= 3 (dense, prune and fine-tune phases); got {self.steps}")
        if not (0 < self.dense_fraction and 0 < self.prune_fraction and self.dense_fraction + self.prune_fraction < 1):
            raise ValueError("dense_fraction and prune_fraction must be > 0 with a sum < 1; got "
                             f"{self.dense_fraction} and {self.prune_fraction}")
        if not 0 < self.tail_fraction <= 1:
            raise ValueError(f"tail_fraction must be in (0, 1]; got {self.tail_fraction}")
        for name in ("eval_every", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"preset {name} must be >= 1; got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def with_overrides(self, **changes: Any) -> "Preset":
        """A copy with the non-None ``changes`` applied."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


class Task(abc.ABC):
    """One benchmark: data, model, loss and metric. Subclasses set the class attributes.

    Randomness: model initialisation uses the global torch RNG (seeded by the runner);
    training batches draw from the ``generator`` passed in; evaluation data is fixed by
    the task (its own seed), so evaluating never moves any training RNG.

    Device: data is drawn on the CPU (the same numbers on every device); :meth:`to` puts
    the task's fixed tensors (held-out data) on the training device, and the runner moves
    each training batch there once.
    """

    name: str
    metric_name: str
    higher_is_better: bool
    presets: dict[str, Preset]
    # A seed "learned" the task when its metric is below (above, if higher is better) this.
    learned_threshold: float | None = None
    # True when train_batch depends on the generator alone (not on the step or the task's
    # state): the runner may then draw batches ahead in a background thread (tasks/prefetch.py).
    prefetch_batches: bool = False

    def __init__(self, preset: Preset, data: str | None = None) -> None:
        self.preset = preset
        self.data = data
        self.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> "Task":
        """Put the task's fixed tensors on ``device`` (subclasses holding tensors extend it); returns self."""
        self.device = torch.device(device)
        return self

    @classmethod
    def get_preset(cls, name: str) -> Preset:
        if name not in cls.presets:
            raise UnknownTaskError(f"unknown preset {name!r} for task {cls.name!r}; "
                                   f"expected one of {', '.join(cls.presets)}")
        return cls.presets[name]

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model (uses the global torch RNG)."""

    def epoch_steps(self) -> int:
        """Steps in one pass over the training data (for presets with ``steps_per_epoch=0``)."""
        raise NotImplementedError(f"task {self.name!r} has no natural epoch; give the preset steps_per_epoch")

    def example_inputs(self) -> tuple | None:
        """Inputs with two time steps for the graph pass (custom cells); None for PyTorch's RNN layers."""
        return None

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Adam at the preset's learning rate (tasks with another optimizer override)."""
        return torch.optim.Adam(model.parameters(), lr=self.preset.lr)

    @abc.abstractmethod
    def train_batch(self, step: int, generator: torch.Generator) -> Any:
        """The training batch of ``step`` (the runner times this call as data time)."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, float | Callable[[], float]]:
        """Training loss (differentiable) and the batch's metric, for logging: a float, or a
        function of no arguments computing it when it is logged (when it costs a step's
        fraction, as navigation's decoding does)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, split: str = "valid") -> float:
        """The task metric on held-out data; ``split`` is ``"valid"`` or ``"test"``."""

    def after_evaluate(self, metric: float, optimizer: torch.optim.Optimizer) -> None:
        """Called after each periodic validation (e.g. learning-rate decay); default no-op."""

    def reset(self) -> None:
        """Forget training state (carried hidden state, decay bookkeeping) for a new training run."""

    def state_dict(self) -> dict[str, Any]:
        """Training state of the task itself (tensors allowed), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def describe(self) -> dict[str, Any]:
        """Facts about the data worth recording in the run's config (sizes, paths)."""
        return {}


TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Decorator adding a :class:`Task` subclass to :data:`TASKS` under ``name``."""

    def decorate(cls: type[Task]) -> type[Task]:
        cls.name = name
        TASKS[name] = cls
        return cls

    return decorate


def get_task(name: str) -> type[Task]:
    """The task class registered under ``name``.

    Raises:
        UnknownTaskError: listing the registered names.
    """
    if name not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; expected one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


# The task modules register themselves; imported last because they import from here.
from . import adding, language_model, navigation  # noqa: E402,F401
