"""Compiled CPU kernels (numba) for block-sparse recurrent products (16x16 tiles).

PyTorch's BSR matmul does not beat its CSR one on CPU, so tiles gained nothing. These
kernels are plain loops compiled by numba, parallel over block rows (or, for gated cells,
over blocks of 16 hidden units), around one hand-written vector operation,
:func:`_tile_apply`: a 16-wide accumulator plus a 16x16 tile times 16 state values, the
tile stored transposed so each of its rows is one contiguous 16-float load. LLVM left to
itself vectorised the batch loop of the old kernel with gathers and scatters and ran
batch 16 at ~2 GFLOPS; the explicit vector keeps the accumulator in registers for the
whole tile at any batch size.

* ``bsr_addmm``: ``u + W h`` for one step (any cell);
* ``bsr_elman``: a fused Elman sequence ``h_t = act(U_t + W h_{t-1})``;
* ``bsr_lstm`` / ``bsr_gru``: fused LSTM / GRU sequences: per step one pass over the tiles
  of the stacked ``(4H, H)`` / ``(3H, H)`` recurrent matrix produces every gate of a block
  of 16 units, and the cell's nonlinearity is applied there (PyTorch's gate orders: LSTM
  i, f, g, o; GRU r, z, n with ``b_hn`` inside ``r * (W_hn h + b_hn)``).

At batch 1 each cell runs its own step function over flat vectors, which accumulates
straight into the step's outputs (Elman, one thread) or a block's gates, without the batch
loops around the 16-wide copies (bitwise the same sums). In interleaved A/B runs, H=4096 Elman
at 98% on one thread took 16% less time a sequence; H=2048 LSTM at 90% 15% less on one
thread and 18% less on two; GRU 4% and 10% less.

Every sequence runs all ``T`` steps in one call, so nothing returns to Python between
steps. States and inputs are batch-major, as PyTorch lays them out: ``(batch, hidden)``
states, ``(T, batch, gates * hidden)`` projected inputs, ``(T, batch, hidden)`` outputs
(float32, C-contiguous), so no transpose is needed on either side of a layer. ``threads=1`` runs serially compiled copies
of the same loops (no parallel region at all). Numba is imported lazily: without it,
:data:`AVAILABLE` is False and the runtime simply does not offer these kernels.
"""

from __future__ import annotations

import os
import types as types_module

import numpy as np

try:  # pragma: no cover - exercised by whichever branch the machine has
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic

    AVAILABLE = True
except ImportError:  # pragma: no cover
    numba = None
    AVAILABLE = False

__all__ = ["AVAILABLE", "ACTIVATIONS", "TILE", "max_threads", "usable_cores", "get_threads", "set_threads",
           "run_in_threads", "bsr_addmm", "bsr_elman", "bsr_lstm", "bsr_gru", "gather_columns"]

TILE = 16
ACTIVATIONS = {"identity": 0, "tanh": 1, "relu": 2}


def max_threads() -> int:
    """Most worker threads the kernels can use (numba's pool size; 1 without numba)."""
    return numba.config.NUMBA_NUM_THREADS if AVAILABLE else 1


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask (``taskset``, a cgroup cpuset), not
    the machine's core count that numba sizes its pool by."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - no affinity masks on this platform
        return os.cpu_count() or 1


def get_threads() -> int:
    """Worker threads numba's parallel loops are set to use now."""
    return numba.get_num_threads() if AVAILABLE else 1


def set_threads(threads: int) -> None:
    """Use ``threads`` worker threads (capped by what numba was started with)."""
    if AVAILABLE:
        numba.set_num_threads(max(1, min(int(threads), max_threads())))


def _kernel_threads(threads: int | None) -> int:
    """Threads one kernel call runs on: ``threads`` (``None``: numba's count now), never
    more than :func:`usable_cores`. More spinning workers than CPUs made a step wait for
    the scheduler at every barrier: an Elman sequence pinned to one CPU with numba's two
    workers took 400 ms instead of 8."""
    wanted = get_threads() if threads is None else int(threads)
    return max(1, min(wanted, usable_cores(), max_threads()))


def _in_threads(count: int, call):
    """``call(serial)`` with numba's count at ``count`` for its duration (then restored)."""
    if count == 1:
        return call(True)
    before = get_threads()
    if before != count:
        set_threads(count)
    try:
        return call(False)
    finally:
        if before != count:
            set_threads(before)


