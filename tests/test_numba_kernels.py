"""Fused tile kernels (export/numba_kernels.py): LSTM / GRU / Elman layers equal PyTorch's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("numba")

from moduli_transform.export import numba_kernels  # noqa: E402
from moduli_transform.export.sparse_runtime import (  # noqa: E402
    RuntimeConfigError,
    SparseRNN,
    TileKernel,
    choose_kernel,
    thread_pools,
)
from moduli_transform.export.tiles import tile_prune, tile_prune_rnn  # noqa: E402

ATOL = 2e-5


def _tile_pruned(cell: type, layers: int, bias: bool, hidden: int = 48, sparsity: float = 0.6,
                 seed: int = 0) -> nn.RNNBase:
    torch.manual_seed(seed)
    module = cell(5, hidden, num_layers=layers, bias=bias)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            parameter.mul_(2.0)  # larger pre-activations: both sides of every nonlinearity
            if name.startswith("weight_hh"):
                parameter.mul_(tile_prune(parameter, sparsity, 16))
    return module


def _max_error(actual, expected) -> float:
    if isinstance(expected, tuple):
        return max(_max_error(a, e) for a, e in zip(actual, expected))
    return float((actual - expected).abs().max())


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("initial", [True, False])
def test_fused_gated_layers_equal_the_module(cell, layers, batch, bias, initial):
    module = _tile_pruned(cell, layers, bias)
    x = torch.randn(9, batch, 5)
    state = None
    if initial:
        h0 = torch.randn(layers, batch, 48)
        state = (h0, torch.randn(layers, batch, 48)) if cell is nn.LSTM else h0
    with torch.no_grad():
        expected = module(x, state)
    runtime = SparseRNN.from_module(module, kernel="tiles")
    actual = runtime(x, state)
    assert isinstance(runtime.kernel(0, batch), TileKernel)
    assert _max_error(actual[0], expected[0]) <= ATOL
    assert _max_error(actual[1], expected[1]) <= ATOL


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("batch", [1, 4])   # batch 1 runs its own step functions
def test_one_thread_and_two_threads_agree(cell, batch):
    module = _tile_pruned(cell, 2, True)
    x = torch.randn(6, batch, 5)
    serial = SparseRNN.from_module(module, kernel="tiles", threads=1)(x)
    parallel = SparseRNN.from_module(module, kernel="tiles", threads=2)(x)
    with torch.no_grad():
        expected = module(x)
    assert _max_error(serial[0], parallel[0]) <= 1e-6
    assert _max_error(serial[1], parallel[1]) <= 1e-6
    assert _max_error(serial[0], expected[0]) <= ATOL


@pytest.mark.parametrize("activation", ["tanh", "relu", "identity"])
def test_fused_elman_at_batch_one_equals_a_float64_reference(activation):
    torch.manual_seed(5)
    hidden, steps = 64, 7
    weight = torch.randn(hidden, hidden) * 0.3 * tile_prune(torch.randn(hidden, hidden), 0.5, 16)
    kernel = TileKernel(weight)
    projected = torch.randn(steps, 1, hidden)
    h0 = torch.randn(1, hidden)
    outputs = np.empty((steps, 1, hidden), np.float32)
    act = {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda v: v}[activation]
    h, expected = h0.double(), []
    for t in range(steps):
        h = act(projected[t].double() + h @ weight.double().t())
        expected.append(h)
    for threads in (1, 2):
        numba_kernels.bsr_elman(kernel.ptr, kernel.cols, kernel.tiles_t, projected.numpy(), h0.numpy(),
                                outputs, activation, threads=threads)
        assert float((torch.from_numpy(outputs).double() - torch.stack(expected)).abs().max()) <= ATOL


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_fused_layers_in_geometric_order_with_permutations(cell):
    torch.manual_seed(3)
    module = cell(4, 64, num_layers=2)
    embedding = torch.rand(64, 2) * 10.0
    pruned, perms = tile_prune_rnn(module, 0.5, embedding)
    x = torch.randn(5, 2, 4)
    h0 = torch.randn(2, 2, 64)
    state = (h0, torch.randn(2, 2, 64)) if cell is nn.LSTM else h0
    runtime = SparseRNN.from_module(pruned, kernel="tiles", perms=perms)
    # the permuted module computes the original order's outputs from permuted states
    permuted_state = tuple(torch.stack([s[..., p] for s, p in zip(part, perms)]) for part in state) \
        if cell is nn.LSTM else torch.stack([s[..., p] for s, p in zip(state, perms)])
    with torch.no_grad():
        expected_out, _ = pruned(x, permuted_state)
    actual_out, _ = runtime(x, state)
    assert _max_error(actual_out[..., perms[-1]], expected_out) <= ATOL


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_permuted_layers_return_outputs_and_states_in_the_modules_order(cell, batch, threads):
    # the tile kernel gathers the last layer's states into the module's order step by step;
    # the step-loop csr kernel gathers after the sequence: the same outputs, h_n and c_n
    torch.manual_seed(4)
    module = cell(4, 64, num_layers=2)
    pruned, perms = tile_prune_rnn(module, 0.5, torch.rand(64, 2) * 10.0)
    x = torch.randn(5, batch, 4)
    h0 = torch.randn(2, batch, 64)
    state = (h0, torch.randn(2, batch, 64)) if cell is nn.LSTM else h0
    tiles = SparseRNN.from_module(pruned, kernel="tiles", perms=perms, threads=threads)(x, state)
    csr = SparseRNN.from_module(pruned, kernel="csr", perms=perms, threads=threads)(x, state)
    assert _max_error(tiles[0], csr[0]) <= ATOL
    assert _max_error(tiles[1], csr[1]) <= ATOL
    assert tiles[0].is_contiguous() and tiles[0].shape == (5, batch, 64)


def test_fused_sequences_refuse_an_output_order_of_the_wrong_size():
    kernel = TileKernel(torch.zeros(32, 32))
    projected, h0 = np.zeros((2, 1, 32), np.float32), np.zeros((1, 32), np.float32)
    outputs = np.empty_like(projected)
    with pytest.raises(ValueError, match=r"inverse must hold 32 unit indices in 0..31, got shape \(16,\)"):
        numba_kernels.bsr_elman(kernel.ptr, kernel.cols, kernel.tiles_t, projected, h0, outputs, "tanh",
                                inverse=np.arange(16))
    with pytest.raises(ValueError, match="values 0..32"):
        numba_kernels.bsr_elman(kernel.ptr, kernel.cols, kernel.tiles_t, projected, h0, outputs, "tanh",
                                inverse=np.arange(32) + (np.arange(32) == 31))


def test_batch_sixteen_and_an_empty_matrix():
    module = _tile_pruned(nn.LSTM, 1, True, hidden=32, sparsity=1.0)
    x = torch.randn(4, 16, 5)
    with torch.no_grad():
        expected = module(x)
    runtime = SparseRNN.from_module(module, kernel="tiles")
    assert runtime.kernel(0, 16).tiles_t.shape[0] == 0
    assert _max_error(runtime(x)[0], expected[0]) <= ATOL
    module = _tile_pruned(nn.GRU, 1, True, hidden=32, sparsity=0.0)
    with torch.no_grad():
        expected = module(x)
    assert _max_error(SparseRNN.from_module(module, kernel="tiles")(x)[0], expected[0]) <= ATOL


def test_auto_times_the_fused_kernel_for_gated_cells():
    weight = torch.randn(4 * 32, 32) * tile_prune(torch.randn(4 * 32, 32), 0.5, 16)
    kernel = choose_kernel(weight, 1, ["csr", "tiles"], mode="LSTM", repeats=2)
    assert kernel.name in ("csr", "tiles")


def test_thread_pools_hold_pytorchs_count_when_numba_starts_its_workers():
    # numba's first use starts its OpenMP workers in PyTorch's libgomp and sets its count
    # there: a call that then left PyTorch's count alone (it already read 1) ran its
    # projection on numba's 2 threads, and left them set after
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from moduli_transform.export import numba_kernels\n"
        "from moduli_transform.export.sparse_runtime import thread_pools\n"
        "with thread_pools(1):\n"
        "    inside = torch.get_num_threads()\n"
        "print(inside, torch.get_num_threads())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NUMBA_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "1"]


def test_thread_pools_set_and_restore_both_counts():
    torch_before, numba_before = torch.get_num_threads(), numba_kernels.get_threads()
    with thread_pools(1) as used:
        assert used == 1 and torch.get_num_threads() == 1 and numba_kernels.get_threads() == 1
    assert (torch.get_num_threads(), numba_kernels.get_threads()) == (torch_before, numba_before)
    with pytest.raises(ValueError, match="blow up"):
        with thread_pools(1):
            raise ValueError("blow up")
    assert (torch.get_num_threads(), numba_kernels.get_threads()) == (torch_before, numba_before)
    with pytest.raises(RuntimeConfigError, match="threads must be a positive integer or None, got 0"):
        with thread_pools(0):
            pass
    with pytest.raises(RuntimeConfigError, match="threads must be a positive integer or None, got 0"):
        SparseRNN.from_module(nn.GRU(2, 16), threads=0)


def test_tiles_kernel_refuses_other_tile_sizes():
    runtime = SparseRNN.from_module(nn.LSTM(2, 32), kernel="tiles", tile=8)
    with pytest.raises(RuntimeConfigError, match="compiled for 16x16 tiles, got tile=8"):
        runtime(torch.randn(3, 1, 2))
    assert not TileKernel.applies(torch.zeros(32, 32), 8)


def test_kernels_refuse_shapes_they_would_read_out_of_bounds():
    ptr = np.array([0, 1, 1], np.int32)
    cols = np.array([0], np.int32)
    tiles = np.zeros((1, 16, 16), np.float32)
    h = np.zeros((1, 32), np.float32)
    with pytest.raises(ValueError, match=r"tiles must have shape \(1, 16, 16\)"):
        numba_kernels.bsr_addmm(ptr, cols, np.zeros((1, 8, 8), np.float32), h, h, h.copy())
    with pytest.raises(ValueError, match="do not make 48 rows"):
        numba_kernels.bsr_addmm(ptr, cols, tiles, np.zeros((1, 48), np.float32), h, h.copy())
    with pytest.raises(ValueError, match="block column 5 is outside the 2 blocks"):
        numba_kernels.bsr_addmm(ptr, np.array([5], np.int32), tiles, h, h, h.copy())
    empty_ptr = np.zeros(7, np.int32)   # 6 block rows = 96 rows
    with pytest.raises(ValueError, match="4 gates of 32 units need 4 x 32 projected rows, got 96"):
        numba_kernels.bsr_lstm(empty_ptr, cols[:0], tiles[:0], np.zeros((2, 1, 96), np.float32),
                               h, h.copy(), np.zeros((2, 1, 32), np.float32))
    with pytest.raises(ValueError, match=r"bias_n must have shape \(32,\)"):
        numba_kernels.bsr_gru(empty_ptr, cols[:0], tiles[:0], np.zeros((2, 1, 96), np.float32),
                              np.zeros(16, np.float32), h, np.zeros((2, 1, 32), np.float32))


def test_one_step_product_equals_dense():
    torch.manual_seed(2)
    weight = torch.randn(64, 32) * tile_prune(torch.randn(64, 32), 0.5, 16)
    kernel = TileKernel(weight)
    h, u = torch.randn(32, 5), torch.randn(64, 5)
    assert _max_error(kernel(u, h), u + weight @ h) <= 1e-5


@pytest.mark.parametrize("kernel", ["dense", "tiles", "auto"])
@pytest.mark.parametrize("threads", [1, 2, None])
def test_a_call_leaves_both_thread_counts_as_they_were(kernel, threads):
    # numba's OpenMP calls may reach PyTorch's runtime: setting one can move the other, so
    # start from different counts in the two pools
    module = _tile_pruned(nn.LSTM, 1, True, hidden=32)
    saved = torch.get_num_threads()
    numba_kernels.set_threads(numba_kernels.max_threads())
    torch.set_num_threads(1)
    before = (torch.get_num_threads(), numba_kernels.get_threads())
    try:
        SparseRNN.from_module(module, kernel=kernel, threads=threads)(torch.randn(3, 2, 5))
        assert (torch.get_num_threads(), numba_kernels.get_threads()) == before
    finally:
        torch.set_num_threads(saved)


def test_first_call_in_a_fresh_process_keeps_pytorchs_count():
    # as in a bench worker: pinned to one core, PyTorch at one thread, then numba's threading
    # layer starts inside the call and sets the OpenMP count PyTorch reads as well
    import subprocess
    import sys

    script = (
        "import torch; from torch import nn\n"
        "from moduli_transform.export.bench import _pin_threads\n"
        "from moduli_transform.export.sparse_runtime import SparseRNN\n"
        "_pin_threads(1); torch.ones(200_000).sum()\n"
        "SparseRNN.from_module(nn.GRU(3, 32), kernel='dense', threads=1)(torch.randn(2, 1, 3))\n"
        "print(torch.get_num_threads())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split()[-1] == "1"


def test_gather_columns_equals_indexing():
    source = np.random.default_rng(0).standard_normal((6, 40)).astype(np.float32)
    index = np.random.default_rng(1).permutation(40)
    assert np.array_equal(numba_kernels.gather_columns(source, index), source[:, index])
    with pytest.raises(ValueError, match="column index outside 0..39"):
        numba_kernels.gather_columns(source, np.array([0, 40]))


def test_serial_and_parallel_builds_keep_separate_cache_entries(tmp_path):
    # Numba's on-disk cache keys a function by module, name and line, not by its compile
    # options: one Python function built serial and parallel shared one entry, and the
    # parallel kernels loaded the serial code (one thread whatever the count). Each build now
    # compiles a copy under its own name, so both entries exist side by side.
    import os
    import subprocess
    import sys

    for serial, parallel in ((numba_kernels._elman_serial, numba_kernels._elman_parallel),
                             (numba_kernels._lstm_serial, numba_kernels._lstm_parallel),
                             (numba_kernels._gru_serial, numba_kernels._gru_parallel)):
        assert serial.py_func.__qualname__.endswith("_serial")
        assert parallel.py_func.__qualname__.endswith("_parallel")
        assert serial.targetoptions.get("parallel") is not True and parallel.targetoptions["parallel"] is True
    script = (
        "import torch; from torch import nn\n"
        "from moduli_transform.export.sparse_runtime import SparseRNN\n"
        "from moduli_transform.export.tiles import tile_prune\n"
        "torch.manual_seed(0); rnn = nn.RNN(3, 32)\n"
        "with torch.no_grad(): rnn.weight_hh_l0.mul_(tile_prune(rnn.weight_hh_l0, 0.5, 16))\n"
        "x = torch.randn(4, 2, 3)\n"
        "one, two = (SparseRNN.from_module(rnn, kernel='tiles', threads=n)(x)[0] for n in (1, 2))\n"
        "print(float((one - two).abs().max()))\n"
    )
    environment = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env=environment)
    assert float(done.stdout.split()[-1]) < 1e-5
    names = {path.name for path in tmp_path.rglob("*.nbi")}
    assert any("_elman_step_serial" in name for name in names), names
    assert any("_elman_step_parallel" in name for name in names), names


def _spy_on_sequences(monkeypatch) -> list[tuple[str, bool, int]]:
    """Record (cell, serial flag, numba's thread count) of every fused-sequence call."""
    calls = []
    for name in ("_elman_sequence", "_lstm_sequence", "_gru_sequence"):
        original = getattr(numba_kernels, name)

        def spy(*args, _original=original, _name=name):
            calls.append((_name, bool(args[-1]), numba_kernels.get_threads()))
            return _original(*args)
        monkeypatch.setattr(numba_kernels, name, spy)
    return calls


@pytest.mark.skipif(numba_kernels.max_threads() < 2, reason="numba has a single worker here")
def test_kernels_never_run_more_threads_than_the_process_may_use(monkeypatch):
    # pinned to one CPU (taskset, a cpuset) while numba's pool has two workers: the parallel
    # kernel spun at every step's barrier (400 ms instead of 8 for an Elman sequence)
    module = _tile_pruned(nn.RNN, 1, True, hidden=32)
    kernel = TileKernel(module.weight_hh_l0.detach())
    projected, h0 = np.random.randn(4, 1, 32).astype(np.float32), np.zeros((1, 32), np.float32)
    outputs = np.empty_like(projected)
    calls = _spy_on_sequences(monkeypatch)
    saved = numba_kernels.get_threads()
    numba_kernels.set_threads(2)
    try:
        monkeypatch.setattr(numba_kernels, "usable_cores", lambda: 1)
        for threads in (None, 2):
            numba_kernels.bsr_elman(kernel.ptr, kernel.cols, kernel.tiles_t, projected, h0, outputs, "tanh",
                                    threads=threads)
        assert [serial for _, serial, _ in calls] == [True, True]
        monkeypatch.setattr(numba_kernels, "usable_cores", lambda: 2)
        numba_kernels.set_threads(1)
        serial_result = outputs.copy()
        numba_kernels.bsr_elman(kernel.ptr, kernel.cols, kernel.tiles_t, projected, h0, outputs, "tanh",
                                threads=2)
        # an explicit count is honoured for the call, and numba's own count restored after
        assert calls[-1] == ("_elman_sequence", False, 2) and numba_kernels.get_threads() == 1
        np.testing.assert_allclose(outputs, serial_result, atol=1e-6)
    finally:
        numba_kernels.set_threads(saved)


def test_usable_cores_is_the_affinity_mask():
    import os
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no affinity masks on this platform")
    assert numba_kernels.usable_cores() == len(os.sched_getaffinity(0))
