"""Inhibitor functions f(d): from a distance matrix to penalty coefficients.

Paper defaults: difference of Gaussians ``100 * (exp(-d^2/5) - exp(-4 d^2))`` inverted
(``max - f``, so near neurons are cheap and far ones expensive); diffusion ``d^2``;
sinusoid ``50 + 50 cos(2d)``. ``invert`` subtracts f from its maximum over the given
distance matrix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .manifolds import UnknownNameError

__all__ = ["Inhibitor", "DifferenceOfGaussians", "Ricker", "Diffusion", "Sinusoid", "Gaussian",
           "Identity", "Constant", "CallableInhibitor", "INHIBITORS", "register_inhibitor", "get_inhibitor"]


@dataclass
class Inhibitor:
    """Base class: subclasses implement :meth:`profile`; ``invert`` applies ``max - f``."""

    invert: bool = False

    def profile(self, distance: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, distance: Tensor) -> Tensor:
        values = self.profile(distance)
        if self.invert:
            values = values.max() - values
        return values

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": getattr(self, "registry_name", type(self).__name__), **asdict(self)}


INHIBITORS: dict[str, type[Inhibitor]] = {}


def register_inhibitor(name: str):
    """Class decorator adding an inhibitor to the registry under ``name``."""

    def decorate(cls):
        cls.registry_name = name
        INHIBITORS[name] = cls
        return cls

    return decorate


@register_inhibitor("dog")
@dataclass
class DifferenceOfGaussians(Inhibitor):
    """``amplitude * (exp(-d^2/narrow) - exp(-d^2/wide_inverse))``; paper default inverted.

    Example:
        >>> d = torch.tensor([0.0, 1.0])
        >>> [round(v, 2) for v in DifferenceOfGaussians(invert=False)(d).tolist()]
        [0.0, 80.04]
    """

    invert: bool = True
    amplitude: float = 100.0
    wide: float = 5.0
    narrow: float = 0.25

    def profile(self, distance: Tensor) -> Tensor:
        squared = distance * distance
        return self.amplitude * (torch.exp(-squared / self.wide) - torch.exp(-squared / self.narrow))


@register_inhibitor("ricker")
@dataclass
class Ricker(Inhibitor):
    """Mexican-hat wavelet ``amplitude * (1 - d^2/sigma^2) exp(-d^2 / (2 sigma^2))``, inverted
    by default so that the excitatory centre is cheap and the inhibitory ring expensive."""

    invert: bool = True
    amplitude: float = 100.0
    sigma: float = 2.0

    def profile(self, distance: Tensor) -> Tensor:
        ratio = (distance / self.sigma) ** 2
        return self.amplitude * (1 - ratio) * torch.exp(-ratio / 2)


@register_inhibitor("diffusion")
@dataclass
class Diffusion(Inhibitor):
    """``scale * d^2``: the cost of a connection grows with its squared length."""

    scale: float = 1.0

    def profile(self, distance: Tensor) -> Tensor:
        return self.scale * distance * distance


@register_inhibitor("sinusoid")
@dataclass
class Sinusoid(Inhibitor):
    """``offset + amplitude * cos(frequency * d)``; paper default ``50 + 50 cos(2d)``."""

    offset: float = 50.0
    amplitude: float = 50.0
    frequency: float = 2.0

    def profile(self, distance: Tensor) -> Tensor:
        return self.offset + self.amplitude * torch.cos(self.frequency * distance)


@register_inhibitor("gaussian")
@dataclass
class Gaussian(Inhibitor):
    """``amplitude * exp(-d^2 / (2 sigma^2))``, inverted by default (far is expensive)."""

    invert: bool = True
    amplitude: float = 100.0
    sigma: float = 2.0

    def profile(self, distance: Tensor) -> Tensor:
        return self.amplitude * torch.exp(-distance * distance / (2 * self.sigma ** 2))


@register_inhibitor("identity")
@dataclass
class Identity(Inhibitor):
    """``f(d) = d``."""

    def profile(self, distance: Tensor) -> Tensor:
        return distance


@register_inhibitor("constant")
@dataclass
class Constant(Inhibitor):
    """``f(d) = value`` everywhere: plain L1."""

    value: float = 1.0

    def profile(self, distance: Tensor) -> Tensor:
        return torch.full_like(distance, self.value)


@dataclass
class CallableInhibitor(Inhibitor):
    """Any user function ``distance -> coefficients``."""

    function: Callable[[Tensor], Tensor] | None = None

    def profile(self, distance: Tensor) -> Tensor:
        return self.function(distance)

    @property
    def spec(self) -> dict[str, Any]:
        name = getattr(self.function, "__qualname__", repr(self.function))
        return {"name": "callable", "function": name, "invert": self.invert}


def get_inhibitor(inhibitor: str | Callable | Inhibitor | dict, invert: bool | None = None, **params: Any) -> Inhibitor:
    """An inhibitor from a registered name, a spec dict, an instance or any callable.

    Raises:
        UnknownNameError: the name is not registered (the message lists the names).
    """
    if isinstance(inhibitor, Inhibitor):
        return inhibitor
    if isinstance(inhibitor, dict):
        spec = dict(inhibitor)
        return get_inhibitor(spec.pop("name"), **{**spec, **params, **({} if invert is None else {"invert": invert})})
    if callable(inhibitor):
        return CallableInhibitor(invert=bool(invert), function=inhibitor)
    if inhibitor not in INHIBITORS:
        raise UnknownNameError(
            f"unknown inhibitor {inhibitor!r}; expected one of {', '.join(sorted(INHIBITORS))}, "
            "or a callable distance -> coefficients")
    if invert is not None:
        params["invert"] = invert
    try:
        return INHIBITORS[inhibitor](**params)
    except TypeError as error:
        raise ValueError(f"bad parameters {params} for inhibitor {inhibitor!r}: {error}") from None
