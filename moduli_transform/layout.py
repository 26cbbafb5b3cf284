"""Where in a tensor the dataflow pass looks: input slices and output gates.

* :func:`input_ranges`: which index ranges of a weight's input (along the dim it contracts)
  carry the output of an earlier use, walking back through ``cat`` and re-layout ops
  (transposes, ``select``, ``unsqueeze``...): the hidden-state columns of ``cat([x, h])``.
* :func:`gate_count`: into how many equal gate blocks the weight's output is cut along
  its output dim (``chunk``/``split``, equal ``gates[:, a:b]`` slices, ``view(B, k, H)``),
  looking past bias adds, norms and gate nonlinearities.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx

__all__ = ["CATS", "gate_count", "input_ranges", "merge_ranges", "node_arg", "node_shape", "node_value"]

aten = torch.ops.aten


def node_value(node):
    """The example value export recorded for ``node`` (None for non-nodes)."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def node_shape(node) -> tuple[int, ...]:
    """Shape of ``node``'s tensor value; () when it is not a tensor."""
    value = node_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def node_arg(node: fx.Node, index: int, name: str, default):
    """Argument ``index`` (or keyword ``name``) of the call ``node``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


_shape, _arg = node_shape, node_arg


# --------------------------------------------------------------------------- input slices


CATS = {aten.cat.default, aten.concat.default, aten.concatenate.default}
_SAME_LAYOUT = {aten.clone.default, aten.contiguous.default, aten.dropout.default,
                aten.alias.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout,
                aten.type_as.default, aten.detach.default}


def _layout_source(node: fx.Node, dim: int, ndim: int) -> tuple[fx.Node, int] | None:
    """The input and its dim that ``dim`` of a re-layout op's output comes from (None when
    ``node`` is no such op, or ``dim`` is one it reduces or creates)."""
    target, source = node.target, node.args[0] if node.args else None
    if target is aten.t.default and ndim == 2 or target is aten.numpy_T.default:
        return source, ndim - 1 - dim
    if target is aten.mT.default:
        return source, {ndim - 1: ndim - 2, ndim - 2: ndim - 1}.get(dim, dim)
    if target is aten.transpose.int:
        first, second = (d % ndim for d in node.args[1:3])
        return source, {first: second, second: first}.get(dim, dim)
    if target is aten.permute.default:
        return source, node.args[1][dim] % ndim
    if target in _SAME_LAYOUT:
        return source, dim
    if target is aten.select.int:
        selected = node.args[1] % (ndim + 1)
        return source, dim if dim < selected else dim + 1
    if target is aten.unsqueeze.default:
        added = node.args[1] % ndim
        return None if dim == added else (source, dim if dim < added else dim - 1)
    if target is aten.slice.Tensor and _arg(node, 1, "dim", 0) % ndim != dim:
        return source, dim
    return None


def input_ranges(node, dim: int, reaches: Callable) -> list[tuple[int, int]]:
    """Index ranges along ``dim`` of ``node`` whose values reach an earlier use."""
    if not isinstance(node, fx.Node) or not reaches(node):
        return []
    shape = _shape(node)
    if not shape:
        return []
    dim %= len(shape)
    if node.target in CATS:
        pieces, cat_dim = node.args[0], _arg(node, 1, "dim", 0) % len(shape)
        if cat_dim != dim:
            return [r for piece in pieces for r in input_ranges(piece, dim, reaches)]
        ranges, offset = [], 0
        for piece in pieces:
            ranges += [(offset + a, offset + b) for a, b in input_ranges(piece, dim, reaches)]
            offset += _shape(piece)[dim] if _shape(piece) else 0
        return ranges
    found = _layout_source(node, dim, len(shape))
    # a view whose source does not reach got its value from an in-place write: all of it
    if found is not None and reaches(found[0]):
        return input_ranges(*found, reaches)
    written = _written_ranges(node, dim, shape[dim], reaches)
    return written if written else [(0, shape[dim])]


_WRITES = {aten.copy_.default}
_BIG = 2 ** 62  # slice ends past the size (``z[:, I:]`` records stop=sys.maxsize)


def _written_ranges(base: fx.Node, dim: int, size: int, reaches: Callable) -> list[tuple[int, int]]:
    """Ranges along ``dim`` of ``base`` filled in place from values that reach an earlier
    use: ``z[:, I:] = h`` is ``copy_(slice(z, 1, I, end), h)``. Empty when nothing of the
    kind writes ``base`` (then the caller takes all of it)."""
    ranges, pending = [], [(base, dim, 0, size)]
    while pending:
        view, view_dim, start, stop = pending.pop()
        for user in view.users:
            if user.target in _WRITES and user.args[0] is view:
                if reaches(user.args[1]):
                    ranges.append((start, stop))
            elif user.target is aten.slice.Tensor and user.args[0] is view:
                sliced = _arg(user, 1, "dim", 0) % max(len(_shape(view)), 1)
                if sliced != view_dim:
                    pending.append((user, view_dim, start, stop))
                    continue
                first = _arg(user, 2, "start", None) or 0
                last = _arg(user, 3, "end", None)
                width = stop - start
                first = first + width if first < 0 else first
                last = width if last is None or last >= _BIG else (last + width if last < 0 else last)
                pending.append((user, view_dim, start + min(first, width), start + min(last, width)))
            elif user.target is aten.select.int and user.args[0] is view:
                selected = user.args[1] % len(_shape(view))
                if selected != view_dim:
                    pending.append((user, view_dim - (selected < view_dim), start, stop))
    return ranges


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, overlapping and touching ranges joined."""
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(stop, merged[-1][1]))
        else:
            merged.append((start, stop))
    return merged


