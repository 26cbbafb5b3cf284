"""Inhibitor functions f(d): from a distance matrix to penalty coefficients.

The coefficient of weight W_ij is ``f(d(e_i, e_j))``: large f makes a connection
expensive. Paper defaults: difference of Gaussians ``100 (exp(-d^2/5) - exp(-4 d^2))``,
inverted; diffusion ``d^2``; sinusoid ``50 + 50 cos(2d)``.

Inversion: with ``invert=True`` an inhibitor returns ``f_max - f(d)``, where ``f_max`` is the
largest value of f over the distance tensor it is given (differentiated like any other
term, so gradients are those of the penalty as written). The coefficients are then >= 0 and the largest values of f become the
cheapest connections.
"""

from __future__ import annotations

import abc
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import Tensor

from .manifolds import UnknownNameError

__all__ = [
    "Inhibitor",
    "DifferenceOfGaussians",
    "Ricker",
    "Diffusion",
    "Sinusoid",
    "Gaussian",
    "Identity",
    "Constant",
    "CallableInhibitor",
    "INHIBITORS",
    "register_inhibitor",
    "get_inhibitor",
]

InhibitorT = TypeVar("InhibitorT", bound=type)


@dataclass
class Inhibitor(abc.ABC):
    """Base class: subclasses are dataclasses implementing :meth:`profile`.

    Attributes:
        invert: return ``f_max - f`` (``f_max`` over the given tensor) instead of f.
    """

    name: ClassVar[str] = "inhibitor"
    invert: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.invert, bool):
            raise ValueError(f"invert must be True or False, got invert={self.invert!r}")
        for parameter in fields(self):
            value = getattr(self, parameter.name)
            if parameter.name != "invert" and isinstance(value, (int, float)) and not math.isfinite(value):
                raise ValueError(f"inhibitor {self.name!r} needs finite {parameter.name}, got {value!r}")

    @abc.abstractmethod
    def profile(self, distance: Tensor) -> Tensor:
        """The raw function f(d), elementwise, before any inversion."""

    def __call__(self, distance: Tensor) -> Tensor:
        values = self.profile(distance)
        if self.invert and values.numel():
            values = values.max() - values
        return values

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-able description; ``get_inhibitor(spec)`` rebuilds the inhibitor."""
        return {"name": self.name, **asdict(self)}


def _positive(inhibitor: Inhibitor, *names: str) -> None:
    for key in names:
        value = getattr(inhibitor, key)
        if value <= 0:
            raise ValueError(f"inhibitor {inhibitor.name!r} needs {key} > 0, got {key}={value!r}")


INHIBITORS: dict[str, type[Inhibitor]] = {}


def register_inhibitor(name: str) -> Callable[[InhibitorT], InhibitorT]:
    """Class decorator adding an :class:`Inhibitor` dataclass to :data:`INHIBITORS`.

    The class's ``name`` is set to ``name``, so its ``spec`` rebuilds it.

    Example:
        >>> @register_inhibitor("cubic")
        ... @dataclass
        ... class Cubic(Inhibitor):
        ...     def profile(self, distance):
        ...         return distance ** 3
        >>> get_inhibitor("cubic")(torch.tensor([2.0]))
        tensor([8.])
        >>> del INHIBITORS["cubic"]
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"an inhibitor name must be a non-empty string, got {name!r}")

    def decorate(cls: InhibitorT) -> InhibitorT:
        if not (isinstance(cls, type) and issubclass(cls, Inhibitor)):
            raise ValueError(f"register_inhibitor({name!r}) decorates Inhibitor subclasses, got {cls!r}")
        cls.name = name
        INHIBITORS[name] = cls
        return cls

    return decorate


@register_inhibitor("dog")
@dataclass
class DifferenceOfGaussians(Inhibitor):
    """Difference of Gaussians ``amplitude * (exp(-d^2 / wide) - exp(-d^2 / narrow))``.

    Paper default: ``100 (exp(-d^2/5) - exp(-4 d^2))`` inverted, so connections at distance
    about 1 are cheapest and both very near and far ones cost up to ``f_max``.

    Example:
        >>> d = torch.tensor([0.0, 1.0])
        >>> [round(v, 2) for v in DifferenceOfGaussians(invert=False)(d).tolist()]
        [0.0, 80.04]
        >>> [round(v, 2) for v in DifferenceOfGaussians()(d).tolist()]  # 80.04 - f
        [80.04, 0.0]
    """

    invert: bool = True
    amplitude: float = 100.0
    wide: float = 5.0
    narrow: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "wide", "narrow")

    def profile(self, distance: Tensor) -> Tensor:
        squared = distance * distance
        return self.amplitude * (torch.exp(-squared / self.wide) - torch.exp(-squared / self.narrow))


