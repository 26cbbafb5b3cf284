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

__all__ = ["Preset", "Task", "TASKS", "register_task", "get_task", "UnknownTaskError"]


class UnknownTaskError(ValueError):
    """A task or preset name that is not registered."""


@dataclass(frozen=True)
class Preset:
    """Training sizes shared by every task; task modules subclass it with their own fields.

    The main training run has ``steps`` optimizer steps split into three phases: dense
    (``dense_fraction``), pruning ramp (``prune_fraction``) and fine-tuning (the rest).
    The lottery retraining, when asked for, runs ``lottery_steps`` more (0: as many as ``steps``).
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

    def __post_init__(self) -> None:
        if self.steps < 3:
            raise ValueError(f"preset steps must be >= 3 (dense, prune and fine-tune phases); got {self.steps}")
        if not (0 < self.dense_fraction and 0 < self.prune_fraction and self.dense_fraction + self.prune_fraction < 1):
            raise ValueError("dense_fraction and prune_fraction must be > 0 with a sum < 1; got "
                             f"{self.dense_fraction} and {self.prune_fraction}")
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
    """

    name: str
    metric_name: str
    higher_is_better: bool
    presets: dict[str, Preset]

    def __init__(self, preset: Preset, data: str | None = None) -> None:
        self.preset = preset
        self.data = data

    @classmethod
    def get_preset(cls, name: str) -> Preset:
        if name not in cls.presets:
            raise UnknownTaskError(f"unknown preset {name!r} for task {cls.name!r}; "
                                   f"expected one of {', '.join(cls.presets)}")
        return cls.presets[name]

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model (uses the global torch RNG)."""

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Adam at the preset's learning rate (tasks with another optimizer override)."""
        return torch.optim.Adam(model.parameters(), lr=self.preset.lr)

    @abc.abstractmethod
    def train_batch(self, step: int, generator: torch.Generator) -> Any:
        """The training batch of ``step`` (the runner times this call as data time)."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, float]:
        """Training loss (differentiable) and the batch's metric (a float, for logging)."""

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
