"""Sparse CPU runtime for Elman, GRU and LSTM networks with pruned recurrent matrices.

A pruned ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` still multiplies its full dense ``W_hh`` at
every step.  :class:`SparseRNN` runs the same network with the recurrent product done by
a sparse kernel, and gives the same outputs as the module (to float32 rounding):

* the input projections ``W_ih x_t + b`` of all time steps are one dense GEMM before the
  time loop, so only ``W_hh h`` is left inside it;
* the hidden state is kept as a column block ``(hidden, batch)`` so that every step is one
  ``torch.addmv`` (batch 1) or ``torch.addmm`` with the sparse matrix on the left and the
  dense state on the right, the only layout PyTorch's sparse CPU kernels are fast in
  (``F.linear(x, W_csr)`` is 4-7x slower);
* kernels (``dense``, ``csr``, ``bsr``, ``gather``, ``tiles``: our compiled block kernels,
  which run a whole Elman, LSTM or GRU layer in one call, all gates of a step in one pass
  over the tiles) sit in a registry; ``kernel="auto"`` times the ones that apply on the
  actual matrix and batch size, the way the layer will run them, and keeps the fastest;
* each call owns the thread pools (:func:`thread_pools`): PyTorch's and numba's counts are
  set for the call and restored after it, ``threads=1`` runs everything on the caller's
  thread.

Hidden units may be stored in a different order than the module's (the geometric order of
:mod:`moduli_transform.export.tiles`); ``perms[l][i]`` is the original index of stored unit ``i`` of layer
``l``, and states going in and out are translated so callers never see the order.

The runtime runs on the device of its layers' weights (``layers_from_module`` of a module
moved with ``.to("cuda")``): ``dense``, ``csr`` and ``bsr`` are then cuBLAS / cuSPARSE
products, ``gather`` runs there too, and ``tiles`` (numba, CPU memory) applies on the CPU only.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from . import numba_kernels

__all__ = [
    "GATES",
    "KERNELS",
    "RuntimeConfigError",
    "register_kernel",
    "thread_pools",
    "to_csr32",
    "RecurrentLayer",
    "SparseRNN",
]

GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}
_MODULE_MODES = {nn.GRU: "GRU", nn.LSTM: "LSTM"}


class RuntimeConfigError(ValueError):
    """A module, state dict or option the sparse runtime cannot run."""


# --------------------------------------------------------------------------- kernels
KERNELS: dict[str, type[RecurrentKernel]] = {}


def register_kernel(name: str) -> Callable[[type], type]:
    """Class decorator adding a recurrent product kernel to :data:`KERNELS`."""

    def add(cls: type) -> type:
        cls.name = name
        KERNELS[name] = cls
        return cls

    return add


@contextlib.contextmanager
def _quiet_beta() -> Iterator[None]:
    """Silence PyTorch's 'sparse CSR/BSR support is in beta' notice."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
        yield


def to_csr32(weight: Tensor) -> Tensor:
    """Dense matrix -> CSR tensor with int32 indices (1.5-2.4x faster than int64 on CPU).

    Example:
        >>> w = to_csr32(torch.tensor([[0.0, 2.0], [3.0, 0.0]]))
        >>> w.crow_indices().dtype, w.values().tolist()
        (torch.int32, [2.0, 3.0])
    """
    with _quiet_beta():
        csr = weight.detach().to_sparse_csr()
    return torch.sparse_csr_tensor(
        csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32),
        csr.values(), csr.shape, check_invariants=False,
    )


class RecurrentKernel:
    """``u + W @ h`` for a fixed ``W`` of shape ``(rows, hidden)``; ``h`` is ``(hidden, batch)``."""

    name = "base"

    def __init__(self, weight: Tensor) -> None:
        self.shape = tuple(weight.shape)

    @classmethod
    def applies(cls, weight: Tensor, tile: int) -> bool:
        """Whether the kernel can run this matrix."""
        return True

    def __call__(self, u: Tensor, h: Tensor) -> Tensor:
        raise NotImplementedError

    def nbytes(self, batch: int) -> int:
        """Bytes read per product: matrix values + indices + the state vector(s)."""
        raise NotImplementedError


def _vector_bytes(hidden: int, batch: int) -> int:
    return 4 * hidden * batch


