"""Manifolds on which neurons are embedded: sampling, pairwise distance, retraction.

Paper defaults (facts from the authors' code): the torus is [0, 10)^n with periodic
distance; circle and sphere are unit vectors with distance ``5 * arccos<a, b>``; the Klein
bottle is [0, 10)^2 with the glide-reflection identification; R^n is sampled in [0, 10)^n.

Every ``distance`` is differentiable where the manifold is smooth and has a finite
gradient (zero) where two points coincide, so a full pairwise matrix with a zero
diagonal can be backpropagated through without NaNs.
"""

from __future__ import annotations

import abc
import difflib
import math
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch
from torch import Tensor

__all__ = [
    "UnknownNameError",
    "Manifold",
    "Torus",
    "Circle",
    "Sphere",
    "KleinBottle",
    "Euclidean",
    "ProductManifold",
    "MANIFOLDS",
    "register_manifold",
    "get_manifold",
]

_EPS = 1e-12
FactoryT = TypeVar("FactoryT", bound=Callable[..., "Manifold"])


class UnknownNameError(ValueError):
    """A name that is not in a registry; the message lists the registered names.

    Example:
        >>> error = UnknownNameError.for_name("manifold", "toruss", ["torus", "klein"])
        >>> str(error)
        "unknown manifold 'toruss'; expected one of klein, torus (did you mean 'torus'?)"
    """

    @classmethod
    def for_name(cls, kind: str, name: object, choices: Iterable[str], alternatives: str = "") -> "UnknownNameError":
        """The error for ``name`` of registry ``kind``, listing ``choices`` and ``alternatives``."""
        choices = sorted(choices)
        message = f"unknown {kind} {name!r}; expected one of {', '.join(choices)}"
        if alternatives:
            message += f", {alternatives}"
        close = difflib.get_close_matches(str(name), choices, n=1)
        if close:
            message += f" (did you mean {close[0]!r}?)"
        return cls(message)


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with gradient 0 (not inf or NaN) where x == 0."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def _wrap(x: Tensor, period: float) -> Tensor:
    """x modulo period, in [0, period): remainder can round up to period itself."""
    wrapped = torch.remainder(x, period)
    return torch.where(wrapped >= period, torch.zeros_like(wrapped), wrapped)


def _positive(owner: str, **values: float) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{owner} needs {key} to be a finite number > 0, got {key}={value!r}")


def _dimension(owner: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner} needs {key} to be an integer >= 1, got {key}={value!r}")
    return value