# --------------------------------------------------------------------------- output gates

_CHUNKS = {aten.chunk.default, aten.unsafe_chunk.default}
_SPLITS = {aten.split.Tensor, aten.unsafe_split.Tensor, aten.split_with_sizes.default,
           aten.unsafe_split_with_sizes.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# Unary ops that keep the gate layout: the gate nonlinearity applied before the split.
_UNARY_PASS = {aten.clone.default, aten.contiguous.default, aten.sigmoid.default,
               aten.tanh.default, aten.relu.default, aten.hardsigmoid.default, aten.dropout.default}
# Ops between a weight's output and the cut into gates that keep the gate layout (the
# shape is checked too): the above, bias adds, sums of the input and recurrent parts,
# layer/batch norm of the gates (LayerNorm LSTM, recurrent batch normalization).
_GATE_PASS = _UNARY_PASS | {aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.mul.Tensor,
                            aten.addmm.default, aten.layer_norm.default, aten.batch_norm.default}


def _split_cuts(node: fx.Node, size: int) -> set[int]:
    """Offsets at which chunk/split ``node`` cuts a dim of ``size``."""
    if node.target in _CHUNKS:
        pieces = node.args[1]
        width = -(-size // pieces)
        return set(range(0, size, width))
    sizes = node.args[1]
    if isinstance(sizes, int):
        return set(range(0, size, sizes))
    return {sum(sizes[:i]) for i in range(len(sizes))}


def _cuts(node: fx.Node, dim: int, offset: int, depth: int, passing: set) -> tuple[set, set]:
    """Offsets along ``dim`` (shifted by ``offset``) where the users of ``node`` cut it:
    those of chunk/split, and those of views and slices (weaker evidence: a state sliced
    into two populations, or an output viewed as a matrix, looks the same)."""
    shape = _shape(node)
    if depth == 0 or not shape:
        return set(), set()
    size, explicit, sliced = shape[dim], set(), set()
    for user in node.users:
        target, user_shape = user.target, _shape(user)
        if target in _CHUNKS | _SPLITS and _arg(user, 2, "dim", 0) % len(shape) == dim:
            explicit |= {offset + cut for cut in _split_cuts(user, size)}
        elif target in _VIEWS and len(user_shape) == len(shape) + 1 \
                and user_shape[:dim] == shape[:dim] and user_shape[dim + 2:] == shape[dim + 1:]:
            sliced |= set(range(offset, offset + size, user_shape[dim + 1]))
        elif target is aten.slice.Tensor and _arg(user, 1, "dim", 0) % len(shape) == dim:
            start, stop, _ = slice(_arg(user, 2, "start", None), _arg(user, 3, "end", None)).indices(size)
            inner = _cuts(user, dim, offset + start, depth - 1, _UNARY_PASS)
            explicit, sliced = explicit | inner[0], sliced | inner[1] | {offset + start, offset + stop}
        elif target in passing and user_shape == shape:
            inner = _cuts(user, dim, offset, depth - 1, passing)
            explicit, sliced = explicit | inner[0], sliced | inner[1]
    return explicit, sliced


def gate_count(node: fx.Node, out_dim: int, state_width: int | None = None, depth: int = 4) -> int:
    """Number of equal gate blocks ``node``'s output is cut into along ``out_dim`` (1 when
    it is not cut, or not into equal blocks). Cuts seen only in views and slices count when
    each block is as wide as the state the weight reads (``state_width``)."""
    shape = _shape(node)
    if not shape:
        return 1
    dim = out_dim % len(shape)
    explicit, sliced = _cuts(node, dim, 0, depth, _GATE_PASS)
    bounds = sorted(explicit | sliced | {0, shape[dim]})
    widths = {b - a for a, b in zip(bounds, bounds[1:])}
    if len(widths) != 1:
        return 1
    if sliced - explicit - {0, shape[dim]} and widths != {state_width}:
        return 1
    return len(bounds) - 1