@register_kernel("dense")
class DenseKernel(RecurrentKernel):
    """Dense BLAS product (the best dense loop: addmv / addmm on pre-projected inputs)."""

    def __init__(self, weight: Tensor, tile: int = 16) -> None:
        super().__init__(weight)
        self.weight = weight.detach().contiguous()

    def __call__(self, u: Tensor, h: Tensor) -> Tensor:
        if h.shape[1] == 1:
            return torch.addmv(u.view(-1), self.weight, h.view(-1)).view(-1, 1)
        return torch.addmm(u, self.weight, h)

    def nbytes(self, batch: int) -> int:
        return 4 * self.weight.numel() + _vector_bytes(self.shape[1], batch)


@register_kernel("csr")
class CsrKernel(RecurrentKernel):
    """PyTorch CSR with int32 indices; addmv for batch 1, addmm otherwise."""

    def __init__(self, weight: Tensor, tile: int = 16) -> None:
        super().__init__(weight)
        self.weight = to_csr32(weight)

    def __call__(self, u: Tensor, h: Tensor) -> Tensor:
        if h.shape[1] == 1:
            return torch.addmv(u.view(-1), self.weight, h.view(-1)).view(-1, 1)
        return torch.addmm(u, self.weight, h)

    def nbytes(self, batch: int) -> int:
        nnz = self.weight.values().numel()
        return 8 * nnz + 4 * (self.shape[0] + 1) + _vector_bytes(self.shape[1], batch)


def _tile_divisible(weight: Tensor, tile: int) -> bool:
    return weight.shape[0] % tile == 0 and weight.shape[1] % tile == 0


def _to_bsr(weight: Tensor, tile: int) -> Tensor:
    """``weight`` as PyTorch block-sparse rows of ``tile x tile`` blocks (zero tiles dropped)."""
    with _quiet_beta():
        return weight.detach().to_sparse_bsr((tile, tile))


