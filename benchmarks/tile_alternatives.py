"""Four changes to the batch-1 Elman tile kernel that looked like ways past the byte floor
(issue 13, "Beyond"), each timed against the kernel the runtime ships.

At H=4096, 98% sparse, one thread, the whole call is the kernel (1.1-1.2x its byte floor),
the dense input projection (``torch.addmm``, compute-bound, about a third of the floor) and
the step-by-step gather into the module's unit order. Each alternative attacks one part
(the last one the bytes):

* ``rows alternating per step`` (L3/L2-resident weights across steps): odd steps walk the
  block rows backwards, in chunks of ``--chunk`` rows, so that the tiles a step read last
  are the next step's first and may still be in L2. Compared with the shipping kernel in
  stored order; the outputs must be bitwise equal (each row sums its tiles in the same order).
* ``projection fused into the steps``: no up-front GEMM; while step t streams the recurrent
  tiles, each block row also projects a share of the next ``--ahead`` steps' inputs
  (``W_ih`` stored as 16x16 tiles, each read once per ``--ahead`` steps), so that the
  compute-bound projection might hide behind the memory-bound recurrence. Compared with
  ``torch.addmm`` + the shipping kernel; the outputs differ by rounding only (the sums run
  in another order), and the largest difference is printed.
* ``scatter inside the step``: each block row writes its 16 new states to their places in
  the module's order right after computing them, instead of one gather per step. Compared
  with the shipping kernel ordering its outputs; bitwise equal outputs.
* ``int8 tiles`` (a quarter of the float32 bytes): each matrix row scaled by its largest kept
  weight over 127 (:func:`int8_tiles`), the integers converted to float32 in registers and
  each row's sum scaled once. Compared with the float32 and the float16 (``tiles16``) kernels;
  the outputs differ by the quantisation, and the largest difference is printed (a test checks
  that it computes what the dequantised matrix computes).

Each cell is the median over interleaved rounds of a round's median call, and ``x
shipping`` the median over rounds of the per-round ratio. Pin the process and keep the core
to it:

    taskset -c 0 python benchmarks/tile_alternatives.py --sparsity 0.98
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import numpy as np
import torch
from numba import njit
from tile_call_parts import _median_ms

from moduli_transform.export import numba_kernels as nk
from moduli_transform.export.bench import BenchConfig, build_module
from moduli_transform.export.sparse_runtime import SparseRNN, _to_bsr, layers_from_module

TILE = nk.TILE
TANH = nk.ACTIVATIONS["tanh"]
_compiled = njit(fastmath=set(nk.FAST_MATH), error_model="numpy")


@njit(fastmath=set(nk.FAST_MATH), error_model="numpy", inline="always")
def _add_row_tiles(ptr, cols, tiles, h, out, block_row):
    """``out[16 r : 16 r + 16] += (W h)`` of block row ``r``, its tiles in stored order."""
    for k in range(ptr[block_row], ptr[block_row + 1]):
        nk._tile_apply_single(out, block_row * TILE, tiles, k * TILE * TILE, h, cols[k] * TILE, 1)


@_compiled
def _rows_backwards(ptr, cols, tiles, u, h, out, activation, chunk):
    """The shipping batch-1 Elman step over the block rows in chunks of ``chunk`` rows, the
    last chunk first; rows inside a chunk, and tiles inside a row, in stored order."""
    rows = ptr.shape[0] - 1
    chunks = (rows + chunk - 1) // chunk
    for back in range(chunks):
        first = (chunks - 1 - back) * chunk
        for block_row in range(first, min(rows, first + chunk)):
            base = block_row * TILE
            for i in range(TILE):
                out[base + i] = u[base + i]
            _add_row_tiles(ptr, cols, tiles, h, out, block_row)
            nk._apply(out, base, TILE, activation)


@_compiled
def _alternating_sequence(ptr, cols, tiles, projected, h0, outputs, activation, chunk):
    flat_tiles = tiles.reshape(-1)
    for t in range(projected.shape[0]):
        h = h0[0] if t == 0 else outputs[t - 1, 0]
        if t % 2:
            _rows_backwards(ptr, cols, flat_tiles, projected[t, 0], h, outputs[t, 0], activation, chunk)
        else:
            nk._elman_single_serial(ptr, cols, flat_tiles, projected[t, 0], h, outputs[t, 0], activation)


@njit(fastmath=set(nk.FAST_MATH), error_model="numpy", inline="always")
def _project_tiles(inputs, first_step, steps, weight_tiles, input_blocks, first, stop, into):
    """``into[s] += W_ih x_{first_step + s}`` over the ``W_ih`` tiles ``first..stop-1`` (tile q
    is block row ``q // input_blocks``, block column ``q % input_blocks``), each tile applied
    to all ``steps`` inputs while it is in cache."""
    for q in range(first, stop):
        block_row = q // input_blocks
        block_column = q - block_row * input_blocks
        for s in range(steps):
            nk._tile_apply_single(into[s], block_row * TILE, weight_tiles, q * TILE * TILE,
                                  inputs[first_step + s], block_column * TILE, 1)


@_compiled
def _fused_projection_sequence(ptr, cols, tiles, inputs, weight_tiles, bias, h0, outputs, activation, ahead):
    steps, hidden, rows = outputs.shape[0], h0.shape[1], ptr.shape[0] - 1
    input_blocks = inputs.shape[1] // TILE
    weight_count = (bias.shape[0] // TILE) * input_blocks
    slots = ahead * rows   # (step of a window, block row) pairs that share the next window's tiles
    flat_tiles = tiles.reshape(-1)
    windows = np.empty((2, ahead, hidden), np.float32)
    for s in range(min(ahead, steps)):
        windows[0, s] = bias
    _project_tiles(inputs, 0, min(ahead, steps), weight_tiles, input_blocks, 0, weight_count, windows[0])
    for t in range(steps):
        window, s = t // ahead, t % ahead
        current, following = windows[window % 2], windows[(window + 1) % 2]
        next_first = (window + 1) * ahead
        next_steps = max(0, min(ahead, steps - next_first))
        if s == 0:
            for n in range(next_steps):
                following[n] = bias
        h = h0[0] if t == 0 else outputs[t - 1, 0]
        out = outputs[t, 0]
        for block_row in range(rows):
            base = block_row * TILE
            for i in range(TILE):
                out[base + i] = current[s, base + i]
            _add_row_tiles(ptr, cols, flat_tiles, h, out, block_row)
            nk._apply(out, base, TILE, activation)
            if next_steps:
                slot = s * rows + block_row
                _project_tiles(inputs, next_first, next_steps, weight_tiles, input_blocks,
                               slot * weight_count // slots, (slot + 1) * weight_count // slots, following)


@_compiled
def _scatter_step(ptr, cols, tiles, u, h, state, activation, perm, ordered):
    for block_row in range(ptr.shape[0] - 1):
        base = block_row * TILE
        for i in range(TILE):
            state[base + i] = u[base + i]
        _add_row_tiles(ptr, cols, tiles, h, state, block_row)
        nk._apply(state, base, TILE, activation)
        for i in range(TILE):
            ordered[perm[base + i]] = state[base + i]


@_compiled
def _scatter_sequence(ptr, cols, tiles, projected, h0, outputs, activation, perm):
    flat_tiles = tiles.reshape(-1)
    states = np.empty((2, h0.shape[1]), np.float32)
    for t in range(projected.shape[0]):
        h = h0[0] if t == 0 else states[(t - 1) % 2]
        _scatter_step(ptr, cols, flat_tiles, projected[t, 0], h, states[t % 2], activation, perm, outputs[t, 0])


@_compiled
def _int8_step(ptr, cols, tiles, row_scales, u, h, out, activation):
    for block_row in range(ptr.shape[0] - 1):
        base = block_row * TILE
        for i in range(TILE):
            out[base + i] = 0.0
        _add_row_tiles(ptr, cols, tiles, h, out, block_row)
        for i in range(TILE):
            out[base + i] = u[base + i] + row_scales[base + i] * out[base + i]
        nk._apply(out, base, TILE, activation)


@_compiled
def _int8_sequence(ptr, cols, tiles, row_scales, projected, h0, outputs, activation):
    flat_tiles = tiles.reshape(-1)
    for t in range(projected.shape[0]):
        h = h0[0] if t == 0 else outputs[t - 1, 0]
        _int8_step(ptr, cols, flat_tiles, row_scales, projected[t, 0], h, outputs[t, 0], activation)


def int8_tiles(ptr: np.ndarray, tiles_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Transposed float32 tiles (blocks, 16, 16) as int8 tiles and one float32 scale per matrix
    row (its largest kept weight over 127, so that ``W[r, c] ~ scale[r] * q``)."""
    rows = (ptr.shape[0] - 1) * TILE
    largest = np.zeros(rows, np.float32)
    block_rows = np.repeat(np.arange(ptr.shape[0] - 1), np.diff(ptr))
    row_of = block_rows[:, None] * TILE + np.arange(TILE)[None, :]        # (blocks, 16): rows of a tile
    np.maximum.at(largest, row_of.reshape(-1), np.abs(tiles_t).max(axis=1).reshape(-1))
    scales = np.where(largest > 0, largest / 127, 1).astype(np.float32)
    quantised = np.rint(tiles_t / scales[row_of][:, None, :]).clip(-127, 127).astype(np.int8)
    return quantised, scales


def comparisons(hidden: int, sparsity: float, steps: int, chunk: int, ahead: int
                ) -> list[tuple[str, Callable[[], np.ndarray], Callable[[], np.ndarray], bool]]:
    """(name, shipping call, alternative call, bitwise) for each alternative; each call
    returns its outputs (T, 1, H)."""
    module, perms = build_module(BenchConfig(hidden, 1, sparsity), "tiled")
    runtime = SparseRNN(layers_from_module(module), kernel="tiles", perms=perms, threads=1)
    runtime_half = SparseRNN(layers_from_module(module), kernel="tiles16", perms=perms, threads=1)
    kernel = runtime.kernel(0, 1)
    tiles = (kernel.ptr, kernel.cols, kernel.tiles_t)
    weight_ih, bias = runtime.layers[0].weight_ih.contiguous(), runtime._input_bias[0].contiguous()
    if weight_ih.shape[1] % TILE:
        raise SystemExit(f"the fused projection needs an input size divisible by {TILE}, got {weight_ih.shape[1]}")
    weight_tiles = _to_bsr(weight_ih, TILE).values().transpose(1, 2).contiguous().numpy().reshape(-1)
    inputs = torch.randn(steps, 1, weight_ih.shape[1])
    h0 = np.zeros((1, hidden), np.float32)

    def project() -> np.ndarray:
        return torch.addmm(bias, inputs.reshape(steps, -1), weight_ih.t()).view(steps, 1, -1).numpy()

    projected = project()
    inverse = runtime._inverse[0].numpy().astype(np.int64)
    perm = np.argsort(inverse)
    no_order = np.empty(0, np.int64)

    def fresh() -> np.ndarray:
        return np.empty((steps, 1, hidden), np.float32)

    def shipping_stored() -> np.ndarray:
        out = fresh()
        nk._elman_sequence(*tiles, projected, h0, out, TANH, no_order, True)
        return out

    def shipping_with_projection() -> np.ndarray:
        out = fresh()
        nk._elman_sequence(*tiles, project(), h0, out, TANH, no_order, True)
        return out

    def shipping_ordered() -> np.ndarray:
        out = fresh()
        nk._elman_sequence(*tiles, projected, h0, out, TANH, inverse, True)
        return out

    def alternating() -> np.ndarray:
        out = fresh()
        _alternating_sequence(*tiles, projected, h0, out, TANH, chunk)
        return out

    def fused() -> np.ndarray:
        out = fresh()
        _fused_projection_sequence(*tiles, inputs[:, 0].numpy(), weight_tiles, bias.numpy(), h0, out, TANH, ahead)
        return out

    quantised, row_scales = int8_tiles(kernel.ptr, kernel.tiles_t)
    half = runtime_half.kernel(0, 1)

    def shipping_half() -> np.ndarray:
        out = fresh()
        nk._elman_sequence(half.ptr, half.cols, half.tiles_t, projected, h0, out, TANH, no_order, True)
        return out

    def int8() -> np.ndarray:
        out = fresh()
        _int8_sequence(kernel.ptr, kernel.cols, quantised, row_scales, projected, h0, out, TANH)
        return out

    def scatter() -> np.ndarray:
        out = fresh()
        _scatter_sequence(*tiles, projected, h0, out, TANH, perm)
        return out

    return [
        (f"rows alternating per step (chunks of {chunk} rows)", shipping_stored, alternating, True),
        (f"projection fused into the steps ({ahead} steps ahead)", shipping_with_projection, fused, False),
        ("scatter inside the step", shipping_ordered, scatter, True),
        ("int8 tiles, a scale per row, against float32 tiles", shipping_stored, int8, False),
        ("int8 tiles, a scale per row, against float16 tiles (`tiles16`)", shipping_half, int8, False),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--sparsity", type=float, default=0.98)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--chunk", type=int, default=1, help="block rows per chunk walked backwards")
    parser.add_argument("--ahead", type=int, default=8, help="steps a fused projection runs ahead")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=10, help="calls per variant and round")
    args = parser.parse_args(argv)
    for name in ("chunk", "ahead", "rounds", "repeats", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    torch.set_num_threads(1)
    nk.set_threads(1)
    print(f"H={args.hidden}, {args.sparsity:.0%} sparse, T={args.steps}, batch 1, one thread")
    print("| alternative | shipping (ms) | alternative (ms) | x shipping (rounds) | outputs |")
    print("|---|---|---|---|---|")
    for name, shipping, alternative, bitwise in comparisons(args.hidden, args.sparsity, args.steps,
                                                           args.chunk, args.ahead):
        reference, result = shipping(), alternative()   # also compiles
        difference = float(np.abs(reference - result).max())
        if bitwise and not np.array_equal(reference, result):
            raise SystemExit(f"{name}: outputs differ from the shipping kernel's (max {difference:.3g})")
        check = "bitwise equal" if bitwise else f"max difference {difference:.2g}"
        times: dict[str, list[float]] = {"shipping": [], "alternative": []}
        for _ in range(args.rounds):
            times["shipping"].append(_median_ms(shipping, args.repeats))
            times["alternative"].append(_median_ms(alternative, args.repeats))
        ratios = [new / old for old, new in zip(times["shipping"], times["alternative"])]
        print(f"| {name} | {statistics.median(times['shipping']):.3f} | {statistics.median(times['alternative']):.3f} "
              f"| {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | {check} |")


if __name__ == "__main__":
    main()
