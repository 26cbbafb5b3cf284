"""ModuliRegularizer: the embedding and penalty of one target.

For a weight block with ``G`` gate blocks of shape ``(out, in)`` and embeddings
``e_out`` (out x dim) and ``e_in`` (in x dim) on a manifold M::

    C[i, j]  = f(d_M(e_out[i], e_in[j]))                     (out x in, one per target)
    penalty  = strength * reduce_{g, i, j}( C[i, j] * |W[g*out + i, j]|^p )

``reduce`` is the mean (the paper) or the sum; C is tiled over the gate blocks by
broadcasting, never materialized G times. For a conv target, ``|W|`` is the L2 norm of
each ``(out, in)`` kernel slice. Square recurrent blocks share one embedding for rows and
columns unless ``share_embedding=False``.

Controls (paper): ``"moduli"``; ``"l1"`` (C constant: ``l1_coefficient="one"`` is the
authors' "standard" L1, ``"mean"`` their ``--regpower mean``, the mean of the un-inverted
inhibitor over the embedding, and ``"matched"``, ours and the default, the mean of the
moduli coefficients actually used, so the total strength matches); ``"shuffled"`` (a seeded
permutation of the entries of C); ``"none"`` (penalty 0).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import CONTROLS, L1_COEFFICIENTS, REDUCTIONS
from .inhibitors import Inhibitor
from .manifolds import Manifold
from .targets import Target

__all__ = ["ModuliRegularizer"]


class ModuliRegularizer(nn.Module):
    """Embeddings, coefficient matrix and penalty for one :class:`Target`.

    Example:
        >>> from moduli_transform.manifolds import get_manifold
        >>> from moduli_transform.inhibitors import get_inhibitor
        >>> target = Target(name="w", shape=(8, 8))
        >>> reg = ModuliRegularizer(target, get_manifold("torus"), get_inhibitor("diffusion"),
        ...                         generator=torch.Generator().manual_seed(0))
        >>> reg.coefficients().shape, bool(reg.coefficients().diagonal().eq(0).all())
        (torch.Size([8, 8]), True)
    """

    def __init__(
        self,
        target: Target,
        manifold: Manifold,
        inhibitor: Inhibitor,
        *,
        strength: float = 1.0,
        control: str = "moduli",
        trained: bool = False,
        power: int = 1,
        reduction: str = "mean",
        share_embedding: bool = True,
        l1_coefficient: str = "matched",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if control not in CONTROLS:
            raise ValueError(f"unknown control {control!r}; expected one of {', '.join(CONTROLS)}")
        if l1_coefficient not in L1_COEFFICIENTS:
            raise ValueError(f"unknown l1_coefficient {l1_coefficient!r}; expected one of {', '.join(L1_COEFFICIENTS)}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
        if target.kind == "elementwise":
            raise ValueError(f"target {target.name!r} is elementwise: it has no off-diagonal structure to regularize")
        self.target = target
        self.manifold = manifold
        self.inhibitor = inhibitor
        self.strength = float(strength)
        self.control = control
        self.power = int(power)
        self.reduction = reduction
        self.shared = bool(share_embedding and target.is_square)
        generator = generator if generator is not None else torch.Generator().manual_seed(0)

        rows = manifold.sample(target.out_features, generator).float()
        cols = rows if self.shared else manifold.sample(target.in_features, generator).float()
        self._trained = False
        self.register_buffer("row_points", rows)
        if not self.shared:
            self.register_buffer("col_points", cols)
        # A seed rather than a stored permutation: an index tensor would outweigh C.
        self._shuffle_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self._l1_value: float | None = None
        if control == "l1":
            self._l1_value = self._l1_constant(l1_coefficient)
        self._cache: Tensor | None = None
        if trained:
            self.set_trained(True)
        else:
            self.coefficients()  # computed once, here, so its memory shows from the start

    # -- embeddings -------------------------------------------------------------------
    @property
    def row_embedding(self) -> Tensor:
        """Embedding of the output neurons (out_features x manifold.dim)."""
        return self.row_points

    @property
    def col_embedding(self) -> Tensor:
        """Embedding of the input neurons; the same tensor as rows when shared."""
        return self.row_points if self.shared else self.col_points

    @property
    def trained(self) -> bool:
        return self._trained

    def set_trained(self, trained: bool) -> None:
        """Switch between fixed (cached C) and trained embeddings (C recomputed each call)."""
        self._trained = bool(trained)
        for name in ("row_points",) if self.shared else ("row_points", "col_points"):
            self._buffers[name].requires_grad_(self._trained)
        self._cache = None
        if not self._trained:
            self.coefficients()

    def embedding_tensors(self) -> list[Tensor]:
        """The distinct embedding tensors (one when rows and columns are shared)."""
        return [self.row_points] if self.shared else [self.row_points, self.col_points]

    @torch.no_grad()
    def retract(self) -> None:
        """Put the embeddings back on the manifold after a gradient step."""
        for points in self.embedding_tensors():
            points.copy_(self.manifold.retract(points))
        self._cache = None

    # -- coefficients -----------------------------------------------------------------
    def _moduli_coefficients(self) -> Tensor:
        distance = self.manifold.distance(self.row_embedding, self.col_embedding)
        return self.inhibitor(distance)

    def _l1_constant(self, kind: str) -> float:
        if kind == "one":
            return 1.0
        if kind == "mean":  # the authors' "mean": the inhibitor's profile, never inverted
            distance = self.manifold.distance(self.row_embedding, self.col_embedding)
            return float(self.inhibitor.profile(distance).mean())
        return float(self._moduli_coefficients().mean())

    @torch.no_grad()
    def redraw_embedding(self, generator: torch.Generator) -> None:
        """Sample new neuron coordinates (a new C), as the authors' navigation/LM lottery does."""
        self.row_points.copy_(self.manifold.sample(self.target.out_features, generator).float())
        if not self.shared:
            self.col_points.copy_(self.manifold.sample(self.target.in_features, generator).float())
        # The shuffled control permutes the new C with a new permutation too.
        self._shuffle_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self._cache = None
        if not self._trained:
            self.coefficients()

    def coefficients(self) -> Tensor:
        """C (out_features x in_features); differentiable w.r.t. trained embeddings."""
        if self._cache is not None:
            return self._cache
        shape = (self.target.out_features, self.target.in_features)
        if self.control == "none":
            coefficients = torch.zeros(shape, device=self.row_points.device)
        elif self.control == "l1":
            coefficients = torch.full(shape, self._l1_value, device=self.row_points.device)
        else:
            coefficients = self._moduli_coefficients()
            if self.control == "shuffled":
                generator = torch.Generator().manual_seed(self._shuffle_seed)
                permutation = torch.randperm(coefficients.numel(), generator=generator)
                coefficients = coefficients.flatten()[permutation.to(coefficients.device)].view(shape)
        if not self._trained or self.control in ("none", "l1"):
            self._cache = coefficients = coefficients.detach()
        return coefficients

    def _apply(self, *args, **kwargs):
        had_cache, self._cache = self._cache is not None, None
        # Module._apply moves buffers with autograd on: a trained embedding (a buffer that
        # requires grad) would come back as a non-leaf copy that no optimizer accepts. Moved
        # without it, then marked again, it stays a leaf on the new device or dtype.
        with torch.no_grad():
            result = super()._apply(*args, **kwargs)
        for points in self.embedding_tensors():
            points.requires_grad_(self._trained)
        if had_cache:
            self.coefficients()  # recomputed on the new device
        return result

    def invalidate(self) -> None:
        """Forget the cached C (after embeddings were changed by hand)."""
        self._cache = None

    # -- penalty ------------------------------------------------------------------------
    def magnitudes(self, weight: Tensor) -> Tensor:
        """|W|^p of the target block, shaped (gates, out, in)."""
        block = self.target.block(weight)
        if self.target.kind == "conv":
            block = torch.linalg.vector_norm(block.flatten(2), dim=2)
        else:
            block = block.abs()
        if self.power == 2:
            block = block * block
        return block.reshape(self.target.gates, self.target.out_features, self.target.in_features)

    def penalty(self, weight: Tensor) -> Tensor:
        """``strength * reduce(C * |W|^p)`` for the full parameter ``weight``."""
        if self.control == "none" or self.strength == 0.0:
            return weight.new_zeros(())
        coefficients = self.coefficients().to(device=weight.device, dtype=weight.dtype)
        weighted = self.magnitudes(weight) * coefficients
        total = weighted.sum()
        if self.reduction == "mean":
            total = total / weighted.numel()
        return self.strength * total

    def forward(self, weight: Tensor) -> Tensor:
        return self.penalty(weight)

    def coefficient_bytes(self) -> int:
        """Bytes held by the cached coefficient matrix (0 when trained: recomputed)."""
        return 0 if self._cache is None else self._cache.numel() * self._cache.element_size()

    def extra_repr(self) -> str:
        return (f"target={self.target.name!r}, manifold={self.manifold!r}, control={self.control!r}, "
                f"strength={self.strength}, trained={self._trained}, shared={self.shared}")
