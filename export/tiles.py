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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moduli_transform.ordering import (
    ORDERINGS,
    OrderingError,
    order_neurons,
    register_ordering,
)
from moduli_transform.pruning import tile_norms
from moduli_transform.targets import gate_rows

__all__ = [
    "ORDERINGS",
    "TileConfigError",
    "OrderingError",
    "register_ordering",
    "order_neurons",
    "tile_mask",
    "tile_prune",
    "tile_sparsity",
    "magnitude_mask",
    "permute_rnn",
    "permute_linear_input",
    "tile_prune_rnn",
    "handle_perms",
    "QualityComparison",
    "tile_vs_unstructured_quality",
]


class TileConfigError(ValueError):
    """Bad ordering name, sparsity, tile size or embedding shape."""


# --------------------------------------------------------------------------- tile masks
def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity <= 1.0:
        raise TileConfigError(f"sparsity must be in [0, 1], got {sparsity}")


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
    scores = tile_norms(weight, tile)
    keep = round((1.0 - sparsity) * scores.numel())
    kept = torch.zeros(scores.numel(), dtype=torch.bool)
    if keep > 0:
        kept[torch.topk(scores.flatten(), keep, sorted=False).indices] = True
    kept = kept.view(scores.shape)
    mask = kept.repeat_interleave(tile, 0).repeat_interleave(tile, 1)
    return mask[: weight.shape[0], : weight.shape[1]]


def tile_sparsity(mask: Tensor, tile: int = 16) -> float:
    """Fraction of ``tile x tile`` tiles of ``mask`` that are entirely False."""
    return float((tile_norms(mask.float(), tile) == 0).float().mean())


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
    rows = gate_rows(perm, gates)
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
            rows = gate_rows(perm, gates)
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


def handle_perms(handle: object, module: nn.RNNBase, prefix: str = "") -> list[Tensor]:
    """Per-layer neuron order of an RNN module that ``handle`` tile-pruned during training.

    ``handle`` was attached with ``granularity="tile"``; ``prefix`` is the module's name in
    the model (``""`` when the module is the model). Feed the result to
    :func:`permute_rnn` so that each ``W_hh`` becomes block-sparse in place.
    """
    orders = getattr(handle, "neuron_orders", {})
    perms = []
    for layer in range(module.num_layers):
        name = f"{prefix}.weight_hh_l{layer}" if prefix else f"weight_hh_l{layer}"
        if name not in orders:
            raise TileConfigError(
                f"handle has no tile order for {name!r} (tile orders: {sorted(orders) or 'none'}); "
                "attach with granularity='tile'"
            )
        perms.append(orders[name][1])
    return perms


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
