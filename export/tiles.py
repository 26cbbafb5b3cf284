"""Geometric ordering of hidden neurons and pruning of whole tiles of the recurrent matrix.

Moduli regularization keeps connections between neurons that are close on the manifold,
but neurons are numbered at random, so the surviving weights are scattered over ``W_hh``.
Ordering the neurons along the manifold (a Hilbert curve over torus coordinates, the
angle on a circle, a nearest-neighbour chain otherwise) brings neighbours to neighbouring
indices; pruning whole ``tile x tile`` blocks in that order (score = Frobenius norm of the
block) then leaves a block-sparse matrix that a block kernel reads with one index per
block instead of one per weight.  Reordering an unstructured pattern alone fills only
14-29% of each tile, so the tiles have to be pruned as tiles.

A permutation changes nothing a caller can see once it is folded into the neighbouring
matrices: ``W_ih`` rows, biases, ``W_hh`` rows and columns (per gate block), the next
layer's ``W_ih`` columns and the decoder's columns (:func:`permute_rnn`,
:func:`permute_linear_input`).  For quality studies no permutation is needed at all: the
tile mask is mapped back to the original order (:func:`tile_mask`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "ORDERINGS",
    "TileConfigError",
    "register_ordering",
    "order_neurons",
    "tile_mask",
    "tile_prune",
    "tile_sparsity",
    "magnitude_mask",
    "permute_rnn",
    "permute_linear_input",
    "tile_prune_rnn",
    "QualityComparison",
    "tile_vs_unstructured_quality",
]


class TileConfigError(ValueError):
    """Bad ordering name, sparsity, tile size or embedding shape."""


# --------------------------------------------------------------------------- orderings
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
        raise TileConfigError(
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


_MANIFOLD_ORDERING = {"circle": "angle", "torus": "hilbert"}


def order_neurons(embedding: Tensor, method: str = "auto", manifold: object = None) -> Tensor:
    """Permutation that puts neurons close on the manifold at close indices.

    Args:
        embedding: ``(n, dim)`` neuron coordinates.
        method: a name in :data:`ORDERINGS` or ``"auto"``: angle for 1 coordinate or a
            circle, Hilbert for 2 coordinates (torus), else the greedy chain (with the
            manifold's distance when ``manifold`` has one).
        manifold: optional manifold name or object with ``name`` / ``distance``.

    Returns:
        ``perm`` with ``perm[i]`` = original index of the neuron stored at position ``i``.
    """
    name = manifold if isinstance(manifold, str) else getattr(manifold, "name", None)
    if method == "auto":
        if name in _MANIFOLD_ORDERING:
            method = _MANIFOLD_ORDERING[name]
        elif embedding.dim() == 1 or embedding.shape[1] == 1:
            method = "angle"
        elif embedding.shape[1] == 2 and name is None:
            method = "hilbert"
        else:
            method = "greedy"
    if method not in ORDERINGS:
        raise TileConfigError(
            f"unknown ordering {method!r}; expected 'auto' or one of {', '.join(ORDERINGS)}"
        )
    if method == "greedy" and hasattr(manifold, "distance"):
        return greedy_order(embedding, manifold.distance)
    return ORDERINGS[method](embedding.detach().float())


# --------------------------------------------------------------------------- tile masks
def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity <= 1.0:
        raise TileConfigError(f"sparsity must be in [0, 1], got {sparsity}")


def _tile_scores(weight: Tensor, tile: int) -> Tensor:
    rows, cols = weight.shape
    padded = torch.zeros(math.ceil(rows / tile) * tile, math.ceil(cols / tile) * tile)
    padded[:rows, :cols] = weight.detach().float() ** 2
    grid = padded.view(padded.shape[0] // tile, tile, padded.shape[1] // tile, tile)
    return grid.sum((1, 3)).sqrt()


def tile_prune(weight: Tensor, sparsity: float, tile: int = 16) -> Tensor:
    """Boolean mask keeping the ``round((1 - sparsity) * tiles)`` tiles of largest norm.

    Tiles are laid over ``weight`` as it is (apply the geometric order first); edge tiles
    of a size not divisible by ``tile`` are partial.

    Example:
        >>> torch.manual_seed(0); mask = tile_prune(torch.randn(64, 64), 0.75)
        <torch._C.Generator object at ...>
        >>> tile_sparsity(mask), float(1 - mask.float().mean())
        (0.75, 0.75)
    """
    _check_sparsity(sparsity)
    if tile < 1:
        raise TileConfigError(f"tile must be a positive integer, got {tile}")
    scores = _tile_scores(weight, tile)
    keep = round((1.0 - sparsity) * scores.numel())
    kept = torch.zeros(scores.numel(), dtype=torch.bool)
    if keep > 0:
        kept[torch.topk(scores.flatten(), keep, sorted=False).indices] = True
    kept = kept.view(scores.shape)
    mask = kept.repeat_interleave(tile, 0).repeat_interleave(tile, 1)
    return mask[: weight.shape[0], : weight.shape[1]]


def tile_sparsity(mask: Tensor, tile: int = 16) -> float:
    """Fraction of ``tile x tile`` tiles of ``mask`` that are entirely False."""
    return float((_tile_scores(mask.float(), tile) == 0).float().mean())


def _gate_rows(perm: Tensor, gates: int) -> Tensor:
    hidden = perm.numel()
    return torch.cat([gate * hidden + perm for gate in range(gates)])


def tile_mask(weight: Tensor, sparsity: float, perm: Tensor | None = None, tile: int = 16
              ) -> Tensor:
    """Tile-pruning mask of a ``(gates * H, H)`` recurrent matrix, in the ORIGINAL order.

    The tiles are laid over the matrix reordered by ``perm`` (per gate block on the rows),
    then the mask is mapped back, so ``weight * mask`` is the pruned model without any
    change of numbering (what quality studies need).
    """
    if perm is None:
        return tile_prune(weight, sparsity, tile)
    gates = weight.shape[0] // weight.shape[1]
    rows = _gate_rows(perm, gates)
    permuted = tile_prune(weight[rows][:, perm], sparsity, tile)
    mask = torch.empty_like(permuted)
    mask[rows.unsqueeze(1), perm.unsqueeze(0)] = permuted
    return mask


def magnitude_mask(weight: Tensor, sparsity: float) -> Tensor:
    """Unstructured mask zeroing exactly ``round(sparsity * numel)`` smallest |weights|."""
    _check_sparsity(sparsity)
    keep = round((1.0 - sparsity) * weight.numel())
    mask = torch.zeros(weight.numel(), dtype=torch.bool)
    if keep > 0:
        mask[torch.topk(weight.detach().abs().flatten(), keep, sorted=False).indices] = True
    return mask.view(weight.shape)


# --------------------------------------------------------------------------- permutation
def permute_rnn(module: nn.RNNBase, perms: Sequence[Tensor | None]) -> nn.RNNBase:
    """Copy of ``module`` with layer ``l``'s hidden units stored in order ``perms[l]``.

    Rows of ``W_ih``, ``W_hh`` and biases (per gate block), columns of ``W_hh`` and of the
    next layer's ``W_ih`` move together, so the copy computes ``output[..., perms[-1]]``
    and ``h_n[l][..., perms[l]]`` given an initial state permuted the same way.

    Example:
        >>> torch.manual_seed(0); rnn = nn.LSTM(2, 4, num_layers=2)
        <torch._C.Generator object at ...>
        >>> perms = [torch.tensor([2, 0, 3, 1]), torch.tensor([3, 2, 1, 0])]
        >>> x = torch.randn(5, 1, 2)
        >>> bool(torch.allclose(permute_rnn(rnn, perms)(x)[0], rnn(x)[0][..., perms[1]], atol=1e-6))
        True
    """
    if module.bidirectional or getattr(module, "proj_size", 0):
        raise TileConfigError("bidirectional / projected RNN modules cannot be permuted")
    if len(perms) != module.num_layers:
        raise TileConfigError(f"got {len(perms)} permutations for {module.num_layers} layers")
    permuted = copy.deepcopy(module)
    gates = module.weight_hh_l0.shape[0] // module.hidden_size
    with torch.no_grad():
        for layer, perm in enumerate(perms):
            if perm is None:
                continue
            rows = _gate_rows(perm, gates)
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                parameter = getattr(permuted, f"{kind}_l{layer}", None)
                if parameter is not None:
                    parameter.copy_(parameter[rows])
            weight_hh = getattr(permuted, f"weight_hh_l{layer}")
            weight_hh.copy_(weight_hh[:, perm])
            if layer + 1 < module.num_layers:
                nxt = getattr(permuted, f"weight_ih_l{layer + 1}")
                nxt.copy_(nxt[:, perm])
    return permuted


def permute_linear_input(linear: nn.Linear, perm: Tensor) -> nn.Linear:
    """Copy of a decoder reading the permuted hidden state: ``weight[:, perm]``."""
    permuted = copy.deepcopy(linear)
    with torch.no_grad():
        permuted.weight.copy_(linear.weight[:, perm])
    return permuted


def permute_state(state: Tensor, perms: Sequence[Tensor | None]) -> Tensor:
    """Initial state ``(layers, batch, H)`` in the permuted order."""
    return torch.stack([s if p is None else s[..., p] for s, p in zip(state, perms)])


def tile_prune_rnn(module: nn.RNNBase, sparsity: float,
                   embeddings: Tensor | Sequence[Tensor] | None = None, method: str = "auto",
                   manifold: object = None, tile: int = 16) -> tuple[nn.RNNBase, list[Tensor]]:
    """Order every layer's neurons, permute the module and tile-prune each ``W_hh``.

    Args:
        module: an ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``.
        sparsity: target tile sparsity of every ``W_hh``.
        embeddings: one ``(H, dim)`` tensor for all layers, one per layer, or None
            (identity order).
        method, manifold: see :func:`order_neurons`.

    Returns:
        ``(permuted pruned copy, perms)``; ``SparseRNN.from_module(copy, perms=perms)``
        runs it with outputs in the original order.
    """
    if embeddings is None:
        perms = [torch.arange(module.hidden_size)] * module.num_layers
    else:
        per_layer = [embeddings] * module.num_layers if isinstance(embeddings, Tensor) \
            else list(embeddings)
        perms = [order_neurons(e, method, manifold) for e in per_layer]
    pruned = permute_rnn(module, perms)
    with torch.no_grad():
        for layer in range(module.num_layers):
            weight = getattr(pruned, f"weight_hh_l{layer}")
            weight.mul_(tile_prune(weight, sparsity, tile))
    return pruned, perms


# --------------------------------------------------------------------------- quality
@dataclass(frozen=True)
class QualityComparison:
    """Task metric of the dense model and of both pruned variants at one sparsity."""

    sparsity: float
    dense: float
    unstructured: float
    tile: float


def _recurrent_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    found = []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.RNN, nn.GRU, nn.LSTM)):
            for name, parameter in module.named_parameters(recurse=False):
                if name.startswith("weight_hh"):
                    found.append((f"{module_name}.{name}" if module_name else name, parameter))
    return found


def _pruned_copy(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    pruned = copy.deepcopy(model)
    parameters = dict(pruned.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            parameters[name].mul_(mask)
    return pruned


def tile_vs_unstructured_quality(model: nn.Module, metric: Callable[[nn.Module], float],
                                 sparsity: float,
                                 embeddings: Mapping[str, Tensor] | Tensor | None = None,
                                 method: str = "auto", manifold: object = None,
                                 tile: int = 16) -> QualityComparison:
    """Task metric after tile pruning vs. unstructured magnitude pruning at one sparsity.

    Every ``weight_hh_l{k}`` of every ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` in ``model`` is
    pruned to ``sparsity`` on copies of the model: once by magnitude (per tensor), once by
    tiles in the geometric order of ``embeddings`` (mask mapped back to the original
    numbering, so the model's own forward runs unchanged).

    Args:
        model: a trained model (not modified).
        metric: ``model -> float`` (e.g. accuracy on a held-out set).
        sparsity: fraction of recurrent weights removed.
        embeddings: ``{parameter name: (H, dim)}`` (e.g. ``handle.regularizers[name]
            .row_embedding``), one tensor for all, or None (identity order).
        method, manifold: see :func:`order_neurons`.

    Returns:
        :class:`QualityComparison` with the dense, unstructured and tile metrics.

    Raises:
        TileConfigError: no recurrent weight in ``model``, or no embedding for one.
    """
    weights = _recurrent_weights(model)
    if not weights:
        raise TileConfigError("model has no nn.RNN / nn.GRU / nn.LSTM weight_hh to prune")
    unstructured, tiled = {}, {}
    for name, weight in weights:
        if embeddings is None:
            perm = None
        else:
            embedding = embeddings if isinstance(embeddings, Tensor) else embeddings.get(name)
            if embedding is None:
                raise TileConfigError(
                    f"no embedding for {name!r}; have {sorted(embeddings)}"  # type: ignore[arg-type]
                )
            perm = order_neurons(embedding, method, manifold)
        unstructured[name] = magnitude_mask(weight, sparsity)
        tiled[name] = tile_mask(weight, sparsity, perm, tile)
    return QualityComparison(
        sparsity=sparsity,
        dense=float(metric(model)),
        unstructured=float(metric(_pruned_copy(model, unstructured))),
        tile=float(metric(_pruned_copy(model, tiled))),
    )
