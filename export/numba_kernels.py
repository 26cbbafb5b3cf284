"""Compiled CPU kernel (numba) for block-sparse recurrent products (16x16 tiles).

PyTorch's BSR matmul does not beat its CSR one on CPU, so tiles gained nothing. This kernel
is a plain loop compiled by numba, parallel over block rows, with each tile stored
transposed so the innermost loop is one contiguous vector FMA. It comes in two forms:

* ``bsr_addmm``: ``u + W h`` for one step (any cell: GRU and LSTM gates use it);
* ``bsr_elman``: a fused Elman sequence ``h_t = act(U_t + W h_{t-1})``, all ``T`` steps in one call,
  so nothing returns to Python between steps.

States are column blocks ``(hidden, batch)`` (float32, C-contiguous), as in
:mod:`moduli_transform.export.sparse_runtime`. Numba is imported lazily: without it, :data:`AVAILABLE` is
False and the runtime simply does not offer these kernels.
"""

from __future__ import annotations

import math

import numpy as np

try:  # pragma: no cover - exercised by whichever branch the machine has
    import numba
    from numba import njit, prange

    AVAILABLE = True
except ImportError:  # pragma: no cover
    numba = None
    AVAILABLE = False

__all__ = ["AVAILABLE", "ACTIVATIONS", "set_threads", "bsr_addmm", "bsr_elman"]


def set_threads(threads: int) -> None:
    """Use ``threads`` worker threads (capped by what numba was started with)."""
    if AVAILABLE:
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))


if AVAILABLE:
    _jit = njit(parallel=True, fastmath=True, cache=True, nogil=True)

    @njit(inline="always", fastmath=True)
    def _activate(value, activation):
        if activation == 1:
            return math.tanh(value)
        if activation == 2:
            return value if value > 0.0 else 0.0
        return value

    @_jit
    def _bsr_rows(ptr, cols, tiles_t, u, h, out, activation):
        """out = act(u + W h) for a block-sparse W whose tiles are stored TRANSPOSED.

        ``tiles_t[k, j, i]`` is ``W[row_block * t + i, cols[k] * t + j]``: the innermost loop
        then runs over ``i`` (or the batch) on contiguous memory, one vector FMA per column.
        """
        tile = tiles_t.shape[1]
        batch = h.shape[1]
        for block_row in prange(ptr.shape[0] - 1):
            base = block_row * tile
            acc = np.zeros((tile, batch), dtype=np.float32)
            for k in range(ptr[block_row], ptr[block_row + 1]):
                col = cols[k] * tile
                if batch == 1:
                    for j in range(tile):
                        hj = h[col + j, 0]
                        for i in range(tile):
                            acc[i, 0] += tiles_t[k, j, i] * hj
                else:
                    for j in range(tile):
                        for i in range(tile):
                            weight = tiles_t[k, j, i]
                            for b in range(batch):
                                acc[i, b] += weight * h[col + j, b]
            for i in range(tile):
                for b in range(batch):
                    out[base + i, b] = _activate(u[base + i, b] + acc[i, b], activation)

    @njit(cache=True, nogil=True)
    def _bsr_sequence(ptr, cols, vals, projected, h0, outputs, activation):
        _bsr_rows(ptr, cols, vals, projected[0], h0, outputs[0], activation)
        for t in range(1, projected.shape[0]):
            _bsr_rows(ptr, cols, vals, projected[t], outputs[t - 1], outputs[t], activation)


ACTIVATIONS = {"identity": 0, "tanh": 1, "relu": 2}


def _need() -> None:
    if not AVAILABLE:
        raise RuntimeError("numba is not installed: pip install numba (or use the 'csr' / 'bsr' kernels)")


def bsr_addmm(ptr: np.ndarray, cols: np.ndarray, tiles_t: np.ndarray, u: np.ndarray, h: np.ndarray,
              out: np.ndarray) -> np.ndarray:
    """``out = u + W h``: block-row pointers ``ptr``, block columns ``cols`` (int32) and
    transposed tiles ``tiles_t`` (blocks, t, t); ``u``, ``h``, ``out`` are (hidden, batch)."""
    _need()
    _bsr_rows(ptr, cols, tiles_t, u, h, out, 0)
    return out


def bsr_elman(ptr: np.ndarray, cols: np.ndarray, tiles_t: np.ndarray, projected: np.ndarray, h0: np.ndarray,
              outputs: np.ndarray, activation: str) -> np.ndarray:
    """All steps ``outputs[t] = act(projected[t] + W outputs[t-1])`` (h0 before step 0).

    ``projected`` and ``outputs`` are (T, hidden, batch); ``activation`` is tanh or relu.
    """
    _need()
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    _bsr_sequence(ptr, cols, tiles_t, projected, h0, outputs, ACTIVATIONS[activation])
    return outputs