@register_inhibitor("ricker")
@dataclass
class Ricker(Inhibitor):
    """Mexican-hat (Ricker) wavelet ``amplitude * (1 - d^2/sigma^2) * exp(-d^2 / (2 sigma^2))``.

    Inverted by default: the raw wavelet is negative on its ring (``d > sigma``), and a
    negative coefficient would reward large weights there without bound. Inverted, the
    coefficients are >= 0: 0 at d = 0, largest on the ring at ``d = sqrt(3) sigma`` and about
    ``amplitude`` far away. ``sigma=1`` matches the length scale of the ``dog`` default on
    distances of order 0-10.

    Example:
        >>> d = torch.tensor([0.0, 1.0, 3.0 ** 0.5])
        >>> [round(v, 2) for v in Ricker(invert=False)(d).tolist()]
        [100.0, 0.0, -44.63]
        >>> [round(v, 2) for v in Ricker()(d).tolist()]
        [0.0, 100.0, 144.63]
    """

    invert: bool = True
    amplitude: float = 100.0
    sigma: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "sigma")

    def profile(self, distance: Tensor) -> Tensor:
        ratio = (distance / self.sigma) ** 2
        return self.amplitude * (1 - ratio) * torch.exp(-ratio / 2)


@register_inhibitor("diffusion")
@dataclass
class Diffusion(Inhibitor):
    """``scale * d^2``: the cost of a connection grows with its squared length.

    Example:
        >>> Diffusion()(torch.tensor([0.0, 3.0]))
        tensor([0., 9.])
    """

    scale: float = 1.0

    def profile(self, distance: Tensor) -> Tensor:
        return self.scale * distance * distance


@register_inhibitor("sinusoid")
@dataclass
class Sinusoid(Inhibitor):
    """``offset + amplitude * cos(frequency * d)``; paper default ``50 + 50 cos(2d)``.

    Example:
        >>> Sinusoid()(torch.tensor([0.0, math.pi / 2]))
        tensor([100.,   0.])
    """

    offset: float = 50.0
    amplitude: float = 50.0
    frequency: float = 2.0

    def profile(self, distance: Tensor) -> Tensor:
        return self.offset + self.amplitude * torch.cos(self.frequency * distance)


@register_inhibitor("gaussian")
@dataclass
class Gaussian(Inhibitor):
    """``amplitude * exp(-d^2 / (2 sigma^2))``; the default width is the authors' ``100 exp(-d^2/3)``.

    Inverted by default, so near connections are cheap and far ones cost up to ``f_max``
    (raw, the Gaussian would make near connections the expensive ones). A deliberate
    difference: the authors' ``small_gauss`` (adding_problem/regularizer.py:59-60, 15ef708)
    is inverted only with ``--invert``, which all their moduli runs pass.

    Example:
        >>> Gaussian(invert=False, sigma=1.0, amplitude=2.0)(torch.tensor([0.0]))
        tensor([2.])
        >>> Gaussian()(torch.tensor([0.0, 100.0]))
        tensor([  0., 100.])
    """

    invert: bool = True
    amplitude: float = 100.0
    sigma: float = 1.5 ** 0.5  # 2 sigma^2 = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "sigma")

    def profile(self, distance: Tensor) -> Tensor:
        return self.amplitude * torch.exp(-distance * distance / (2 * self.sigma ** 2))


@register_inhibitor("identity")
@dataclass
class Identity(Inhibitor):
    """``f(d) = d``.

    Example:
        >>> Identity()(torch.tensor([0.5, 2.0]))
        tensor([0.5000, 2.0000])
    """

    def profile(self, distance: Tensor) -> Tensor:
        return distance


@register_inhibitor("constant")
@dataclass
class Constant(Inhibitor):
    """``f(d) = value`` everywhere: plain L1 regularization.

    Example:
        >>> Constant(value=3.0)(torch.zeros(2, 2))
        tensor([[3., 3.],
                [3., 3.]])
    """

    value: float = 1.0

    def profile(self, distance: Tensor) -> Tensor:
        return torch.full_like(distance, self.value)


