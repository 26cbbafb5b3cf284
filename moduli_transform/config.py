"""ModuliConfig: every option of `attach`, validated on creation, JSON round trip."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence, Union

__all__ = ["ModuliConfig", "CONTROLS", "EMBEDDINGS", "SCOPES", "GRANULARITIES", "REDUCTIONS", "REINITS",
           "L1_COEFFICIENTS", "SCHEDULE_ON"]

CONTROLS = ("moduli", "l1", "shuffled", "none")
EMBEDDINGS = ("fixed", "trained")
SCOPES = ("per_tensor", "global")
GRANULARITIES = ("element", "tile")
REDUCTIONS = ("mean", "sum")
REINITS = ("random", "rewind")
SCHEDULE_ON = ("optimizer", "backward")
# The constant of the "l1" control: 1 (the authors' "standard"), the mean of the un-inverted
# inhibitor (their ``--regpower mean``, adding_problem/regularizer.py:105-108 (15ef708)), or
# the mean of the coefficients actually used (ours: the same total strength as "moduli").
L1_COEFFICIENTS = ("one", "mean", "matched")

TargetSpec = Union[str, Sequence[str]]


def _choice(option: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {option} {value!r}; expected one of {', '.join(choices)}")


@dataclass
class ModuliConfig:
    """All options of :func:`moduli_transform.attach`.

    Manifold, inhibitor and schedule may be names (checked against their registries when
    the handle is built) or objects/callables (kept as given; recorded by name in JSON).

    Example:
        >>> config = ModuliConfig(manifold="torus", sparsity=0.9, total_steps=100)
        >>> ModuliConfig.from_json(config.to_json()) == config
        True
        >>> ModuliConfig(sparsity=1.5)
        Traceback (most recent call last):
        ...
        ValueError: sparsity must be in [0, 1), got 1.5
    """

    manifold: Any = "torus"
    inhibitor: Any = "dog"
    strength: float = 0.1
    targets: TargetSpec = "recurrent"
    embedding: str = "fixed"
    control: str = "moduli"
    sparsity: float | None = None
    schedule: Any = "linear"
    total_steps: int = 1
    seed: int = 0
    auto: bool = False
    power: int = 1
    reduction: str = "mean"
    share_embedding: bool = True
    l1_coefficient: str = "matched"
    scope: str = "per_tensor"
    granularity: str = "element"
    tile: int = 16
    ordering: str = "auto"
    prune_also: tuple[str, ...] = ()
    embedding_lr: float = 1e-2
    manifold_options: dict = field(default_factory=dict)
    inhibitor_options: dict = field(default_factory=dict)
    regularize_elementwise: bool = False
    schedule_on: str = "optimizer"

    def __post_init__(self) -> None:
        _choice("embedding", self.embedding, EMBEDDINGS)
        _choice("control", self.control, CONTROLS)
        _choice("reduction", self.reduction, REDUCTIONS)
        _choice("scope", self.scope, SCOPES)
        _choice("l1_coefficient", self.l1_coefficient, L1_COEFFICIENTS)
        _choice("granularity", self.granularity, GRANULARITIES)
        _choice("schedule_on", self.schedule_on, SCHEDULE_ON)
        if int(self.tile) < 1:
            raise ValueError(f"tile must be a positive integer, got {self.tile!r}")
        if self.power not in (1, 2):
            raise ValueError(f"power must be 1 or 2, got {self.power!r}")
        if self.sparsity is not None and not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if int(self.total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if float(self.strength) < 0:
            raise ValueError(f"strength must be >= 0, got {self.strength}")
        if float(self.embedding_lr) <= 0:
            raise ValueError(f"embedding_lr must be > 0, got {self.embedding_lr}")
        if isinstance(self.prune_also, str):
            self.prune_also = (self.prune_also,)
        self.prune_also = tuple(self.prune_also)
        if not isinstance(self.targets, str):
            self.targets = tuple(self.targets)
            if not self.targets:
                raise ValueError("targets is an empty list; give a kind ('recurrent') or names")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; objects and callables are recorded by their name."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = _jsonable(value)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModuliConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; expected some of {sorted(known)}")
        data = dict(data)
        if isinstance(data.get("targets"), list):
            data["targets"] = tuple(data["targets"])
        if "prune_also" in data:
            data["prune_also"] = tuple(data["prune_also"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ModuliConfig":
        return cls.from_dict(json.loads(text))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModuliConfig) and self.to_dict() == other.to_dict()


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    spec = getattr(value, "spec", None)
    if isinstance(spec, dict):
        return _jsonable(spec)
    if isinstance(value, Callable):
        return getattr(value, "__qualname__", repr(value))
    return repr(value)


def config_from_kwargs(config: ModuliConfig | None, **kwargs: Any) -> ModuliConfig:
    """Merge explicit keyword arguments over a base config (kwargs win)."""
    base = {f.name: getattr(config, f.name) for f in fields(config)} if config else {}
    base.update(kwargs)
    return ModuliConfig(**base)
