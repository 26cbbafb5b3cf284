"""MagnitudeSparsifier: which weights to prune (the schedule says how many and when).

Masks are boolean tensors (True = kept). Pruning is monotone: a weight that was pruned is
never revived; each update removes the smallest-magnitude surviving units until exactly
``round(sparsity * units)`` are pruned (per tensor, or over all blocks together with
``scope="global"``).

A unit is one weight (``granularity="element"``, the paper's unstructured pruning) or one
``tile x tile`` block of the matrix with its rows and columns renumbered along the
manifold (``granularity="tile"``, scored by the Frobenius norm of its surviving weights).
Tile masks are stored in the original numbering, so the model never changes shape or
order; a block-sparse kernel applies the same renumbering (:mod:`moduli_transform.export.tiles`) to read
whole tiles.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import GRANULARITIES, SCOPES

__all__ = ["MagnitudeSparsifier", "tile_norms"]

Orders = dict[str, tuple[Tensor, Tensor]]


def tile_norms(matrix: Tensor, tile: int) -> Tensor:
    """Frobenius norm of every ``tile x tile`` block (edge blocks may be partial).

    Example:
        >>> tile_norms(torch.ones(4, 6), 2)
        tensor([[2., 2., 2.],
                [2., 2., 2.]])
    """
    rows, cols = matrix.shape
    padded = matrix.new_zeros(math.ceil(rows / tile) * tile, math.ceil(cols / tile) * tile)
    padded[:rows, :cols] = matrix.float() ** 2
    grid = padded.view(padded.shape[0] // tile, tile, padded.shape[1] // tile, tile)
    return grid.sum((1, 3)).sqrt()


def _expand_tiles(kept: Tensor, tile: int, shape: torch.Size) -> Tensor:
    return kept.repeat_interleave(tile, 0).repeat_interleave(tile, 1)[: shape[0], : shape[1]]


class MagnitudeSparsifier:
    """Magnitude pruning of weight blocks, one weight or one tile at a time.

    Args:
        scope: ``"per_tensor"`` (each block reaches the sparsity) or ``"global"``.
        granularity: ``"element"`` or ``"tile"``.
        tile: tile side for ``granularity="tile"``.

    Example:
        >>> w = torch.tensor([[0.1, -2.0], [0.5, 3.0]])
        >>> mask = torch.ones(2, 2, dtype=torch.bool)
        >>> MagnitudeSparsifier().update_masks({"w": w}, {"w": mask}, 0.5)
        >>> mask
        tensor([[False,  True],
                [False,  True]])
    """

    def __init__(self, scope: str = "per_tensor", granularity: str = "element", tile: int = 16) -> None:
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; expected one of {', '.join(SCOPES)}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; expected one of {', '.join(GRANULARITIES)}")
        if int(tile) < 1:
            raise ValueError(f"tile must be a positive integer, got {tile!r}")
        self.scope = scope
        self.granularity = granularity
        self.tile = int(tile)

    @torch.no_grad()
    def update_masks(self, blocks: dict[str, Tensor], masks: dict[str, Tensor], sparsity: float,
                     orders: Orders | None = None) -> None:
        """Prune in place: ``masks[k]`` (bool, shape of ``blocks[k]``) reaches ``sparsity``.

        ``orders[k] = (row_perm, col_perm)`` renumbers block ``k`` before tiling
        (``perm[i]`` = original index stored at position ``i``); identity when absent.
        """
        groups = [list(blocks)] if self.scope == "global" else [[key] for key in blocks]
        for keys in groups:
            if self.granularity == "tile":
                self._prune_tiles(keys, blocks, masks, sparsity, orders or {})
            else:
                self._prune_elements(keys, blocks, masks, sparsity)

    @staticmethod
    def _keep_largest(scores: Tensor, sparsity: float) -> Tensor | None:
        """Units to keep (pruned units score -1 and stay pruned); None when nothing changes."""
        already = int((scores < 0).sum())
        wanted = max(int(round(sparsity * scores.numel())), already)
        if wanted == already:
            return None
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep[torch.topk(scores, wanted, largest=False, sorted=False).indices] = False
        return keep

    def _prune_elements(self, keys: list[str], blocks: dict[str, Tensor], masks: dict[str, Tensor],
                        sparsity: float) -> None:
        scores = torch.cat([
            torch.where(masks[k], blocks[k].detach().abs().float(), torch.tensor(-1.0)).flatten()
            for k in keys
        ])
        keep = self._keep_largest(scores, sparsity)
        if keep is None:
            return
        offset = 0
        for k in keys:
            n = masks[k].numel()
            masks[k].copy_(keep[offset:offset + n].view_as(masks[k]))
            offset += n

    def _prune_tiles(self, keys: list[str], blocks: dict[str, Tensor], masks: dict[str, Tensor],
                     sparsity: float, orders: Orders) -> None:
        grids, permuted = [], {}
        for k in keys:
            if blocks[k].dim() != 2:
                raise ValueError(f"tile pruning needs 2-D weight blocks; {k!r} has shape {tuple(blocks[k].shape)}")
            rows, cols = orders.get(k, (torch.arange(blocks[k].shape[0]), torch.arange(blocks[k].shape[1])))
            permuted[k] = (rows, cols)
            weight = blocks[k].detach()[rows][:, cols]
            mask = masks[k][rows][:, cols]
            norms = tile_norms(weight * mask, self.tile)
            alive = tile_norms(mask.float(), self.tile) > 0
            grids.append(torch.where(alive, norms, torch.tensor(-1.0)))
        keep = self._keep_largest(torch.cat([g.flatten() for g in grids]), sparsity)
        if keep is None:
            return
        offset = 0
        for k, grid in zip(keys, grids):
            kept_tiles = keep[offset:offset + grid.numel()].view_as(grid)
            offset += grid.numel()
            rows, cols = permuted[k]
            kept = _expand_tiles(kept_tiles, self.tile, masks[k].shape)
            original = torch.empty_like(kept)
            original[rows.unsqueeze(1), cols.unsqueeze(0)] = kept
            masks[k].logical_and_(original)
