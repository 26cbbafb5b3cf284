"""Orderings of neurons along their manifold: close on the manifold = close in index.

Moduli regularization keeps connections between neurons that are near each other on the
manifold, but neurons are numbered at random.  An ordering (a Hilbert curve over torus
coordinates, the angle on a circle, a nearest-neighbour chain otherwise) renumbers them so
that neighbours get neighbouring indices; tile pruning (:mod:`moduli_transform.pruning`)
and the block-sparse kernels of :mod:`moduli_transform.export.tiles` build on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ORDERINGS", "OrderingError", "register_ordering", "order_neurons"]


class OrderingError(ValueError):
    """Unknown ordering name, or coordinates of the wrong shape for an ordering."""


ORDERINGS: dict[str, Callable[[Tensor], Tensor]] = {}


def register_ordering(name: str) -> Callable[[Callable], Callable]:
    """Decorator adding ``embedding (n, dim) -> permutation (n,)`` to :data:`ORDERINGS`."""

    def add(function: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        ORDERINGS[name] = function
        return function

    return add


def _hilbert_index(x: Tensor, y: Tensor, order: int) -> Tensor:
    """Index along a Hilbert curve of a ``2**order`` grid (vectorized xy2d)."""
    x, y, d = x.clone(), y.clone(), torch.zeros_like(x)
    side = 1 << order
    s = side >> 1
    while s > 0:
        rx = ((x & s) > 0).long()
        ry = ((y & s) > 0).long()
        d += s * s * ((3 * rx) ^ ry)
        # rotate the quadrant so the curve stays continuous
        flip = (ry == 0) & (rx == 1)
        x = torch.where(flip, side - 1 - x, x)
        y = torch.where(flip, side - 1 - y, y)
        swap = ry == 0
        x, y = torch.where(swap, y, x), torch.where(swap, x, y)
        s >>= 1
    return d


def _quantize(column: Tensor, levels: int) -> Tensor:
    low, high = column.min(), column.max()
    scale = (levels - 1) / (high - low).clamp_min(1e-12)
    return ((column - low) * scale).round().long()


@register_ordering("hilbert")
def hilbert_order(embedding: Tensor) -> Tensor:
    """Sort 2-D points (e.g. torus angles in ``[0, 10)^2``) along a Hilbert curve.

    Example:
        >>> grid = torch.tensor([[x, y] for x in range(4) for y in range(4)], dtype=torch.float)
        >>> order = hilbert_order(grid)
        >>> steps = (grid[order][1:] - grid[order][:-1]).abs().sum(1)
        >>> bool((steps == 1).all())   # consecutive neurons are grid neighbours
        True
    """
    if embedding.dim() != 2 or embedding.shape[1] != 2:
        raise OrderingError(
            f"hilbert ordering needs (n, 2) coordinates, got shape {tuple(embedding.shape)}; "
            "use 'greedy' or 'first_coordinate' for other dimensions"
        )
    order = 10
    x = _quantize(embedding[:, 0], 1 << order)
    y = _quantize(embedding[:, 1], 1 << order)
    return torch.argsort(_hilbert_index(x, y, order), stable=True)


@register_ordering("angle")
def angle_order(embedding: Tensor) -> Tensor:
    """Circle: sort by angle (1 column) or by ``atan2`` of ``(cos, sin)``-like pairs."""
    if embedding.dim() == 1 or embedding.shape[1] == 1:
        return torch.argsort(embedding.reshape(-1), stable=True)
    return torch.argsort(torch.atan2(embedding[:, 1], embedding[:, 0]), stable=True)


@register_ordering("first_coordinate")
def first_coordinate_order(embedding: Tensor) -> Tensor:
    """Sort by the first coordinate (cheap generic fallback)."""
    return torch.argsort(embedding.reshape(embedding.shape[0], -1)[:, 0], stable=True)


@register_ordering("greedy")
def greedy_order(embedding: Tensor, distance: Callable[[Tensor, Tensor], Tensor] | None = None
                 ) -> Tensor:
    """Nearest-neighbour chain: start at neuron 0, always step to the closest unvisited one.

    ``distance`` is a manifold's ``(n, d), (m, d) -> (n, m)`` distance (Euclidean if None).
    """
    points = embedding.reshape(embedding.shape[0], -1).double()
    table = distance(points, points) if distance is not None else torch.cdist(points, points)
    table = table.clone()
    count = points.shape[0]
    order = torch.empty(count, dtype=torch.long)
    current = 0
    table[:, current] = math.inf
    for position in range(count):
        order[position] = current
        nxt = int(torch.argmin(table[current]))
        table[:, nxt] = math.inf
        current = nxt
    return order


@register_ordering("identity")
def identity_order(embedding: Tensor) -> Tensor:
    """Keep the current numbering."""
    return torch.arange(embedding.shape[0])


def order_neurons(embedding: Tensor, method: str = "auto", manifold: object = None) -> Tensor:
    """Permutation that puts neurons close on the manifold at close indices.

    Args:
        embedding: ``(n, dim)`` neuron coordinates.
        method: a name in :data:`ORDERINGS` or ``"auto"``: angle for 1 coordinate or a
            circle, Hilbert for a 2-D torus or unnamed 2-D points, else the greedy chain (with the
            manifold's distance when ``manifold`` has one).
        manifold: optional manifold name or object with ``name`` / ``distance``.

    Returns:
        ``perm`` with ``perm[i]`` = original index of the neuron stored at position ``i``.
    """
    name = manifold if isinstance(manifold, str) else getattr(manifold, "name", None)
    if method == "auto":
        columns = 1 if embedding.dim() == 1 else embedding.shape[1]
        if name == "circle" or columns == 1:
            method = "angle"
        elif columns == 2 and name in ("torus", None):
            method = "hilbert"
        else:
            method = "greedy"
    if method not in ORDERINGS:
        raise OrderingError(
            f"unknown ordering {method!r}; expected 'auto' or one of {', '.join(ORDERINGS)}"
        )
    if method == "greedy" and hasattr(manifold, "distance"):
        return greedy_order(embedding, manifold.distance)
    return ORDERINGS[method](embedding.detach().float())
