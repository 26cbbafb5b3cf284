"""What the toolkit acts on: a `Target` is one weight block of one parameter.

A target names a parameter by its key in ``model.named_parameters()`` and says which
part of it is the recurrent (or regularized) block and how that block is laid out:

* ``rows`` / ``cols`` select the block from dims 0 and 1 of the parameter (a Linear on
  ``cat([x, h])`` has only its hidden-state column slice as recurrent block);
* ``gates`` is the number of gate blocks stacked along dim 0 inside ``rows``
  (``weight_hh`` of a GRU has 3, of an LSTM 4), each of shape ``(out_features, in_features)``;
* ``transposed``: the weight is stored ``(in, out)`` (``h @ U`` with U of shape (H, 4H))
  and the block is read as ``parameter[rows, cols].T``, so its gates are column blocks of
  the stored tensor; everything downstream sees the usual ``(gates * out, in)`` block;
* ``kind`` says how the block is penalized: ``"recurrent"`` (hidden -> hidden matrix),
  ``"linear"`` (feed-forward in -> out matrix), ``"conv"`` (channels x channels x kernel),
  ``"elementwise"`` (a 1-D recurrent vector, IndRNN style: listed, not regularized by
  default) or ``"extra"`` (pruned on request, never regularized).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

__all__ = ["Target", "TARGET_KINDS", "gate_rows"]

TARGET_KINDS = ("recurrent", "linear", "conv", "elementwise", "extra")


def _slice_length(selection: slice, size: int) -> int:
    return len(range(*selection.indices(size)))


@dataclass(frozen=True)
class Target:
    """One weight block to regularize and/or prune.

    Example:
        >>> t = Target(name="rnn.weight_hh_l0", shape=(12, 3), kind="recurrent", gates=4)
        >>> t.block_shape, t.out_features, t.in_features
        ((12, 3), 3, 3)
    """

    name: str
    shape: tuple[int, ...]
    kind: str = "recurrent"
    rows: slice = field(default_factory=lambda: slice(None))
    cols: slice = field(default_factory=lambda: slice(None))
    gates: int = 1
    gate_names: tuple[str, ...] = ()
    module: str = ""
    evidence: str = ""
    regularize: bool = True
    transposed: bool = False

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(
                f"unknown target kind {self.kind!r}; expected one of {', '.join(TARGET_KINDS)}"
            )
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.kind == "elementwise":
            return
        if len(self.shape) < 2:
            raise ValueError(
                f"target {self.name!r} of kind {self.kind!r} needs a parameter with at least "
                f"2 dims, got shape {self.shape}"
            )
        stacked = _slice_length(*((self.cols, self.shape[1]) if self.transposed else (self.rows, self.shape[0])))
        if self.gates < 1 or stacked % self.gates:
            axis = "columns" if self.transposed else "rows"
            raise ValueError(
                f"target {self.name!r}: {stacked} {axis} cannot be split into {self.gates} gate blocks"
            )

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of ``parameter[rows, cols]`` (kernel dims of a conv kept)."""
        if self.kind == "elementwise":
            return self.shape
        rows = _slice_length(self.rows, self.shape[0])
        cols = _slice_length(self.cols, self.shape[1])
        return (cols, rows) if self.transposed else (rows, cols, *self.shape[2:])

    @property
    def out_features(self) -> int:
        """Number of output neurons (rows of one gate block)."""
        return self.block_shape[0] // self.gates

    @property
    def in_features(self) -> int:
        """Number of input neurons (columns of the block)."""
        return self.block_shape[1] if self.kind != "elementwise" else self.shape[0]

    @property
    def is_square(self) -> bool:
        """True when rows and columns index the same neurons (shared embedding possible)."""
        return self.kind == "recurrent" and self.out_features == self.in_features

    def block(self, parameter):
        """View of the target block inside ``parameter`` (shares storage)."""
        if self.kind == "elementwise":
            return parameter
        block = parameter[self.rows, self.cols]
        return block.T if self.transposed else block

    def __hash__(self) -> int:  # slices are unhashable before Python 3.12
        return hash((self.name, self.kind, self.describe_slices(), self.gates, self.transposed))

    def with_changes(self, **changes) -> "Target":
        """A copy with some fields replaced."""
        return replace(self, **changes)

    def describe_slices(self) -> str:
        """Human-readable ``[rows, cols]`` selection, e.g. ``[:, 8:40]``."""

        def fmt(s: slice) -> str:
            start = "" if s.start is None else str(s.start)
            stop = "" if s.stop is None else str(s.stop)
            return f"{start}:{stop}"

        if self.kind == "elementwise":
            return "[:]"
        return f"[{fmt(self.rows)}, {fmt(self.cols)}]" + (".T" if self.transposed else "")


def gate_rows(units: torch.Tensor, gates: int, hidden: int | None = None) -> torch.Tensor:
    """Rows of a gate-stacked ``(gates * hidden, ...)`` matrix that belong to ``units``.

    ``units`` (a LongTensor of hidden-unit indices: a permutation, or the units kept) is
    repeated in every gate block; ``hidden`` defaults to ``len(units)`` (a permutation).

    Example:
        >>> gate_rows(torch.tensor([1, 0]), gates=2)
        tensor([1, 0, 3, 2])
        >>> gate_rows(torch.tensor([2]), gates=3, hidden=4)
        tensor([ 2,  6, 10])
    """
    hidden = units.numel() if hidden is None else hidden
    return torch.cat([gate * hidden + units for gate in range(gates)])
