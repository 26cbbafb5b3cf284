"""Sparse runtime: outputs equal PyTorch's modules for every kernel, cell and layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from moduli_transform.export.bench import LIBRARIES, BenchConfig, run_worker
from moduli_transform.export.sparse_runtime import KERNELS, RuntimeConfigError, SparseRNN, to_csr32

CELLS = [
    (nn.RNN, {"nonlinearity": "tanh"}),
    (nn.RNN, {"nonlinearity": "relu"}),
    (nn.GRU, {}),
    (nn.LSTM, {}),
]
ATOL = 1e-5


def _pruned(cell: type, options: dict, layers: int = 2, hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    module = cell(5, hidden, num_layers=layers, **options)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.startswith("weight_hh"):
                parameter.mul_(torch.rand_like(parameter) > 0.8)
    return module


def _max_error(actual, expected) -> float:
    if isinstance(expected, tuple):
        return max(_max_error(a, e) for a, e in zip(actual, expected))
    return float((actual - expected).detach().abs().max())


@pytest.mark.parametrize("cell,options", CELLS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kernel", [*KERNELS, "auto"])
def test_outputs_equal_module(cell, options, batch, kernel):
    module = _pruned(cell, options)
    x = torch.randn(7, batch, 5)
    if kernel == "tiles16":  # half-precision tiles: the module with W_hh rounded to float16
        module = _half_recurrent(module)
    expected = module(x)
    actual = SparseRNN.from_module(module, kernel=kernel)(x)
    assert _max_error(actual[0], expected[0]) <= ATOL
    assert _max_error(actual[1], expected[1]) <= ATOL


def _half_recurrent(module: nn.RNNBase) -> nn.RNNBase:
    rounded = __import__("copy").deepcopy(module)
    with torch.no_grad():
        for name, parameter in rounded.named_parameters():
            if name.startswith("weight_hh"):
                parameter.copy_(parameter.half().float())
    return rounded


@pytest.mark.parametrize("cell,options", CELLS)
def test_half_tiles_stay_close_to_the_float32_module_and_are_never_chosen_unasked(cell, options):
    module = _pruned(cell, options, hidden=64)
    x = torch.randn(20, 2, 5)
    expected = module(x)[0]
    half = SparseRNN.from_module(module, kernel="tiles16")
    error = _max_error(half(x)[0], expected)
    # Rounding each kept weight to float16 (relative 2^-11) moves the outputs by about 1e-4 here.
    assert 0 < error < 2e-3
    assert half.nbytes_per_step(2) < SparseRNN.from_module(module, kernel="tiles").nbytes_per_step(2)
    auto = SparseRNN.from_module(module, kernel="auto")
    auto(x)
    assert "tiles16" not in {k.name for k in auto._kernels.values()}


def test_half_tiles_refuse_weights_beyond_float16():
    module = _pruned(nn.RNN, {"nonlinearity": "tanh"}, layers=1)
    with torch.no_grad():
        module.weight_hh_l0[0, 0] = 1e5
    with pytest.raises(RuntimeConfigError, match=r"magnitude 1e\+05 does not fit in float16 \(max 65504\)"):
        SparseRNN.from_module(module, kernel="tiles16")(torch.randn(3, 1, 5))


@pytest.mark.parametrize("cell,options", CELLS)
def test_initial_state_batch_first_and_state_dict(cell, options):
    module = _pruned(cell, options, layers=3)
    module.batch_first = True
    x = torch.randn(2, 6, 5)
    h0 = torch.randn(3, 2, 32)
    state = (h0, torch.randn(3, 2, 32)) if cell is nn.LSTM else h0
    expected = module(x, state)
    mode = {nn.GRU: "gru", nn.LSTM: "lstm"}.get(cell, options.get("nonlinearity"))
    runtime = SparseRNN.from_state_dict(module.state_dict(), mode=mode, kernel="csr",
                                        batch_first=True)
    actual = runtime(x, state)
    assert _max_error(actual[0], expected[0]) <= ATOL
    assert _max_error(actual[1], expected[1]) <= ATOL


def test_unbatched_input():
    module = _pruned(nn.GRU, {}, layers=1)
    x = torch.randn(4, 5)
    assert _max_error(SparseRNN.from_module(module, kernel="csr")(x)[0], module(x)[0]) <= ATOL


def test_csr_has_int32_indices():
    weight = torch.randn(40, 40) * (torch.rand(40, 40) > 0.9)
    csr = to_csr32(weight)
    assert csr.crow_indices().dtype == torch.int32
    assert csr.col_indices().dtype == torch.int32
    assert torch.equal(csr.to_dense(), weight)
    runtime = SparseRNN.from_module(_pruned(nn.RNN, {}, layers=1), kernel="csr")
    assert runtime.kernel(0, 1).weight.col_indices().dtype == torch.int32


def test_bad_options_raise_helpful_errors():
    with pytest.raises(RuntimeConfigError, match="expected 'auto' or one of"):
        SparseRNN.from_module(nn.RNN(2, 4), kernel="cusparse")
    with pytest.raises(RuntimeConfigError, match="bidirectional"):
        SparseRNN.from_module(nn.GRU(2, 4, bidirectional=True))
    with pytest.raises(RuntimeConfigError, match="prefix="):
        SparseRNN.from_state_dict({"rnn.weight_hh_l0": torch.zeros(4, 4)})


@pytest.mark.parametrize("library", LIBRARIES)
def test_bench_worker_row_is_well_formed(library):
    config = BenchConfig(hidden=32, batch=2, sparsity=0.9, pattern="torus", steps=4)
    [row] = run_worker(library, [config], threads=1, repeats=2)
    assert row["library"] == library and row["hidden"] == 32
    assert row["step_us"] > 0 and row["sequence_ms"] > 0 and row["bytes_per_step"] > 0
    json.dumps(row)


def test_bench_worker_process_prints_json():
    root = Path(__file__).resolve().parent.parent
    configs = json.dumps([{"hidden": 32, "batch": 1, "sparsity": 0.9, "steps": 3}])
    done = subprocess.run(
        [sys.executable, "-m", "moduli_transform.export.bench", "--worker", "ours", "--configs", configs,
         "--threads", "1", "--repeats", "1"],
        capture_output=True, text=True, cwd=root, check=True)
    [row] = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["library"] == "ours" and row["kernel"] in KERNELS


@pytest.mark.parametrize("cell,options", CELLS)
@pytest.mark.parametrize("keep", [0.25, 0.0])
@pytest.mark.parametrize("batch", [1, 4])
def test_compiled_tile_kernel_on_tile_pruned_and_empty_matrices(cell, options, keep, batch):
    pytest.importorskip("numba")
    from moduli_transform.export.tiles import tile_prune

    torch.manual_seed(1)
    module = cell(6, 64, num_layers=2, **options)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.startswith("weight_hh"):
                parameter.mul_(tile_prune(parameter, 1.0 - keep, 16))
    x = torch.randn(9, batch, 6)
    h0 = torch.randn(2, batch, 64)
    state = (h0, torch.randn(2, batch, 64)) if cell is nn.LSTM else h0
    expected = module(x, state)
    runtime = SparseRNN.from_module(module, kernel="tiles")
    actual = runtime(x, state)
    assert runtime.kernel(0, batch).tiles_t.shape[0] == round(keep * 16 * (4 if cell is nn.LSTM else 3 if cell is nn.GRU else 1))
    assert _max_error(actual[0], expected[0]) <= ATOL
    assert _max_error(actual[1], expected[1]) <= ATOL


def test_compiled_elman_rejects_unknown_activation():
    pytest.importorskip("numba")
    import numpy as np

    from moduli_transform.export.numba_kernels import bsr_elman

    empty = np.zeros(3, np.int32)
    with pytest.raises(ValueError, match="'gelu'; expected one of identity, tanh, relu"):
        bsr_elman(empty, empty[:0], np.zeros((0, 16, 16), np.float32), np.zeros((1, 1, 32), np.float32),
                  np.zeros((1, 32), np.float32), np.zeros((1, 1, 32), np.float32), "gelu")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bench_worker_runs_gated_cells_with_a_floor(cell):
    config = BenchConfig(hidden=32, batch=1, sparsity=0.5, pattern="torus", steps=3, cell=cell)
    rows = run_worker("ours_tiled", [config], threads=1, repeats=1) + \
        run_worker("torch_rnn", [config], threads=1, repeats=1)
    for row in rows:
        assert row["cell"] == cell and row["threads"] == 1
        assert row["floor_ms"] > 0 and row["bytes_per_step"] > 0 and row["projection_ms"] > 0
    gates = {"lstm": 4, "gru": 3}[cell]
    assert rows[1]["bytes_per_step"] == 4 * gates * 32 * 32 + 4 * 32
    assert config.label.startswith(f"{cell} torus H=32")


def test_bench_table_compares_within_a_thread_count():
    from moduli_transform.export.bench import _summarize, markdown_table

    base = {"file": "", "cell": "lstm", "pattern": "random", "hidden": 64, "batch": 1,
            "sparsity": 0.9, "steps": 10, "seed": 0, "kernel": "k", "step_us": 1.0,
            "bytes_per_step": 1000}
    rows = [{**base, "library": library, "threads": threads, "sequence_ms": ms, "floor_ms": 0.5,
             "projection_ms": 0.5}
            for library, threads, ms in [("torch_rnn", 1, 8.0), ("ours_tiled", 1, 2.0),
                                         ("torch_rnn", 2, 6.0), ("ours_tiled", 2, 3.0)]]
    table = _summarize(rows, bandwidth=10.0)
    speedups = {(r["library"], r["threads"]): r["speedup_vs_rnn"] for r in table}
    assert speedups[("ours_tiled", 1)] == pytest.approx(4.0)
    assert speedups[("ours_tiled", 2)] == pytest.approx(2.0)
    assert {r["x_floor"] for r in table if r["library"] == "ours_tiled"} == {4.0, 6.0}
    # the input projection counted beside the recurrent bytes: 2 ms over 0.5 + 0.5 ms
    assert {r["x_floor_with_projection"] for r in table if r["library"] == "ours_tiled"} == {2.0, 3.0}
    text = markdown_table(table, 10.0)
    assert "| floor (ms) | x floor | proj. (ms) | x (floor + proj.) |" in text and "| lstm random H=64 B=1 s=0.9 | 2 | ours_tiled |" in text


def test_take_columns_uses_torch_off_the_cpu():
    from moduli_transform.export.sparse_runtime import _take_columns
    source = torch.arange(12.0).view(2, 2, 3)
    index = torch.tensor([2, 0, 1])
    assert torch.equal(_take_columns(source, index), source[..., index])
    # the compiled gather reads numpy arrays: a tensor on another device (CUDA; 'meta' here)
    # goes through PyTorch's indexing instead of failing in .numpy()
    taken = _take_columns(source.to("meta"), index.to("meta"))
    assert taken.device.type == "meta" and taken.shape == (2, 2, 3)


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM, nn.RNN])
def test_auto_times_every_cell_on_the_weights_device(cell):
    # 'meta' stands in for CUDA: the GRU's timing sequence made its bias on the CPU
    module = cell(3, 32).to("meta")
    runtime = SparseRNN.from_module(module, kernel="auto", candidates=("dense",))
    out, _ = runtime(torch.randn(4, 2, 3, device="meta"))
    assert out.device.type == "meta" and out.shape == (4, 2, 32)
    assert runtime.kernel(0, 2).name == "dense"


def test_explicit_kernels_that_cannot_run_a_layer_say_why():
    x = torch.randn(4, 2, 3)
    with pytest.raises(RuntimeConfigError, match=r"kernel 'bsr' cannot run layer 0's \(20, 20\) recurrent "
                       r"matrix with tile=16 .*kernels that can: dense, csr, or 'auto'"):
        SparseRNN.from_module(nn.RNN(3, 20), kernel="bsr")(x)
    with pytest.raises(RuntimeConfigError, match=r"'tiles' kernel needs both sides .* multiples of 16, got \(20, 20\)"):
        SparseRNN.from_module(nn.RNN(3, 20), kernel="tiles")(x)
    for name in ("tiles", "tiles16"):
        with pytest.raises(RuntimeConfigError, match=f"the '{name}' kernel runs on the CPU only .* on meta"):
            SparseRNN.from_module(nn.LSTM(3, 32).to("meta"), kernel=name)(torch.randn(4, 2, 3, device="meta"))
