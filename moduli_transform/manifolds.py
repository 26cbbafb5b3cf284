"""Manifolds on which neurons are embedded: sampling, pairwise distance, retraction.

Paper defaults (facts from the authors' code): the torus is [0, 10)^n with periodic
distance; circle and sphere are unit vectors with distance 5 * arccos<a, b>; the Klein
bottle is [0, 10)^2 with the glide-reflection identification.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["Manifold", "Torus", "Sphere", "Circle", "KleinBottle", "Euclidean", "ProductManifold",
           "MANIFOLDS", "register_manifold", "get_manifold", "UnknownNameError"]

_EPS = 1e-12


class UnknownNameError(ValueError):
    """A name that is not in a registry."""


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with gradient 0 (not inf/NaN) where x == 0."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


class Manifold(abc.ABC):
    """A space to embed neurons in; subclass and implement the three methods."""

    name: str = "manifold"
    dim: int = 0

    @abc.abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` points, uniform with respect to the manifold's measure: (n, dim)."""

    @abc.abstractmethod
    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Pairwise distances (n, dim) x (m, dim) -> (n, m)."""

    @abc.abstractmethod
    def retract(self, x: Tensor) -> Tensor:
        """Points put back on the manifold after a gradient step."""

    @property
    def spec(self) -> dict[str, Any]:
        """JSON description from which :func:`get_manifold` rebuilds this manifold."""
        return {"name": self.name}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.spec.items() if k != "name")
        return f"{type(self).__name__}({options})"


MANIFOLDS: dict[str, Callable[..., Manifold]] = {}


def register_manifold(name: str):
    """Decorator adding a manifold factory to the registry under ``name``."""

    def decorate(factory):
        MANIFOLDS[name] = factory
        return factory

    return decorate


class Torus(Manifold):
    """[0, period)^dim with periodic (flat torus) distance.

    Example:
        >>> torus = Torus(dim=1)
        >>> float(torus.distance(torch.tensor([[0.5]]), torch.tensor([[9.5]])))
        1.0
    """

    def __init__(self, dim: int = 2, period: float = 10.0) -> None:
        if int(dim) < 1 or period <= 0:
            raise ValueError(f"torus needs dim >= 1 and period > 0, got dim={dim}, period={period}")
        self.dim, self.period, self.name = int(dim), float(period), "torus"

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.rand(n, self.dim, generator=generator) * self.period

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        delta = torch.remainder(a[:, None, :] - b[None, :, :], self.period)
        delta = torch.minimum(delta, self.period - delta)
        return _safe_sqrt((delta * delta).sum(-1))

    def retract(self, x: Tensor) -> Tensor:
        return torch.remainder(x, self.period)

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": "torus", "dim": self.dim, "period": self.period}


class Sphere(Manifold):
    """Unit sphere S^n in R^(n+1) with distance ``scale * arccos<a, b>``.

    Example:
        >>> s = Sphere(2)
        >>> round(float(s.distance(torch.tensor([[1., 0, 0]]), torch.tensor([[0., 1, 0]]))), 4)
        7.854
    """

    def __init__(self, n: int = 2, scale: float = 5.0) -> None:
        if int(n) < 1 or scale <= 0:
            raise ValueError(f"sphere needs n >= 1 and scale > 0, got n={n}, scale={scale}")
        self.n, self.dim, self.scale, self.name = int(n), int(n) + 1, float(scale), "sphere"

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.retract(torch.randn(n, self.dim, generator=generator))

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        # scale * arccos<a, b>, computed as 2 asin(chord / 2): exact 0 on the diagonal in
        # float32 (arccos of a rounded 1 - 6e-8 is 3e-4) and a finite gradient there.
        a, b = self.retract(a), self.retract(b)
        delta = a[:, None, :] - b[None, :, :]
        half_chord = _safe_sqrt((delta * delta).sum(-1)) / 2
        inner = half_chord.clamp(max=1.0 - 1e-7)  # asin has an infinite slope at 1
        angle = 2 * (torch.asin(inner) + (torch.asin(half_chord.clamp(max=1.0)) - torch.asin(inner)).detach())
        return self.scale * angle

    def retract(self, x: Tensor) -> Tensor:
        return x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": "sphere", "n": self.n, "scale": self.scale}


class Circle(Sphere):
    """Unit circle in R^2 with distance ``scale * arccos<a, b>`` (S^1)."""

    def __init__(self, scale: float = 5.0) -> None:
        super().__init__(1, scale)
        self.name = "circle"

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": "circle", "scale": self.scale}


class KleinBottle(Manifold):
    """[0, L)^2 with (x, y) ~ (x, y + L) and the glide reflection (x, y) ~ (x + L, L - y).

    Example:
        >>> k = KleinBottle()
        >>> float(k.distance(torch.tensor([[1.0, 2.0]]), torch.tensor([[11.0, 8.0]])))
        0.0
    """

    def __init__(self, period: float = 10.0) -> None:
        if period <= 0:
            raise ValueError(f"klein needs period > 0, got {period}")
        self.period, self.dim, self.name = float(period), 2, "klein"

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.rand(n, 2, generator=generator) * self.period

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = self.retract(a), self.retract(b)
        L = self.period
        dx = a[:, None, 0] - b[None, :, 0]
        best = None
        # Images of b: x shifted by k*L (k in -1..1); odd k reflects y; y shifted by l*L.
        for k in (-1, 0, 1):
            bx = dx - k * L
            by = (L - b[:, 1]) if k % 2 else b[:, 1]
            for l in (-1, 0, 1):
                dy = a[:, None, 1] - (by[None, :] + l * L)
                squared = bx * bx + dy * dy
                best = squared if best is None else torch.minimum(best, squared)
        return _safe_sqrt(best)

    def retract(self, x: Tensor) -> Tensor:
        L = self.period
        turns = torch.floor(x[..., 0] / L)
        xr = x[..., 0] - turns * L
        flipped = torch.remainder(turns, 2) == 1
        y = torch.where(flipped, L - x[..., 1], x[..., 1])
        return torch.stack([xr, torch.remainder(y, L)], dim=-1)

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": "klein", "period": self.period}


class Euclidean(Manifold):
    """R^dim with Euclidean distance; samples uniform in the box [0, side)^dim."""

    def __init__(self, dim: int = 3, side: float = 10.0) -> None:
        if int(dim) < 1 or side <= 0:
            raise ValueError(f"euclidean needs dim >= 1 and side > 0, got dim={dim}, side={side}")
        self.dim, self.side, self.name = int(dim), float(side), "euclidean"

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.rand(n, self.dim, generator=generator) * self.side

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        delta = a[:, None, :] - b[None, :, :]
        return _safe_sqrt((delta * delta).sum(-1))

    def retract(self, x: Tensor) -> Tensor:
        return x

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": "euclidean", "dim": self.dim, "side": self.side}


class ProductManifold(Manifold):
    """M1 x M2 x ...: coordinates concatenated, distance sqrt(sum of squared distances)."""

    def __init__(self, factors: list[Manifold]) -> None:
        if len(factors) < 2:
            raise ValueError(f"a product needs at least two factors, got {len(factors)}")
        self.factors = list(factors)
        self.dim = sum(f.dim for f in self.factors)
        self.name = "*".join(f.name for f in self.factors)

    def _split(self, x: Tensor) -> list[Tensor]:
        return list(torch.split(x, [f.dim for f in self.factors], dim=-1))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.cat([f.sample(n, generator) for f in self.factors], dim=-1)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        squared = sum(f.distance(x, y) ** 2 for f, x, y in zip(self.factors, self._split(a), self._split(b)))
        return _safe_sqrt(squared)

    def retract(self, x: Tensor) -> Tensor:
        return torch.cat([f.retract(p) for f, p in zip(self.factors, self._split(x))], dim=-1)

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "factors": [f.spec for f in self.factors]}


register_manifold("torus")(lambda **kw: Torus(**{"dim": 2, **kw}))
register_manifold("torus6")(lambda **kw: Torus(**{"dim": 6, **kw}))
register_manifold("circle")(Circle)
register_manifold("sphere")(lambda **kw: Sphere(**{"n": 2, **kw}))
register_manifold("s3")(lambda **kw: Sphere(**{"n": 3, **kw}))
register_manifold("klein")(KleinBottle)
register_manifold("r3")(lambda **kw: Euclidean(**{"dim": 3, **kw}))
register_manifold("euclidean")(Euclidean)


def get_manifold(manifold: str | Manifold | dict, **options: Any) -> Manifold:
    """A manifold from a registered name, a product string ``"circle*sphere"``, a spec dict
    or an instance (returned as is).

    Raises:
        UnknownNameError: the name (or a factor's name) is not registered.
    """
    if isinstance(manifold, Manifold):
        return manifold
    if isinstance(manifold, dict):
        spec = dict(manifold)
        if "factors" in spec:
            return ProductManifold([get_manifold(f) for f in spec["factors"]])
        name = spec.pop("name")
        return get_manifold(name, **{**spec, **options})
    if isinstance(manifold, str) and "*" in manifold:
        return ProductManifold([get_manifold(part.strip()) for part in manifold.split("*")])
    if manifold not in MANIFOLDS:
        raise UnknownNameError(
            f"unknown manifold {manifold!r}; expected one of {', '.join(sorted(MANIFOLDS))}, "
            "or a product such as 'circle*sphere', or a Manifold instance")
    try:
        return MANIFOLDS[manifold](**options)
    except TypeError as error:
        raise ValueError(f"bad options {options} for manifold {manifold!r}: {error}") from None