def _bsr_bytes(blocks: int, tile: int, shape: tuple[int, int], batch: int) -> int:
    """Tile values, one int32 column index per tile, the block-row pointers, the vectors."""
    return 4 * blocks * tile**2 + 4 * blocks + 4 * (shape[0] // tile + 1) + _vector_bytes(shape[1], batch)


@register_kernel("bsr")
class BsrKernel(RecurrentKernel):
    """PyTorch block-sparse rows with ``tile x tile`` blocks (all-zero tiles dropped)."""

    def __init__(self, weight: Tensor, tile: int = 16) -> None:
        super().__init__(weight)
        bsr = _to_bsr(weight, tile)
        self.weight = torch.sparse_bsr_tensor(
            bsr.crow_indices().to(torch.int32), bsr.col_indices().to(torch.int32),
            bsr.values(), bsr.shape, check_invariants=False,
        )
        self.tile = tile

    @classmethod
    def applies(cls, weight: Tensor, tile: int) -> bool:
        return _tile_divisible(weight, tile)

    def __call__(self, u: Tensor, h: Tensor) -> Tensor:
        return torch.addmm(u, self.weight, h)

    def nbytes(self, batch: int) -> int:
        return _bsr_bytes(self.weight.values().shape[0], self.tile, self.shape, batch)


@register_kernel("gather")
class GatherKernel(RecurrentKernel):
    """Tiles by gather + batched matmul + index_add (no sparse tensor type involved).

    On CUDA ``index_add_`` adds atomically, so the last bits may differ between calls;
    ``torch.use_deterministic_algorithms(True)`` selects PyTorch's deterministic version."""

    def __init__(self, weight: Tensor, tile: int = 16) -> None:
        super().__init__(weight)
        bsr = _to_bsr(weight, tile)
        self.values = bsr.values().contiguous()
        self.cols = bsr.col_indices()
        block_rows = weight.shape[0] // tile
        self.rows = torch.repeat_interleave(torch.arange(block_rows, device=weight.device),
                                            bsr.crow_indices().diff())
        self.tile = tile

    @classmethod
    def applies(cls, weight: Tensor, tile: int) -> bool:
        return _tile_divisible(weight, tile)

    def __call__(self, u: Tensor, h: Tensor) -> Tensor:
        batch = h.shape[1]
        blocks = h.reshape(-1, self.tile, batch).index_select(0, self.cols)
        out = u.expand(self.shape[0], batch).clone().view(-1, self.tile, batch)
        out.index_add_(0, self.rows, torch.bmm(self.values, blocks))
        return out.view(self.shape[0], batch)

    def nbytes(self, batch: int) -> int:
        blocks = self.values.shape[0]
        return 4 * blocks * self.tile**2 + 16 * blocks + _vector_bytes(self.shape[1], batch)


@contextlib.contextmanager
def thread_pools(threads: int | None = None) -> Iterator[int]:
    """Run the block with ``threads`` threads in PyTorch's and numba's pools; restore both.

    Numba's OpenMP layer and PyTorch each bring an OpenMP runtime; which one numba's
    calls reach depends on the load order (with PyTorch imported first they share
    PyTorch's, and numba's ``set_num_threads`` then changes PyTorch's count too). Either
    way the runtime owns the counts for its own calls: both get ``threads`` (``None``:
    PyTorch's current count) and both are restored after, PyTorch's last. ``1`` makes
    every operation of the call run on the calling thread (the tile kernels then run
    their serially compiled copies). Yields the count used.

    Example:
        >>> before = torch.get_num_threads()
        >>> with thread_pools(1) as used:
        ...     inside = torch.get_num_threads()
        >>> used, inside, torch.get_num_threads() == before
        (1, 1, True)
    """
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise RuntimeConfigError(f"threads must be a positive integer or None, got {threads!r}")
    torch_before, numba_before = torch.get_num_threads(), numba_kernels.get_threads()
    count = torch_before if threads is None else threads
    # Set (and restore) only when a count differs: numba's setter costs ~4 us, at every call.
    # Numba's setter can change PyTorch's count too (one libgomp), so PyTorch's is then set
    # after it either way.
    change = numba_before != count or torch_before != count
    if change:
        numba_kernels.set_threads(count)
        torch.set_num_threads(count)
    try:
        yield count
    finally:
        if change:
            numba_kernels.set_threads(numba_before)
            torch.set_num_threads(torch_before)


@register_kernel("tiles")
class TileKernel(RecurrentKernel):
    """Our compiled block-sparse kernels (:mod:`moduli_transform.export.numba_kernels`): whole
    16x16 tiles, no per-weight indices, and a whole Elman, LSTM or GRU layer (every step,
    all gates of a step in one pass over the tiles) in one call."""

    def __init__(self, weight: Tensor, tile: int = 16) -> None:
        super().__init__(weight)
        if tile != numba_kernels.TILE:
            raise RuntimeConfigError(
                f"the 'tiles' kernel is compiled for {numba_kernels.TILE}x{numba_kernels.TILE} "
                f"tiles, got tile={tile}; use tile={numba_kernels.TILE} or the 'bsr' / 'gather' kernels"
            )
        if weight.device.type != "cpu":
            raise RuntimeConfigError(
                f"the {self.name!r} kernel runs on the CPU only (numba); this layer's weights are on "
                f"{weight.device}: use 'dense', 'csr', 'bsr', 'gather' or 'auto' there")
        if not _tile_divisible(weight, tile):
            raise RuntimeConfigError(
                f"the {self.name!r} kernel needs both sides of the recurrent matrix to be multiples of "
                f"{tile}, got {tuple(weight.shape)}; use 'csr', 'dense' or 'auto'")
        bsr = _to_bsr(weight.float(), tile)
        self.ptr = bsr.crow_indices().to(torch.int32).numpy()
        self.cols = bsr.col_indices().to(torch.int32).numpy()
        self.tiles_t = bsr.values().transpose(1, 2).contiguous().numpy()
        self.tile = tile

    @classmethod
    def applies(cls, weight: Tensor, tile: int) -> bool:
        return (numba_kernels.AVAILABLE and weight.device.type == "cpu" and tile == numba_kernels.TILE
                and _tile_divisible(weight, tile))

    def __call__(self, u: Tensor, h: Tensor) -> Tensor:
        batch = h.shape[1]
        # the compiled kernels are batch-major: (batch, rows)
        u = u.expand(self.shape[0], batch).t().contiguous()
        out = torch.empty(batch, self.shape[0])
        numba_kernels.bsr_addmm(self.ptr, self.cols, self.tiles_t, u.numpy(), h.t().contiguous().numpy(),
                                out.numpy())
        return out.t()

    def run_layer(self, mode: str, projected: Tensor, h: Tensor, c: Tensor | None = None,
                  recurrent_bias: Tensor | None = None, inverse: Tensor | None = None
                  ) -> tuple[Tensor, Tensor | None]:
        """Every step of one layer, batch-major: ``projected`` (T, batch, gates * H) ->
        outputs (T, batch, H), from ``h`` (batch, H).

        ``mode`` is RNN_TANH, RNN_RELU, LSTM (``c`` the initial cell state, (batch, H)) or
        GRU (``recurrent_bias`` the ``(3H,)`` or ``(3H, 1)`` bias of which ``b_hn`` is used).
        ``inverse`` (H,): the outputs in that unit order, ``outputs[..., j] = h_t[..., inverse[j]]``,
        gathered step by step inside the kernel. Returns ``(outputs, final c)`` (``c``, in
        stored order, is None except for an LSTM). Runs with the thread count numba has now
        (:func:`thread_pools` sets it).
        """
        projected = projected.contiguous()
        h = h.contiguous()
        steps, batch, hidden = projected.shape[0], h.shape[0], h.shape[1]
        outputs = torch.empty(steps, batch, hidden)
        args = (self.ptr, self.cols, self.tiles_t, projected.numpy())
        order = {"inverse": None if inverse is None else inverse.numpy()}
        if mode == "LSTM":
            c = c.clone().contiguous()
            numba_kernels.bsr_lstm(*args, h.numpy(), c.numpy(), outputs.numpy(), **order)
            return outputs, c
        if mode == "GRU":
            bias_n = recurrent_bias.reshape(-1)[2 * hidden:].contiguous().float()
            numba_kernels.bsr_gru(*args, bias_n.numpy(), h.numpy(), outputs.numpy(), **order)
            return outputs, None
        numba_kernels.bsr_elman(*args, h.numpy(), outputs.numpy(), _FUSED_ELMAN[mode], **order)
        return outputs, None

    def nbytes(self, batch: int) -> int:
        return _bsr_bytes(self.tiles_t.shape[0], self.tile, self.shape, batch)


@register_kernel("tiles16")
class HalfTileKernel(TileKernel):
    """The ``tiles`` kernels with every tile stored in IEEE half precision: half the bytes
    per step, widened to float32 in registers (the sums stay float32).

    Not lossless: the outputs are the float32 model's with each kept weight rounded to
    float16 (relative rounding error <= 2^-11, about 5e-4 per weight; weights beyond
    +-65504 are refused). It is never among ``"auto"``'s default candidates, so a runtime
    is in half precision only when asked: ``kernel="tiles16"``, or ``"tiles16"`` in
    ``candidates``. The tests bound its error against the float32 module.
    """

    def __init__(self, weight: Tensor, tile: int = 16) -> None:
        super().__init__(weight, tile)
        largest = float(abs(self.tiles_t).max()) if self.tiles_t.size else 0.0
        if largest > float(np.finfo(np.float16).max):
            raise RuntimeConfigError(f"a recurrent weight of magnitude {largest:.3g} does not fit in float16 "
                                     f"(max 65504); use the float32 'tiles' kernel")
        self.tiles_t = self.tiles_t.astype(np.float16).view(np.uint16)

    def nbytes(self, batch: int) -> int:
        return super().nbytes(batch) - 2 * self.tiles_t.shape[0] * self.tile ** 2


def _median_time(function: Callable[[], object], repeats: int, device: torch.device) -> float:
    cuda = device.type == "cuda"  # queued CUDA kernels are waited for on both sides
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _sequence(kernel: RecurrentKernel, mode: str, projected: Tensor, h: Tensor) -> Tensor:
    """What one layer of ``mode`` costs with ``kernel``: fused when it can, else a step loop.

    ``projected`` is (T, batch, rows) and ``h`` (batch, hidden), as a fused layer reads them.
    """
    c = torch.zeros_like(h) if mode == "LSTM" else None
    bias = torch.zeros(kernel.shape[0], 1, device=projected.device)   # a GRU's step reads it
    if hasattr(kernel, "run_layer"):
        return kernel.run_layer(mode, projected, h, c, bias)[0]
    step, h, c = _STEPS[mode], h.t().contiguous(), None if c is None else c.t().contiguous()
    for t in range(projected.shape[0]):
        h, c = step(kernel, projected[t].t(), bias, h, c)
    return h


def choose_kernel(weight: Tensor, batch: int, candidates: Sequence[str], tile: int = 16,
                  repeats: int = 15, elman: bool = False, mode: str | None = None) -> RecurrentKernel:
    """Build every applicable candidate kernel for ``weight`` and return the fastest.

    With ``mode`` (RNN_TANH, RNN_RELU, GRU, LSTM; ``elman=True`` means RNN_TANH) candidates
    are timed on a short sequence of that cell, the way the runtime will use them (a kernel
    with a fused sequence loop is timed fused); otherwise on one product ``u + W h``.
    """
    mode = mode or ("RNN_TANH" if elman else None)
    device = weight.device
    h = torch.randn(weight.shape[1], batch).to(device)
    u = torch.randn(weight.shape[0], batch).to(device)
    projected, h_rows = torch.randn(8, batch, weight.shape[0]).to(device), h.t().contiguous()
    best, best_time = None, float("inf")
    for name in candidates:
        if not KERNELS[name].applies(weight, tile):
            continue
        kernel = KERNELS[name](weight, tile)
        work = (lambda: _sequence(kernel, mode, projected, h_rows)) if mode else (lambda: kernel(u, h))
        work()
        elapsed = _median_time(work, repeats, device)
        if elapsed < best_time:
            best, best_time = kernel, elapsed
    return best


# --------------------------------------------------------------------------- layers
@dataclass
class RecurrentLayer:
    """Weights of one layer in PyTorch's layout (gate blocks stacked along dim 0)."""

    mode: str
    weight_ih: Tensor
    weight_hh: Tensor
    bias_ih: Tensor | None = None
    bias_hh: Tensor | None = None

    @property
    def hidden_size(self) -> int:
        return self.weight_hh.shape[1]

    @property
    def gates(self) -> int:
        return GATES[self.mode]

    def input_bias(self) -> Tensor:
        """Bias folded into the input projection (all of it except GRU's ``b_hn``)."""
        rows = self.weight_ih.shape[0]
        bias = torch.zeros(rows, device=self.weight_ih.device) if self.bias_ih is None else self.bias_ih.clone()
        if self.bias_hh is not None:
            folded = rows if self.mode != "GRU" else 2 * self.hidden_size
            bias[:folded] += self.bias_hh[:folded]
        return bias

    def recurrent_bias(self) -> Tensor:
        """Bias added to ``W_hh h`` inside the loop: GRU's ``b_hn`` (it is gated by r)."""
        bias = torch.zeros(self.weight_hh.shape[0], device=self.weight_hh.device)
        if self.mode == "GRU" and self.bias_hh is not None:
            bias[2 * self.hidden_size:] = self.bias_hh[2 * self.hidden_size:]
        return bias


def _parse_mode(mode: str) -> str:
    normalized = mode.upper().replace("RNN_", "RNN_") if mode else mode
    aliases = {"RNN": "RNN_TANH", "TANH": "RNN_TANH", "RELU": "RNN_RELU", "ELMAN": "RNN_TANH"}
    normalized = aliases.get(normalized, normalized)
    if normalized not in GATES:
        raise RuntimeConfigError(
            f"unknown recurrent mode {mode!r}; expected one of {', '.join(GATES)} "
            "(or rnn, tanh, relu, gru, lstm)"
        )
    return normalized


def layers_from_module(module: nn.RNNBase) -> list[RecurrentLayer]:
    """Read the layers of an ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (unidirectional, no proj)."""
    if not isinstance(module, (nn.RNN, nn.GRU, nn.LSTM)):
        raise RuntimeConfigError(
            f"cannot run a {type(module).__name__}; expected nn.RNN, nn.GRU or nn.LSTM"
        )
    if module.bidirectional or getattr(module, "proj_size", 0):
        raise RuntimeConfigError(
            "bidirectional and projected (proj_size > 0) modules are not supported; "
            "run each direction as its own module"
        )
    mode = _MODULE_MODES.get(type(module)) or ("RNN_RELU" if module.nonlinearity == "relu"
                                               else "RNN_TANH")
    state = {k: v.detach() for k, v in module.state_dict().items()}
    return layers_from_state_dict(state, mode)


def layers_from_state_dict(state: Mapping[str, Tensor], mode: str | None = None,
                           prefix: str = "") -> list[RecurrentLayer]:
    """Read layers from ``weight_ih_l{k}`` / ``weight_hh_l{k}`` / ``bias_*_l{k}`` keys.

    Args:
        state: a module's state dict (tensors), keys optionally under ``prefix``.
        mode: RNN_TANH, RNN_RELU, GRU or LSTM; ``None`` infers GRU / LSTM from the gate
            count and takes tanh for one gate.
        prefix: key prefix such as ``"rnn."``.

    Raises:
        RuntimeConfigError: no ``weight_hh_l0`` key, or a mode that does not match shapes.
    """
    layers, index = [], 0
    while f"{prefix}weight_hh_l{index}" in state:
        weight_hh = state[f"{prefix}weight_hh_l{index}"].detach().float()
        gates = weight_hh.shape[0] // weight_hh.shape[1]
        layer_mode = _parse_mode(mode) if mode else {3: "GRU", 4: "LSTM"}.get(gates, "RNN_TANH")
        if GATES[layer_mode] != gates:
            raise RuntimeConfigError(
                f"mode {layer_mode} has {GATES[layer_mode]} gate blocks but weight_hh_l{index} "
                f"of shape {tuple(weight_hh.shape)} has {gates}"
            )
        get = lambda name: state.get(f"{prefix}{name}_l{index}")  # noqa: E731
        layers.append(RecurrentLayer(
            layer_mode, get("weight_ih").detach().float(), weight_hh,
            None if get("bias_ih") is None else get("bias_ih").detach().float(),
            None if get("bias_hh") is None else get("bias_hh").detach().float(),
        ))
        index += 1
    if not layers:
        raise RuntimeConfigError(
            f"no key {prefix}weight_hh_l0 in the state dict; pass prefix= (keys start with "
            f"{sorted(state)[:3]})"
        )
    return layers


# --------------------------------------------------------------------------- runtime
def _step_elman(activation: Callable[[Tensor], Tensor]):
    def step(kernel, u, rec_bias, h, c):
        return activation(kernel(u, h)), None
    return step


def _step_gru(kernel, u, rec_bias, h, c):
    gh = kernel(rec_bias, h)
    hidden = h.shape[0]
    rz = torch.sigmoid(u[: 2 * hidden] + gh[: 2 * hidden])
    r, z = rz[:hidden], rz[hidden:]
    n = torch.tanh(torch.addcmul(u[2 * hidden:], r, gh[2 * hidden:]))
    return torch.addcmul(n, z, h - n), None


def _step_lstm(kernel, u, rec_bias, h, c):
    gates = kernel(u, h)
    hidden = h.shape[0]
    ifo = torch.sigmoid(gates[: 2 * hidden]), torch.sigmoid(gates[3 * hidden:])
    i, f = ifo[0][:hidden], ifo[0][hidden:]
    c = torch.addcmul(f * c, i, torch.tanh(gates[2 * hidden: 3 * hidden]))
    return ifo[1] * torch.tanh(c), c


_FUSED_ELMAN = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}