def run_in_threads(threads: int | None, call):
    """``call(serial)`` on at most ``threads`` threads (``None``: numba's count now), never more
    than :func:`usable_cores`: ``serial`` is True when that is one thread (run the serially
    compiled copy, no parallel region), else numba's count is set for the call and restored."""
    return _in_threads(_kernel_threads(threads), call)


if AVAILABLE:
    # No 'nnan'/'ninf': the cells compare and exponentiate, and must stay IEEE there.
    _FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
    FAST_MATH = frozenset(_FAST)

    def _make_tile_apply(chains: int):
        """The tile product ``acc[a:a+16] += sum_j x[x_start + j*x_stride] * tiles[tile_start + 16j : +16]``
        as an intrinsic, its 16 row products summed in ``chains`` independent partial sums.

        ``chains=1`` adds every row product straight into the loaded accumulator: the
        throughput form, for batches, where the samples' accumulators are the independent
        chains. ``chains=4`` sums the tile apart and adds it to the accumulator once: the
        latency form, for batch 1, where consecutive tiles then overlap instead of each one
        waiting for the previous tile's 16 dependent multiply-adds and its store (90% float16
        tiles at batch 1: 8.8 -> 5.5 ms a sequence). Both use 'contract' only (a multiply and
        an add may fuse), no 'reassoc': with it LLVM folded the partial sums back into one.
        """

        @intrinsic
        def tile_apply(typingctx, acc, acc_start, tiles, tile_start, x, x_start, x_stride):
            floats = types.Array(types.float32, 1, "C")
            if not all(isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 1 for a in (acc, x)):
                return None
            # Tiles in float32, or in IEEE half precision held as uint16 bits (half the bytes:
            # widened to float32 in registers, one vcvtph2ps per tile row where F16C exists),
            # or as int8 integers (converted exactly; the caller applies any scale).
            dtype = tiles.dtype if isinstance(tiles, types.Array) and tiles.ndim == 1 else None
            if dtype not in (types.float32, types.uint16, types.int8):
                return None
            half, int8 = dtype == types.uint16, dtype == types.int8
            tile_type = types.Array(dtype, 1, "C")
            signature = types.void(floats, types.intp, tile_type, types.intp, floats, types.intp,
                                   types.intp)

            def codegen(context, builder, sig, args):
                acc_data = context.make_array(sig.args[0])(context, builder, args[0]).data
                tile_data = context.make_array(sig.args[2])(context, builder, args[2]).data
                x_data = context.make_array(sig.args[4])(context, builder, args[4]).data
                vector = ir.VectorType(ir.FloatType(), TILE)
                index = ir.IntType(64)
                splat = ir.Constant(ir.VectorType(ir.IntType(32), TILE), [0] * TILE)
                acc_pointer = builder.bitcast(builder.gep(acc_data, [args[1]]), vector.as_pointer())
                sums = [builder.load(acc_pointer, align=4)] if chains == 1 else [None] * chains
                for j in range(TILE):
                    row_start = builder.add(args[3], ir.Constant(index, TILE * j))
                    if half:
                        bits = ir.VectorType(ir.IntType(16), TILE)
                        row_pointer = builder.bitcast(builder.gep(tile_data, [row_start]), bits.as_pointer())
                        row = builder.bitcast(builder.load(row_pointer, align=2),
                                              ir.VectorType(ir.HalfType(), TILE))
                        row = builder.fpext(row, vector)
                    elif int8:
                        integers = ir.VectorType(ir.IntType(8), TILE)
                        row_pointer = builder.bitcast(builder.gep(tile_data, [row_start]), integers.as_pointer())
                        row = builder.sitofp(builder.load(row_pointer, align=1), vector)
                    else:
                        row_pointer = builder.bitcast(builder.gep(tile_data, [row_start]), vector.as_pointer())
                        row = builder.load(row_pointer, align=4)
                    x_index = builder.add(args[5], builder.mul(args[6], ir.Constant(index, j)))
                    value = builder.load(builder.gep(x_data, [x_index]))
                    broadcast = builder.insert_element(ir.Constant(vector, ir.Undefined), value,
                                                       ir.Constant(ir.IntType(32), 0))
                    broadcast = builder.shuffle_vector(broadcast, ir.Constant(vector, ir.Undefined), splat)
                    product = builder.fmul(broadcast, row, flags=["contract"])
                    k = j % chains
                    sums[k] = product if sums[k] is None else builder.fadd(sums[k], product, flags=["contract"])
                while len(sums) > 1:   # pairwise: (s0 + s1) + (s2 + s3)
                    sums = [builder.fadd(sums[i], sums[i + 1], flags=["contract"]) for i in range(0, len(sums), 2)]
                total = sums[0] if chains == 1 else \
                    builder.fadd(builder.load(acc_pointer, align=4), sums[0], flags=["contract"])
                builder.store(total, acc_pointer, align=4)
                return context.get_dummy_value()

            return signature, codegen

        return tile_apply

    _tile_apply = _make_tile_apply(1)          # batches
    _tile_apply_single = _make_tile_apply(4)   # batch 1

    # float32 constants, so the nonlinearities compute in float32 and vectorise
    _CLAMP = np.float32(7.90531110763549805)
    _P = tuple(np.float32(v) for v in (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
                                       5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
                                       4.89352455891786e-03))
    _Q = tuple(np.float32(v) for v in (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
                                       4.89352518554385e-03))
    _HALF = np.float32(0.5)
    _ZERO = np.float32(0.0)
    # error_model="numpy": no ZeroDivisionError branch, which would keep loops scalar
    _inline = njit(inline="always", fastmath=_FAST, error_model="numpy")

    @_inline
    def _tanh(value):
        """tanh as a 13/6 rational function on [-7.9, 7.9] (Eigen's float tanh): pure
        arithmetic, so loops over it vectorise; error below 3e-7 against PyTorch's."""
        x = value if value < _CLAMP else _CLAMP
        x = x if x > -_CLAMP else -_CLAMP
        x2 = x * x
        p = x2 * _P[0] + _P[1]
        p = p * x2 + _P[2]
        p = p * x2 + _P[3]
        p = p * x2 + _P[4]
        p = p * x2 + _P[5]
        p = p * x2 + _P[6]
        q = x2 * _Q[0] + _Q[1]
        q = q * x2 + _Q[2]
        q = q * x2 + _Q[3]
        return x * p / q

    @_inline
    def _sigmoid(value):
        """sigmoid(x) = (1 + tanh(x / 2)) / 2; absolute error below 2e-7."""
        return _HALF + _HALF * _tanh(_HALF * value)

    @_inline
    def _apply(acc, start, count, activation):
        """acc[start:start+count] = act(...) in place: 1 tanh, 2 relu, 3 sigmoid, 0 nothing.

        ``count`` is a multiple of 16; the inner loops have the constant trip count 16, so
        LLVM turns each into a few vector instructions (with a runtime count it kept them
        scalar: an Elman step over an empty matrix cost 9.4 us, 4.8 without the tanh)."""
        for block in range(count // TILE):
            first = start + block * TILE
            if activation == 1:
                for i in range(TILE):
                    acc[first + i] = _tanh(acc[first + i])
            elif activation == 2:
                for i in range(TILE):
                    acc[first + i] = acc[first + i] if acc[first + i] > _ZERO else _ZERO
            elif activation == 3:
                for i in range(TILE):
                    acc[first + i] = _sigmoid(acc[first + i])

    @_inline
    def _start(acc, acc_start, source, row_start, batch):
        """acc[acc_start + 16 b + i] = source[b, row_start + i]: one block of rows per sample."""
        for b in range(batch):
            for i in range(TILE):
                acc[acc_start + b * TILE + i] = source[b, row_start + i]

    @_inline
    def _accumulate(ptr, cols, tiles, block_row, h, hidden, batch, acc, acc_start):
        """acc[acc_start + 16 b + i] += (W h_b)[16 block_row + i]; ``tiles`` and ``h`` flat,
        ``h`` holding the batch's states one after the other (batch, hidden)."""
        if batch == 1:
            for k in range(ptr[block_row], ptr[block_row + 1]):
                _tile_apply_single(acc, acc_start, tiles, k * TILE * TILE, h, cols[k] * TILE, 1)
            return
        for k in range(ptr[block_row], ptr[block_row + 1]):
            column = cols[k] * TILE
            for b in range(batch):
                _tile_apply(acc, acc_start + b * TILE, tiles, k * TILE * TILE, h, b * hidden + column, 1)

    # The step functions keep each nonlinearity in a loop of its own over contiguous
    # accumulators, so that it vectorises.
    def _elman_step(ptr, cols, tiles, u, h, out, activation, scratch):
        """out = act(u + h W^T) over all block rows of W; u, out (batch, rows), h (batch, hidden)."""
        batch, hidden = h.shape
        flat_tiles, flat_h = tiles.reshape(-1), h.reshape(-1)
        for block_row in prange(ptr.shape[0] - 1):
            acc = scratch[block_row]
            base = block_row * TILE
            _start(acc, 0, u, base, batch)
            _accumulate(ptr, cols, flat_tiles, block_row, flat_h, hidden, batch, acc, 0)
            _apply(acc, 0, TILE * batch, activation)
            for b in range(batch):
                for i in range(TILE):
                    out[b, base + i] = acc[b * TILE + i]

    def _elman_step_single(ptr, cols, tiles, u, h, out, activation):
        """:func:`_elman_step` for one sample: ``u``, ``h``, ``out`` and ``tiles`` flat.

        Each block row accumulates straight into its 16 outputs (no scratch, no batch loop
        around the 16-wide copies), so the per-row work around the tiles is a vector copy,
        the tiles and the nonlinearity: H=4096, 98%, one thread, 16% less time a sequence
        (0.45 -> 0.35 ms over an empty matrix). Serial only: on two threads the same loop was
        20% slower than :func:`_elman_step`, and with a scratch row no faster."""
        for block_row in range(ptr.shape[0] - 1):
            base = block_row * TILE
            for i in range(TILE):
                out[base + i] = u[base + i]
            for k in range(ptr[block_row], ptr[block_row + 1]):
                _tile_apply_single(out, base, tiles, k * TILE * TILE, h, cols[k] * TILE, 1)
            _apply(out, base, TILE, activation)

    def _lstm_step(ptr, cols, tiles, u, h, c, h_out, scratch):
        """One LSTM step for every block of 16 units: its 4 gate block rows, then the cell.

        ``u`` (batch, 4H) holds W_ih x + b_ih + b_hh; ``c`` (batch, H) is updated in place
        (each block only reads and writes its own units), ``h`` is read and ``h_out`` written.
        """
        batch, hidden = h.shape
        blocks = hidden // TILE
        flat_tiles, flat_h = tiles.reshape(-1), h.reshape(-1)
        gate = TILE * batch
        for block in prange(blocks):
            acc = scratch[block]
            base = block * TILE
            for g in range(4):
                block_row = g * blocks + block
                _start(acc, g * gate, u, block_row * TILE, batch)
                _accumulate(ptr, cols, flat_tiles, block_row, flat_h, hidden, batch, acc, g * gate)
            _apply(acc, 0, 2 * gate, 3)          # input, forget
            _apply(acc, 2 * gate, gate, 1)       # cell candidate
            _apply(acc, 3 * gate, gate, 3)       # output
            for b in range(batch):
                for i in range(TILE):
                    a = b * TILE + i
                    cell = acc[gate + a] * c[b, base + i] + acc[a] * acc[2 * gate + a]
                    c[b, base + i] = cell
                    acc[a] = cell
            _apply(acc, 0, gate, 1)
            for b in range(batch):
                for i in range(TILE):
                    h_out[b, base + i] = acc[3 * gate + b * TILE + i] * acc[b * TILE + i]

    def _lstm_step_single(ptr, cols, tiles, u, h, c, h_out, scratch):
        """:func:`_lstm_step` for one sample: ``u``, ``h``, ``c``, ``h_out`` and ``tiles`` flat,
        ``scratch`` (blocks, 64) holding a block's four gates."""
        blocks = h.shape[0] // TILE
        for block in prange(blocks):
            acc = scratch[block]
            base = block * TILE
            for g in range(4):
                block_row = g * blocks + block
                for i in range(TILE):
                    acc[g * TILE + i] = u[block_row * TILE + i]
                for k in range(ptr[block_row], ptr[block_row + 1]):
                    _tile_apply_single(acc, g * TILE, tiles, k * TILE * TILE, h, cols[k] * TILE, 1)
            _apply(acc, 0, 2 * TILE, 3)          # input, forget
            _apply(acc, 2 * TILE, TILE, 1)       # cell candidate
            _apply(acc, 3 * TILE, TILE, 3)       # output
            for i in range(TILE):
                cell = acc[TILE + i] * c[base + i] + acc[i] * acc[2 * TILE + i]
                c[base + i] = cell
                acc[i] = cell
            _apply(acc, 0, TILE, 1)
            for i in range(TILE):
                h_out[base + i] = acc[3 * TILE + i] * acc[i]

    def _gru_step_single(ptr, cols, tiles, u, bias_n, h, h_out, scratch):
        """:func:`_gru_step` for one sample: ``u``, ``h``, ``h_out`` and ``tiles`` flat,
        ``scratch`` (blocks, 48) holding a block's three gates."""
        hidden = h.shape[0]
        blocks = hidden // TILE
        for block in prange(blocks):
            acc = scratch[block]
            base = block * TILE
            for g in range(3):
                block_row = g * blocks + block
                if g < 2:
                    for i in range(TILE):
                        acc[g * TILE + i] = u[block_row * TILE + i]
                else:
                    for i in range(TILE):
                        acc[2 * TILE + i] = bias_n[base + i]
                for k in range(ptr[block_row], ptr[block_row + 1]):
                    _tile_apply_single(acc, g * TILE, tiles, k * TILE * TILE, h, cols[k] * TILE, 1)
            _apply(acc, 0, 2 * TILE, 3)          # reset, update
            for i in range(TILE):
                acc[2 * TILE + i] = u[2 * hidden + base + i] + acc[i] * acc[2 * TILE + i]
            _apply(acc, 2 * TILE, TILE, 1)       # new gate
            for i in range(TILE):
                new = acc[2 * TILE + i]
                h_out[base + i] = new + acc[TILE + i] * (h[base + i] - new)

    def _gru_step(ptr, cols, tiles, u, bias_n, h, h_out, scratch):
        """One GRU step for every block of 16 units: its 3 gate block rows, then the cell.

        ``u`` (batch, 3H) holds W_ih x + b_ih (+ b_hh for r and z); ``bias_n`` (H,) is b_hn,
        added to W_hn h before the reset gate multiplies it.
        """
        batch, hidden = h.shape
        blocks = hidden // TILE
        flat_tiles, flat_h = tiles.reshape(-1), h.reshape(-1)
        gate = TILE * batch
        for block in prange(blocks):
            acc = scratch[block]
            base = block * TILE
            for g in range(2):
                block_row = g * blocks + block
                _start(acc, g * gate, u, block_row * TILE, batch)
                _accumulate(ptr, cols, flat_tiles, block_row, flat_h, hidden, batch, acc, g * gate)
            for b in range(batch):
                for i in range(TILE):
                    acc[2 * gate + b * TILE + i] = bias_n[base + i]
            _accumulate(ptr, cols, flat_tiles, 2 * blocks + block, flat_h, hidden, batch, acc, 2 * gate)
            _apply(acc, 0, 2 * gate, 3)          # reset, update
            for b in range(batch):
                for i in range(TILE):
                    a = b * TILE + i
                    acc[2 * gate + a] = u[b, 2 * hidden + base + i] + acc[a] * acc[2 * gate + a]
            _apply(acc, 2 * gate, gate, 1)       # new gate
            for b in range(batch):
                for i in range(TILE):
                    a = b * TILE + i
                    new = acc[2 * gate + a]
                    h_out[b, base + i] = new + acc[gate + a] * (h[b, base + i] - new)

    def _named(function, suffix):
        """A copy of ``function`` under its own name. Numba's on-disk cache keys a compiled
        function by its module, qualified name and line, not by its compile options, so a
        serial and a parallel build of one Python function would share one cache entry and
        whichever was compiled first would be loaded for both (the parallel kernels then ran
        on one thread). Each build therefore compiles a copy with its own name."""
        copy = types_module.FunctionType(function.__code__, function.__globals__, function.__name__ + suffix,
                                         function.__defaults__, function.__closure__)
        copy.__qualname__ = function.__qualname__ + suffix
        return copy

    def _parallel(function):
        return njit(parallel=True, fastmath=_FAST, error_model="numpy", cache=True,
                    nogil=True)(_named(function, "_parallel"))

    def _serial(function):
        return njit(fastmath=_FAST, error_model="numpy", cache=True, nogil=True)(_named(function, "_serial"))

    def serial_and_parallel(function):
        """``(serial, parallel)`` compiled builds of ``function`` (its loops may use ``prange``),
        each cached under its own name, for :func:`run_in_threads` to choose between."""
        return _serial(function), _parallel(function)

    _elman_parallel, _elman_serial = _parallel(_elman_step), _serial(_elman_step)
    _elman_single_serial = _serial(_elman_step_single)   # one thread only (see _elman_sequence)
    _lstm_parallel, _lstm_serial = _parallel(_lstm_step), _serial(_lstm_step)
    _gru_parallel, _gru_serial = _parallel(_gru_step), _serial(_gru_step)
    _lstm_single_parallel, _lstm_single_serial = _parallel(_lstm_step_single), _serial(_lstm_step_single)
    _gru_single_parallel, _gru_single_serial = _parallel(_gru_step_single), _serial(_gru_step_single)

    @njit(cache=True, nogil=True)
    def _gather_columns(source, index, out):
        for row in range(source.shape[0]):
            for j in range(index.shape[0]):
                out[row, j] = source[row, index[j]]

    # The sequences: step t reads step t-1's state and writes its own. Without ``inverse``
    # (empty) the states are the outputs, in stored order. With it, each state goes to one
    # of two buffers in turn and is gathered into the module's unit order while it is still
    # in cache, ``outputs[t][:, j] = state[:, inverse[j]]``: no stored-order copy of the
    # sequence and no pass over it afterwards (H=4096, one thread: 7-12% less time than the
    # sequence plus a gather after it, at 98% and 90%).
    @njit(cache=True, nogil=True)
    def _elman_sequence(ptr, cols, tiles, projected, h0, outputs, activation, inverse, serial):
        ordered = inverse.shape[0] > 0
        states = np.empty((2 if ordered else 0, h0.shape[0], h0.shape[1]), dtype=np.float32)
        if h0.shape[0] == 1 and serial:   # in parallel, writing straight into the outputs was 20% slower
            flat_tiles = tiles.reshape(-1)
            for t in range(projected.shape[0]):
                h = h0[0] if t == 0 else (states[(t - 1) % 2, 0] if ordered else outputs[t - 1, 0])
                state = states[t % 2, 0] if ordered else outputs[t, 0]
                _elman_single_serial(ptr, cols, flat_tiles, projected[t, 0], h, state, activation)
                if ordered:
                    _gather_columns(states[t % 2], inverse, outputs[t])
            return
        scratch = np.empty((ptr.shape[0] - 1, TILE * h0.shape[0]), dtype=np.float32)
        for t in range(projected.shape[0]):
            h = h0 if t == 0 else (states[(t - 1) % 2] if ordered else outputs[t - 1])
            state = states[t % 2] if ordered else outputs[t]
            if serial:
                _elman_serial(ptr, cols, tiles, projected[t], h, state, activation, scratch)
            else:
                _elman_parallel(ptr, cols, tiles, projected[t], h, state, activation, scratch)
            if ordered:
                _gather_columns(state, inverse, outputs[t])

    @njit(cache=True, nogil=True)
    def _lstm_sequence(ptr, cols, tiles, projected, h0, c, outputs, inverse, serial):
        ordered = inverse.shape[0] > 0
        states = np.empty((2 if ordered else 0, h0.shape[0], h0.shape[1]), dtype=np.float32)
        scratch = np.empty((h0.shape[1] // TILE, 4 * TILE * h0.shape[0]), dtype=np.float32)
        flat_tiles = tiles.reshape(-1)
        for t in range(projected.shape[0]):
            h = h0 if t == 0 else (states[(t - 1) % 2] if ordered else outputs[t - 1])
            state = states[t % 2] if ordered else outputs[t]
            if h0.shape[0] == 1:
                if serial:
                    _lstm_single_serial(ptr, cols, flat_tiles, projected[t, 0], h[0], c[0], state[0], scratch)
                else:
                    _lstm_single_parallel(ptr, cols, flat_tiles, projected[t, 0], h[0], c[0], state[0], scratch)
            elif serial:
                _lstm_serial(ptr, cols, tiles, projected[t], h, c, state, scratch)
            else:
                _lstm_parallel(ptr, cols, tiles, projected[t], h, c, state, scratch)
            if ordered:
                _gather_columns(state, inverse, outputs[t])

    @njit(cache=True, nogil=True)
    def _gru_sequence(ptr, cols, tiles, projected, bias_n, h0, outputs, inverse, serial):
        ordered = inverse.shape[0] > 0
        states = np.empty((2 if ordered else 0, h0.shape[0], h0.shape[1]), dtype=np.float32)
        scratch = np.empty((h0.shape[1] // TILE, 3 * TILE * h0.shape[0]), dtype=np.float32)
        flat_tiles = tiles.reshape(-1)
        for t in range(projected.shape[0]):
            h = h0 if t == 0 else (states[(t - 1) % 2] if ordered else outputs[t - 1])
            state = states[t % 2] if ordered else outputs[t]
            if h0.shape[0] == 1:
                if serial:
                    _gru_single_serial(ptr, cols, flat_tiles, projected[t, 0], bias_n, h[0], state[0], scratch)
                else:
                    _gru_single_parallel(ptr, cols, flat_tiles, projected[t, 0], bias_n, h[0], state[0], scratch)
            elif serial:
                _gru_serial(ptr, cols, tiles, projected[t], bias_n, h, state, scratch)
            else:
                _gru_parallel(ptr, cols, tiles, projected[t], bias_n, h, state, scratch)
            if ordered:
                _gather_columns(state, inverse, outputs[t])


def _need() -> None:
    if not AVAILABLE:
        raise RuntimeError("numba is not installed: pip install numba (or use the 'csr' / 'bsr' kernels)")


def _check(ptr: np.ndarray, cols: np.ndarray, tiles_t: np.ndarray, rows: int, hidden: int,
           gates: int = 1) -> None:
    """Refuse inputs the loops would read out of bounds: a wrong tile size, row or column count."""
    if tiles_t.ndim != 3 or tiles_t.shape[1:] != (TILE, TILE) or tiles_t.shape[0] != cols.shape[0]:
        raise ValueError(f"tiles must have shape ({cols.shape[0]}, {TILE}, {TILE}) (one per block "
                         f"column index), got {tiles_t.shape}")
    if (ptr.shape[0] - 1) * TILE != rows or hidden % TILE:
        raise ValueError(f"{ptr.shape[0] - 1} block rows of {TILE} do not make {rows} rows, or "
                         f"{hidden} state units are not a multiple of {TILE}")
    if gates > 1 and rows != gates * hidden:
        raise ValueError(f"{gates} gates of {hidden} units need {gates} x {hidden} projected rows, got {rows}")
    if cols.shape[0] and int(cols.max()) >= hidden // TILE:
        raise ValueError(f"block column {int(cols.max())} is outside the {hidden // TILE} blocks of the state")


def bsr_addmm(ptr: np.ndarray, cols: np.ndarray, tiles_t: np.ndarray, u: np.ndarray, h: np.ndarray,
              out: np.ndarray) -> np.ndarray:
    """``out = u + h W^T`` for every sample: block-row pointers ``ptr``, block columns ``cols``
    (int32) and transposed tiles ``tiles_t`` (blocks, 16, 16) of ``W``; ``u`` and ``out`` are
    (batch, rows), ``h`` is (batch, hidden), all float32 C-contiguous."""
    _need()
    _check(ptr, cols, tiles_t, u.shape[1], h.shape[1])
    scratch = np.empty((ptr.shape[0] - 1, TILE * h.shape[0]), np.float32)
    _in_threads(_kernel_threads(None), lambda serial: (_elman_serial if serial else _elman_parallel)(
        ptr, cols, tiles_t, u, h, out, 0, scratch))
    return out


def gather_columns(source: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``source[:, index]`` for a 2-D float32 array (3x faster than PyTorch's indexing here)."""
    _need()
    if index.shape[0] and (int(index.min()) < 0 or int(index.max()) >= source.shape[1]):
        raise ValueError(f"column index outside 0..{source.shape[1] - 1}")
    out = np.empty((source.shape[0], index.shape[0]), dtype=source.dtype)
    _gather_columns(source, index, out)
    return out


def _output_order(inverse: np.ndarray | None, hidden: int) -> np.ndarray:
    """``inverse`` as the sequences take it: int64, or empty for the stored order."""
    if inverse is None:
        return np.empty(0, np.int64)
    inverse = np.ascontiguousarray(inverse, dtype=np.int64)
    if inverse.shape != (hidden,) or (hidden and (int(inverse.min()) < 0 or int(inverse.max()) >= hidden)):
        raise ValueError(f"inverse must hold {hidden} unit indices in 0..{hidden - 1}, got shape "
                         f"{inverse.shape}" + (f" and values {int(inverse.min())}..{int(inverse.max())}"
                                               if inverse.size else ""))
    return inverse


def bsr_elman(ptr: np.ndarray, cols: np.ndarray, tiles_t: np.ndarray, projected: np.ndarray, h0: np.ndarray,
              outputs: np.ndarray, activation: str, threads: int | None = None,
              inverse: np.ndarray | None = None) -> np.ndarray:
    """All steps ``h_t = act(projected[t] + h_{t-1} W^T)`` (h0 before step 0) into ``outputs``.

    ``projected`` and ``outputs`` are (T, batch, hidden), ``h0`` is (batch, hidden);
    ``activation`` is tanh or relu (or identity); ``threads=1`` runs the serial copy,
    ``None`` follows :func:`get_threads`; never more threads than :func:`usable_cores`.
    ``inverse`` (hidden,): write ``outputs[t][:, j] = h_t[:, inverse[j]]``, the states in
    another unit order (the module's, for tiles stored in a permuted order); ``None``: as stored.
    """
    _need()
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    _check(ptr, cols, tiles_t, projected.shape[2], h0.shape[1])
    code, order = ACTIVATIONS[activation], _output_order(inverse, h0.shape[1])
    _in_threads(_kernel_threads(threads), lambda serial: _elman_sequence(
        ptr, cols, tiles_t, projected, h0, outputs, code, order, serial))
    return outputs


def bsr_lstm(ptr: np.ndarray, cols: np.ndarray, tiles_t: np.ndarray, projected: np.ndarray, h0: np.ndarray,
             c: np.ndarray, outputs: np.ndarray, threads: int | None = None,
             inverse: np.ndarray | None = None) -> np.ndarray:
    """All steps of an LSTM layer with the stacked ``(4H, H)`` recurrent matrix in tiles.

    ``projected`` (T, batch, 4H) is ``W_ih x_t + b_ih + b_hh``; ``h0`` and ``c`` are
    (batch, H), ``c`` is overwritten with the final cell state (in stored order);
    ``outputs`` (T, batch, H) receives every ``h_t`` (``inverse``: as in :func:`bsr_elman`).
    """
    _need()
    _check(ptr, cols, tiles_t, projected.shape[2], h0.shape[1], gates=4)
    order = _output_order(inverse, h0.shape[1])
    _in_threads(_kernel_threads(threads), lambda serial: _lstm_sequence(
        ptr, cols, tiles_t, projected, h0, c, outputs, order, serial))
    return outputs


def bsr_gru(ptr: np.ndarray, cols: np.ndarray, tiles_t: np.ndarray, projected: np.ndarray, bias_n: np.ndarray,
            h0: np.ndarray, outputs: np.ndarray, threads: int | None = None,
            inverse: np.ndarray | None = None) -> np.ndarray:
    """All steps of a GRU layer with the stacked ``(3H, H)`` recurrent matrix in tiles.

    ``projected`` (T, batch, 3H) is ``W_ih x_t + b_ih`` plus ``b_hh`` on the r and z rows;
    ``bias_n`` (H,) is ``b_hn``; ``outputs`` (T, batch, H) receives every ``h_t``
    (``inverse``: as in :func:`bsr_elman`).
    """
    _need()
    _check(ptr, cols, tiles_t, projected.shape[2], h0.shape[1], gates=3)
    if bias_n.shape != (h0.shape[1],):
        raise ValueError(f"bias_n must have shape ({h0.shape[1]},), got {bias_n.shape}")
    order = _output_order(inverse, h0.shape[1])
    _in_threads(_kernel_threads(threads), lambda serial: _gru_sequence(
        ptr, cols, tiles_t, projected, bias_n, h0, outputs, order, serial))
    return outputs