class Manifold(abc.ABC):
    """A space to embed neurons in; subclass it and implement the three abstract methods.

    Attributes:
        name: short name (the registry name for the built-in manifolds).
        dim: number of coordinates of a point.
    """

    name: str = "manifold"
    dim: int = 0

    @abc.abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` points drawn uniformly from the manifold's natural measure, shape (n, dim)."""

    @abc.abstractmethod
    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Pairwise distances, (n, dim) x (m, dim) -> (n, m); gradient 0 where a point meets itself."""

    @abc.abstractmethod
    def retract(self, x: Tensor) -> Tensor:
        """Points put back on the manifold (e.g. after a gradient step), same shape as ``x``."""

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-able description; ``get_manifold(**spec)`` rebuilds the manifold."""
        return {"name": self.name}

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.spec.items() if key != "name")
        return f"{type(self).__name__}({options})"

    def _check(self, *points: Tensor) -> None:
        for x in points:
            if x.dim() != 2 or x.shape[1] != self.dim:
                raise ValueError(f"{self!r} expects points of shape (n, {self.dim}), got {tuple(x.shape)}")


def _check_count(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"sample needs a number of points n >= 0, got n={n!r}")
    return n


MANIFOLDS: dict[str, Callable[..., Manifold]] = {}


def register_manifold(name: str) -> Callable[[FactoryT], FactoryT]:
    """Decorator adding a manifold class or factory to :data:`MANIFOLDS` under ``name``.

    Re-registering a name replaces the earlier entry. Names may not contain ``*``, which
    separates the factors of a product.

    Example:
        >>> @register_manifold("unit_torus")
        ... def unit_torus(dim: int = 2) -> Torus:
        ...     return Torus(dim=dim, period=1.0)
        >>> get_manifold("unit_torus").period
        1.0
        >>> del MANIFOLDS["unit_torus"]
    """
    if not isinstance(name, str) or not name or "*" in name:
        raise ValueError(f"a manifold name must be a non-empty string without '*', got {name!r}")

    def decorate(factory: FactoryT) -> FactoryT:
        MANIFOLDS[name] = factory
        return factory

    return decorate


class Torus(Manifold):
    """The flat torus [0, period)^dim with periodic distance.

    ``d(a, b) = sqrt(sum_k min(|a_k - b_k|, period - |a_k - b_k|)^2)`` (coordinates taken
    modulo the period).

    Example:
        >>> torus = Torus(dim=1)
        >>> float(torus.distance(torch.tensor([[0.5]]), torch.tensor([[9.5]])))
        1.0
        >>> Torus(dim=2).retract(torch.tensor([[12.5, -1.0]]))
        tensor([[2.5000, 9.0000]])
    """

    def __init__(self, dim: int = 2, period: float = 10.0) -> None:
        self.dim = _dimension("torus", "dim", dim)
        _positive("torus", period=period)
        self.period = float(period)
        self.name = "torus"

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return _wrap(torch.rand(_check_count(n), self.dim, generator=generator) * self.period, self.period)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        self._check(a, b)
        delta = torch.remainder(a[:, None, :] - b[None, :, :], self.period)
        delta = torch.minimum(delta, self.period - delta)
        return _safe_sqrt((delta * delta).sum(-1))

    def retract(self, x: Tensor) -> Tensor:
        return _wrap(x, self.period)

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": "torus", "dim": self.dim, "period": self.period}


class Sphere(Manifold):
    """The unit sphere S^n in R^(n+1) with distance ``scale * arccos<a, b>``.

    The angle is computed as ``2 atan2(|a - b|, |a + b|)``, which equals the arccos on unit
    vectors, is exactly 0 on the diagonal and stays well conditioned near 0 and pi where
    arccos is not. Inputs are normalised first, so points slightly off the sphere (after a
    gradient step) are measured by their projection.

    Example:
        >>> sphere = Sphere(2)
        >>> round(float(sphere.distance(torch.tensor([[1., 0, 0]]), torch.tensor([[0., 1, 0]]))), 4)
        7.854
        >>> sphere.retract(torch.tensor([[3.0, 0.0, 4.0]]))
        tensor([[0.6000, 0.0000, 0.8000]])
    """

    def __init__(self, n: int = 2, scale: float = 5.0) -> None:
        self.n = _dimension("sphere", "n", n)
        _positive("sphere", scale=scale)
        self.dim, self.scale, self.name = self.n + 1, float(scale), "sphere"

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        # A standard normal vector is rotation invariant, so its direction is uniform.
        return self.retract(torch.randn(_check_count(n), self.dim, generator=generator))

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        self._check(a, b)
        a, b = self.retract(a), self.retract(b)
        difference = a[:, None, :] - b[None, :, :]
        total = a[:, None, :] + b[None, :, :]
        chord = _safe_sqrt((difference * difference).sum(-1))
        antichord = _safe_sqrt((total * total).sum(-1))
        return self.scale * 2 * torch.atan2(chord, antichord)

    def retract(self, x: Tensor) -> Tensor:
        return x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": "sphere", "n": self.n, "scale": self.scale}


class Circle(Sphere):
    """The unit circle S^1 in R^2 with distance ``scale * arccos<a, b>``.

    Example:
        >>> circle = Circle()
        >>> round(float(circle.distance(torch.tensor([[1., 0]]), torch.tensor([[-1., 0]]))), 4)
        15.708
    """

    def __init__(self, scale: float = 5.0) -> None:
        super().__init__(1, scale)
        self.name = "circle"

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": "circle", "scale": self.scale}


class KleinBottle(Manifold):
    """[0, L)^2 with (x, y) ~ (x, y + L) and the glide reflection (x, y) ~ (x + L, L - y).

    The distance is the flat quotient distance: the least Euclidean distance from ``a`` to
    an image of ``b`` under the identifications. Both points are first retracted into the
    fundamental domain, where the nine images with x shifted by -L, 0, L (odd shifts
    reflect y) and y shifted by -L, 0, L contain the nearest one.

    Retraction convention: x is wrapped into [0, L); each time x crosses the seam (an odd
    number of times in total) y is replaced by ``L - y``; then y is wrapped into [0, L).

    Example:
        >>> klein = KleinBottle()
        >>> float(klein.distance(torch.tensor([[1.0, 2.0]]), torch.tensor([[11.0, 8.0]])))
        0.0
        >>> klein.retract(torch.tensor([[12.0, 3.0]]))
        tensor([[2., 7.]])
    """

    def __init__(self, period: float = 10.0) -> None:
        _positive("klein", period=period)
        self.period, self.dim, self.name = float(period), 2, "klein"

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return _wrap(torch.rand(_check_count(n), 2, generator=generator) * self.period, self.period)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        self._check(a, b)
        a, b = self.retract(a), self.retract(b)
        period = self.period
        dx = a[:, None, 0] - b[None, :, 0]
        nearest = None
        for x_shift in (-1, 0, 1):
            image_y = period - b[:, 1] if x_shift % 2 else b[:, 1]
            squared_x = (dx - x_shift * period) ** 2
            for y_shift in (-1, 0, 1):
                dy = a[:, None, 1] - (image_y[None, :] + y_shift * period)
                squared = squared_x + dy * dy
                nearest = squared if nearest is None else torch.minimum(nearest, squared)
        return _safe_sqrt(nearest)

    def retract(self, x: Tensor) -> Tensor:
        period = self.period
        turns = torch.floor(x[..., 0] / period)
        flipped = torch.remainder(turns, 2) == 1
        y = torch.where(flipped, period - x[..., 1], x[..., 1])
        return torch.stack([_wrap(x[..., 0] - turns * period, period), _wrap(y, period)], dim=-1)

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": "klein", "period": self.period}


class Euclidean(Manifold):
    """R^dim with Euclidean distance; samples uniform in the box [0, side)^dim, or ``side * N(0, 1)``
    per coordinate with ``normal=True``.

    Example:
        >>> float(Euclidean(3).distance(torch.tensor([[0., 0, 0]]), torch.tensor([[1., 2, 2]])))
        3.0
    """

    def __init__(self, dim: int, side: float = 10.0, normal: bool = False) -> None:
        self.dim = _dimension("euclidean", "dim", dim)
        _positive("euclidean", side=side)
        if not isinstance(normal, bool):
            raise ValueError(f"euclidean normal must be True or False, got normal={normal!r}")
        self.side, self.normal, self.name = float(side), normal, "euclidean"

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        draw = torch.randn if self.normal else torch.rand
        return draw(_check_count(n), self.dim, generator=generator) * self.side

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        self._check(a, b)
        delta = a[:, None, :] - b[None, :, :]
        return _safe_sqrt((delta * delta).sum(-1))

    def retract(self, x: Tensor) -> Tensor:
        return x

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": "euclidean", "dim": self.dim, "side": self.side, "normal": self.normal}


class ProductManifold(Manifold):
    """M1 x M2 x ...: coordinates concatenated, distance ``sqrt(sum_k d_k^2)``.

    Args:
        factors: two or more manifolds, or names/specs that :func:`get_manifold` accepts.

    Example:
        >>> product = ProductManifold(["circle", "torus"])
        >>> product.name, product.dim
        ('circle*torus', 4)
        >>> a = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
        >>> b = torch.tensor([[1.0, 0.0, 3.0, 9.0]])
        >>> round(float(product.distance(a, b)), 4)  # circle 0, torus sqrt(3^2 + 1^2)
        3.1623
    """

    def __init__(self, factors: Sequence[Manifold | str | dict]) -> None:
        if isinstance(factors, (str, Manifold)) or len(factors) < 2:
            raise ValueError(f"a product needs a list of at least two factors, got {factors!r}")
        self.factors = [get_manifold(factor) for factor in factors]
        self.dim = sum(factor.dim for factor in self.factors)
        self.name = "*".join(factor.name for factor in self.factors)

    def _split(self, x: Tensor) -> tuple[Tensor, ...]:
        return torch.split(x, [factor.dim for factor in self.factors], dim=-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.cat([factor.sample(n, generator) for factor in self.factors], dim=-1)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        self._check(a, b)
        parts = zip(self.factors, self._split(a), self._split(b))
        return _safe_sqrt(sum(factor.distance(x, y) ** 2 for factor, x, y in parts))

    def retract(self, x: Tensor) -> Tensor:
        return torch.cat([factor.retract(part) for factor, part in zip(self.factors, self._split(x))], dim=-1)

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "factors": [factor.spec for factor in self.factors]}


register_manifold("torus")(Torus)
register_manifold("circle")(Circle)
register_manifold("sphere")(Sphere)
register_manifold("klein")(KleinBottle)


@register_manifold("torus6")
def _torus6(dim: int = 6, period: float = 10.0) -> Torus:
    return Torus(dim=dim, period=period)


@register_manifold("s3")
def _s3(n: int = 3, scale: float = 10.0) -> Sphere:
    # 10 * arccos: the authors' fixed S^3 is 2 * sphere_distance (adding_problem/regularizer.py:52, 166, 15ef708).
    return Sphere(n=n, scale=scale)


@register_manifold("r3")
def _r3(dim: int = 3, side: float = 10.0, normal: bool = True) -> Euclidean:
    # 10 * randn(n, 3), as the authors' trained R^3 embedding (adding_problem/main.py:152, 15ef708).
    return Euclidean(dim=dim, side=side, normal=normal)


@register_manifold("euclidean")
def _euclidean(dim: int | None = None, side: float = 10.0, normal: bool = False) -> Euclidean:
    if dim is None:
        raise ValueError("manifold 'euclidean' needs dim=, e.g. get_manifold('euclidean', dim=5); 'r3' is R^3")
    return Euclidean(dim=dim, side=side, normal=normal)


_ALTERNATIVES = "or a product such as 'circle*sphere', or a Manifold instance"


def get_manifold(name: str | Manifold | dict, **options: Any) -> Manifold:
    """A manifold from a registered name, a product string, a spec dict or an instance.

    Args:
        name: a name in :data:`MANIFOLDS`; factors joined by ``*`` (``"circle*sphere"``,
            each factor with its defaults); a ``spec`` dict; or a :class:`Manifold`
            instance, returned as is.
        **options: constructor options of a registered manifold (``dim=``, ``period=``,
            ``scale=``, ``side=``); ``factors=`` (a list of specs) builds a product.

    Raises:
        UnknownNameError: the name (or a factor's name) is not registered.
        ValueError: bad options, e.g. ``dim=0``.

    Example:
        >>> get_manifold("torus", dim=3)
        Torus(dim=3, period=10.0)
        >>> get_manifold(**get_manifold("circle*s3").spec).dim
        6
        >>> get_manifold("toruss")
        Traceback (most recent call last):
        ...
        moduli_transform.manifolds.UnknownNameError: unknown manifold 'toruss'; expected one of circle, euclidean, klein, r3, s3, sphere, torus, torus6, or a product such as 'circle*sphere', or a Manifold instance (did you mean 'torus'?)
    """
    if isinstance(name, Manifold):
        if options:
            raise ValueError(f"options {options} were given with the instance {name!r}; configure the instance instead")
        return name
    if isinstance(name, dict):
        spec = dict(name)
        if "name" not in spec and "factors" not in spec:
            raise ValueError(f"a manifold spec needs a 'name' key, got {name!r}")
        return get_manifold(spec.pop("name", "product"), **{**spec, **options})
    if not isinstance(name, str):
        raise ValueError(f"expected a manifold name, spec dict or Manifold instance, got {name!r}")
    if "factors" in options:
        factors = options.pop("factors")
        if options:
            raise ValueError(f"a product takes only factors=, got also {options}")
        return ProductManifold(factors)
    if "*" in name:
        if options:
            raise ValueError(f"options {options} cannot apply to the product {name!r}; "
                             "pass factors=[spec, ...] or build ProductManifold([...]) instead")
        return ProductManifold([part.strip() for part in name.split("*")])
    if name not in MANIFOLDS:
        raise UnknownNameError.for_name("manifold", name, MANIFOLDS, _ALTERNATIVES)
    try:
        return MANIFOLDS[name](**options)
    except TypeError as error:
        raise ValueError(f"bad options {options} for manifold {name!r}: {error}") from None
