"""The weight the model computes with, for targets held through ``torch.nn.utils.parametrize``.

A parametrized weight is stored as ``<module>.parametrizations.<name>.original`` (or
``original0``/``original1`` when ``right_inverse`` returns several tensors) and recomputed
from it at every access of ``<module>.<name>``. Pruning the stored tensor prunes the weight
only when a zero there is a zero in the weight (a mask ``W * M``, weight_norm's direction);
through ``orthogonal`` (``matrix_exp``/``cayley`` of a skew matrix) a zeroed entry of
``original`` does not zero any entry of the weight. :func:`keeps_zeros` finds out by
running the parametrization on random values with half of the entries zeroed, in a checkerboard
(no row or column all zero: weight_norm divides by their norms).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Parametrized", "parametrized", "keeps_zeros"]

_ORIGINAL = re.compile(r"^(?:(?P<module>.*)\.)?parametrizations\.(?P<attribute>[^.]+)\.(?P<original>original\d*)$")


@dataclass(frozen=True)
class Parametrized:
    """Where a stored tensor feeds a parametrized weight: ``module.<attribute>``."""

    module: nn.Module
    attribute: str
    original: str  # "original", "original0", ...

    def weight(self) -> Tensor:
        """The weight as the model computes it now (differentiable in the stored tensors)."""
        return getattr(self.module, self.attribute)

    def describe(self) -> str:
        chain = self.module.parametrizations[self.attribute]
        return " -> ".join(type(p).__name__ for p in chain)


def parametrized(model: nn.Module, name: str) -> Parametrized | None:
    """The parametrization the parameter ``name`` is stored for (None for a plain one)."""
    match = _ORIGINAL.match(name)
    if match is None:
        return None
    module = model.get_submodule(match["module"] or "")
    return Parametrized(module, match["attribute"], match["original"])


@torch.no_grad()
def keeps_zeros(where: Parametrized) -> bool:
    """Whether zeros written into the stored tensor are zeros of the weight, entry by entry."""
    chain = where.module.parametrizations[where.attribute]
    names = ["original"] if hasattr(chain, "original") else sorted(
        (n for n, _ in chain.named_parameters(recurse=False) if n.startswith("original")),
        key=lambda n: int(n[len("original"):]))
    stored = getattr(chain, where.original)
    coordinates = torch.meshgrid(*(torch.arange(n) for n in stored.shape), indexing="ij")
    zeroed = (sum(coordinates) % 2 == 0).to(stored.device)
    originals = [getattr(chain, n).detach().clone() for n in names]
    index = names.index(where.original)
    # probe values of our own: the stored ones may already hold pruned zeros
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(stored.shape, generator=generator).to(stored)
    originals[index] = probe.masked_fill(zeroed, 0.0)
    weight = chain[0](*originals)
    for parametrization in list(chain)[1:]:
        weight = parametrization(weight)
    return weight.shape == stored.shape and bool((weight[zeroed] == 0).all())
