"""MagnitudeSparsifier: which weights to prune (the schedule says how many and when).

Masks are boolean tensors (True = kept). Pruning is monotone: a weight that was pruned is
never revived; each update removes the smallest-magnitude surviving weights until exactly
``round(sparsity * numel)`` are pruned (per tensor, or over all blocks together with
``scope="global"``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import SCOPES

__all__ = ["MagnitudeSparsifier"]


class MagnitudeSparsifier:
    """Unstructured magnitude pruning of weight blocks.

    Example:
        >>> w = torch.tensor([[0.1, -2.0], [0.5, 3.0]])
        >>> mask = torch.ones(2, 2, dtype=torch.bool)
        >>> MagnitudeSparsifier().update_masks({"w": w}, {"w": mask}, 0.5)
        >>> mask
        tensor([[False,  True],
                [False,  True]])
    """

    def __init__(self, scope: str = "per_tensor") -> None:
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; expected one of {', '.join(SCOPES)}")
        self.scope = scope

    @torch.no_grad()
    def update_masks(self, blocks: dict[str, Tensor], masks: dict[str, Tensor], sparsity: float) -> None:
        """Prune in place: ``masks[k]`` (bool, shape of ``blocks[k]``) reaches ``sparsity``."""
        if self.scope == "global":
            self._prune_together(list(blocks), blocks, masks, sparsity)
        else:
            for key in blocks:
                self._prune_together([key], blocks, masks, sparsity)

    @staticmethod
    def _prune_together(keys: list[str], blocks: dict[str, Tensor], masks: dict[str, Tensor], sparsity: float) -> None:
        # Pruned weights score -1 (below any magnitude) so they stay pruned.
        scores = torch.cat([
            torch.where(masks[k], blocks[k].detach().abs().float(), torch.tensor(-1.0)).flatten()
            for k in keys
        ])
        already = int((scores < 0).sum())
        wanted = max(int(round(sparsity * scores.numel())), already)
        if wanted == already:
            return
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep[torch.topk(scores, wanted, largest=False, sorted=False).indices] = False
        offset = 0
        for k in keys:
            n = masks[k].numel()
            masks[k].copy_(keep[offset:offset + n].view_as(masks[k]))
            offset += n