_STEPS = {
    "RNN_TANH": _step_elman(torch.tanh),
    "RNN_RELU": _step_elman(torch.relu),
    "GRU": _step_gru,
    "LSTM": _step_lstm,
}


class SparseRNN:
    """Run a (pruned) Elman / GRU / LSTM stack with sparse recurrent products.

    Args:
        layers: the network's layers (see :meth:`from_module`, :meth:`from_state_dict`).
        kernel: a name in :data:`KERNELS`, or ``"auto"`` (fastest of ``candidates`` on the
            actual matrix, timed at first use per batch size).
        batch_first: inputs and outputs are ``(batch, time, features)``.
        perms: per layer, ``perms[l][i]`` = original index of stored unit ``i``
            (:func:`moduli_transform.export.tiles.permute_rnn` produces such layers); ``None`` = identity.
        tile: tile size for the ``bsr`` / ``gather`` / ``tiles`` kernels (``tiles``: 16 only).
        candidates: kernels tried by ``"auto"``.
        threads: threads of PyTorch's and numba's pools during each call (both set, then
            restored: :func:`thread_pools`); ``None`` = PyTorch's count at the call.

    Example (outputs equal the module's):
        >>> torch.manual_seed(0); rnn = nn.GRU(3, 8, num_layers=2)
        <torch._C.Generator object at ...>
        >>> x = torch.randn(5, 2, 3)
        >>> out, h = SparseRNN.from_module(rnn, kernel="csr")(x)
        >>> bool(torch.allclose(out, rnn(x)[0], atol=1e-5))
        True
    """

    def __init__(self, layers: Sequence[RecurrentLayer], kernel: str = "auto",
                 batch_first: bool = False, perms: Sequence[Tensor | None] | None = None,
                 tile: int = 16, candidates: Sequence[str] = ("dense", "csr", "bsr", "gather", "tiles"),
                 threads: int | None = None):
        if kernel != "auto" and kernel not in KERNELS:
            raise RuntimeConfigError(
                f"unknown kernel {kernel!r}; expected 'auto' or one of {', '.join(KERNELS)}"
            )
        unknown = [name for name in candidates if name not in KERNELS]
        if unknown:
            raise RuntimeConfigError(f"unknown candidate kernels {unknown}; have {list(KERNELS)}")
        self.layers = list(layers)
        self.kernel_name = kernel
        self.batch_first = batch_first
        self.tile = tile
        self.candidates = tuple(candidates)
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise RuntimeConfigError(f"threads must be a positive integer or None, got {threads!r}")
        self.threads = threads   # both pools, per call: thread_pools
        device = self.layers[0].weight_hh.device if self.layers else torch.device("cpu")
        self.perms = [None if perm is None else perm.to(device) for perm in perms] if perms is not None \
            else [None] * len(self.layers)
        if len(self.perms) != len(self.layers):
            raise RuntimeConfigError(
                f"got {len(self.perms)} permutations for {len(self.layers)} layers"
            )
        self._inverse = [None if p is None else torch.argsort(p) for p in self.perms]
        self._kernels: dict[tuple[int, int], RecurrentKernel] = {}
        self._input_bias = [layer.input_bias() for layer in self.layers]
        self._recurrent_bias = [layer.recurrent_bias().view(-1, 1) for layer in self.layers]

    # ---- construction
    @classmethod
    def from_module(cls, module: nn.RNNBase, **options) -> SparseRNN:
        """Runtime for an ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (its batch_first is kept)."""
        options.setdefault("batch_first", module.batch_first)
        return cls(layers_from_module(module), **options)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], mode: str | None = None,
                        prefix: str = "", **options) -> SparseRNN:
        """Runtime from a state dict (see :func:`layers_from_state_dict`)."""
        return cls(layers_from_state_dict(state, mode, prefix), **options)

    # ---- kernels
    def kernel(self, index: int, batch: int) -> RecurrentKernel:
        """The kernel of layer ``index`` for this batch size (built and cached on first use)."""
        auto = self.kernel_name == "auto"
        key = (index, batch if auto else 0)
        if key not in self._kernels:
            weight = self.layers[index].weight_hh
            if auto:
                with thread_pools(self.threads):   # timed the way it will run
                    self._kernels[key] = choose_kernel(weight, batch, self.candidates, self.tile,
                                                       mode=self.layers[index].mode)
            else:
                chosen = KERNELS[self.kernel_name]
                # the tile kernels explain their own refusals (tile size, CPU only, shape)
                if not issubclass(chosen, TileKernel) and not chosen.applies(weight, self.tile):
                    able = [name for name, kernel in KERNELS.items() if kernel.applies(weight, self.tile)]
                    raise RuntimeConfigError(
                        f"kernel {self.kernel_name!r} cannot run layer {index}'s {tuple(weight.shape)} "
                        f"recurrent matrix with tile={self.tile} (its sides must be multiples of the tile); "
                        f"kernels that can: {', '.join(able)}, or 'auto'")
                self._kernels[key] = chosen(weight, self.tile)
        return self._kernels[key]

    def nbytes_per_step(self, batch: int) -> int:
        """Bytes the recurrent products read in one time step, all layers."""
        return sum(self.kernel(i, batch).nbytes(batch) for i in range(len(self.layers)))

    # ---- running
    def _initial(self, state: Tensor | None, index: int, batch: int) -> Tensor:
        hidden = self.layers[index].hidden_size
        if state is None:
            return torch.zeros(hidden, batch, device=self.layers[index].weight_hh.device)
        layer_state = state[index]
        if self.perms[index] is not None:
            layer_state = layer_state[..., self.perms[index]]
        return layer_state.reshape(batch, hidden).t().contiguous()

    def _final(self, columns: Tensor, index: int) -> Tensor:
        state = columns.t()
        if self.perms[index] is not None:
            state = _take_columns(state, self._inverse[index])   # torch's indexing: 55 us at H=4096
        return state

    def _run_layer(self, index: int, inputs: Tensor, h: Tensor, c: Tensor | None, ordered: bool = False):
        """One layer's outputs (T, batch, H) and final ``h``, ``c`` as (H, batch) columns, in
        stored order; with ``ordered`` (the last layer) a fused kernel returns all three in the
        module's order instead, and the fourth value says whether it did."""
        layer = self.layers[index]
        steps, batch = inputs.shape[0], inputs.shape[1]
        kernel, step = self.kernel(index, batch), _STEPS[layer.mode]
        fused = steps > 0 and hasattr(kernel, "run_layer")
        inverse = self._inverse[index] if ordered and fused else None
        # The input projection runs on the call's threads, fused layer or not: numba's
        # OpenMP regions reach PyTorch's libgomp (PyTorch is always imported first), so
        # the same workers run both and none spins against another (H=4096, 98%, two
        # threads: 1.84 -> 1.71 ms a sequence against a one-thread projection).
        projected = torch.addmm(self._input_bias[index], inputs.reshape(steps * batch, -1),
                                layer.weight_ih.t()).view(steps, batch, -1)
        rec_bias = self._recurrent_bias[index]
        if fused:   # batch-major all the way: (T, batch, rows) in, (T, batch, H) out
            outputs, c = kernel.run_layer(layer.mode, projected, h.t(), None if c is None else c.t(),
                                          rec_bias, inverse)
            if c is not None and inverse is not None:
                c = _take_columns(c, inverse)
            return outputs, outputs[-1].t(), None if c is None else c.t(), inverse is not None
        projected = projected.transpose(1, 2).contiguous()
        outputs = torch.empty(steps, layer.hidden_size, batch, device=projected.device)
        for t in range(steps):
            h, c = step(kernel, projected[t], rec_bias, h, c)
            outputs[t] = h
        return outputs.transpose(1, 2), h, c, False

    @torch.no_grad()
    def __call__(self, inputs: Tensor, state: Tensor | tuple[Tensor, Tensor] | None = None):
        """Same call and return convention as the PyTorch module (float32).

        Returns ``(output, h_n)``, or ``(output, (h_n, c_n))`` for an LSTM.
        """
        with thread_pools(self.threads):
            return self._forward(inputs, state)

    def _forward(self, inputs: Tensor, state: Tensor | tuple[Tensor, Tensor] | None):
        unbatched = inputs.dim() == 2
        if unbatched:
            inputs = inputs.unsqueeze(1)
            if state is not None:
                state = tuple(s.unsqueeze(1) for s in state) if isinstance(state, tuple) \
                    else state.unsqueeze(1)
        elif self.batch_first:
            inputs = inputs.transpose(0, 1)
        inputs = inputs.float()
        is_lstm = self.layers[0].mode == "LSTM"
        h0, c0 = (state if isinstance(state, tuple) else (state, None)) if state is not None \
            else (None, None)
        batch = inputs.shape[1]
        finals_h, finals_c = [], []
        layer_input = inputs
        ordered = False
        last = len(self.layers) - 1
        for index in range(len(self.layers)):
            h = self._initial(h0, index, batch)
            c = self._initial(c0, index, batch) if is_lstm else None
            # the next layer reads this one in stored order (its W_ih columns were permuted);
            # the last layer's outputs go back to the module's order, inside a fused kernel
            # step by step, else gathered after
            layer_input, h, c, ordered = self._run_layer(
                index, layer_input, h, c, ordered=index == last and self.perms[index] is not None)
            finals_h.append(h.t() if ordered else self._final(h, index))
            if is_lstm:
                finals_c.append(c.t() if ordered else self._final(c, index))
        output = layer_input
        if self.perms[-1] is not None and not ordered:
            output = _take_columns(output, self._inverse[-1])
        output = output.contiguous()
        h_n = torch.stack(finals_h) if _uniform(finals_h) else finals_h
        result_state = (h_n, torch.stack(finals_c) if _uniform(finals_c) else finals_c) \
            if is_lstm else h_n
        if unbatched:
            output = output.squeeze(1)
            result_state = tuple(s.squeeze(1) for s in result_state) if is_lstm \
                else result_state.squeeze(1)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, result_state


def _take_columns(tensor: Tensor, index: Tensor) -> Tensor:
    """``tensor[..., index]``, compiled when numba is there (PyTorch's indexing took a third
    of a tiled batch-16 sequence); PyTorch's own on other devices (CUDA)."""
    if not numba_kernels.AVAILABLE or tensor.device.type != "cpu":
        return tensor[..., index]
    rows = tensor.contiguous().view(-1, tensor.shape[-1]).numpy()
    taken = numba_kernels.gather_columns(rows, index.numpy())
    return torch.from_numpy(taken).view(*tensor.shape[:-1], index.shape[0])


def _uniform(tensors: Sequence[Tensor]) -> bool:
    return len({tuple(t.shape) for t in tensors}) == 1