@dataclass
class CallableInhibitor(Inhibitor):
    """Any user function ``distance -> coefficients`` (same shape); not inverted by default.

    Its ``spec`` records the function's qualified name for the record; a callable cannot
    be rebuilt from JSON, so pass the function itself again.

    Example:
        >>> def halve(distance):
        ...     return distance / 2
        >>> f = CallableInhibitor(function=halve)
        >>> f(torch.tensor([4.0])), f.spec["function"].rsplit(".", 1)[-1]
        (tensor([2.]), 'halve')
    """

    name: ClassVar[str] = "callable"
    function: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not callable(self.function):
            raise ValueError(f"CallableInhibitor needs a callable function, got {self.function!r}")

    def profile(self, distance: Tensor) -> Tensor:
        values = self.function(distance)
        if not isinstance(values, Tensor) or values.shape != distance.shape:
            shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(f"inhibitor function {self.qualified_name} returned {shape} for distances of "
                             f"shape {tuple(distance.shape)}; it must return a tensor of the same shape")
        return values

    @property
    def qualified_name(self) -> str:
        """``module.qualname`` of the function (its repr when it has none)."""
        qualname = getattr(self.function, "__qualname__", None)
        if qualname is None:
            return repr(self.function)
        module = getattr(self.function, "__module__", None)
        return f"{module}.{qualname}" if module else qualname

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "function": self.qualified_name, "invert": self.invert}


_ALTERNATIVES = "or a callable distance -> coefficients, or an Inhibitor instance"


def get_inhibitor(inhibitor: str | Callable[[Tensor], Tensor] | Inhibitor | dict,
                  invert: bool | None = None, **params: Any) -> Inhibitor:
    """An inhibitor from a registered name, a spec dict, an instance, a class or any callable.

    Args:
        inhibitor: a name in :data:`INHIBITORS`, a ``spec`` dict, an :class:`Inhibitor`
            (returned as is unless ``invert``/params are given, then a modified copy), an
            Inhibitor subclass, or a function ``distance -> coefficients``.
        invert: ``None`` keeps the inhibitor's default (True for dog, ricker, gaussian).
        **params: the inhibitor's parameters, e.g. ``sigma=2.0``.

    Raises:
        UnknownNameError: the name is not registered (the message lists the names).
        ValueError: unknown or invalid parameters.

    Example:
        >>> get_inhibitor("sinusoid", frequency=1.0)
        Sinusoid(invert=False, offset=50.0, amplitude=50.0, frequency=1.0)
        >>> get_inhibitor(get_inhibitor("dog").spec) == get_inhibitor("dog")
        True
    """
    options = dict(params) if invert is None else {**params, "invert": invert}
    if isinstance(inhibitor, Inhibitor):
        return _build(lambda **kw: replace(inhibitor, **kw), repr(inhibitor), options) if options else inhibitor
    if isinstance(inhibitor, dict):
        spec = dict(inhibitor)
        if "name" not in spec:
            raise ValueError(f"an inhibitor spec needs a 'name' key, got {inhibitor!r}")
        return get_inhibitor(spec.pop("name"), **{**spec, **options})
    if isinstance(inhibitor, type) and issubclass(inhibitor, Inhibitor):
        return _build(inhibitor, inhibitor.__name__, options)
    if isinstance(inhibitor, str):
        if inhibitor == CallableInhibitor.name:
            raise ValueError(f"a callable inhibitor ({params.get('function', 'unknown function')}) cannot be "
                             "rebuilt from its spec; pass the function itself to get_inhibitor")
        if inhibitor not in INHIBITORS:
            raise UnknownNameError.for_name("inhibitor", inhibitor, INHIBITORS, _ALTERNATIVES)
        return _build(INHIBITORS[inhibitor], repr(inhibitor), options)
    if callable(inhibitor):
        if params:
            raise ValueError(f"parameters {params} cannot apply to the function {inhibitor!r}; "
                             "bind them in the function (e.g. functools.partial)")
        return CallableInhibitor(invert=bool(invert), function=inhibitor)
    raise ValueError(f"expected an inhibitor name, callable, spec dict or Inhibitor, got {inhibitor!r}")


def _build(factory: Callable[..., Inhibitor], label: str, options: dict[str, Any]) -> Inhibitor:
    try:
        return factory(**options)
    except TypeError as error:
        raise ValueError(f"bad parameters {options} for inhibitor {label}: {error}") from None

