"""Benchmark: dense PyTorch / ONNX Runtime vs. the sparse runtime, per step and per sequence.

Each library runs in its own process (``python -m moduli_transform.export.bench --worker NAME``) with its
threads pinned, so one library's thread pool or allocator never slows another; rounds
interleave the libraries and the table reports medians over rounds.  Memory bandwidth is
measured in the same run (summing a buffer far larger than the last-level cache), and
every row reports the bytes its recurrent product reads per step and the fraction of that
bandwidth it reaches.  At H=1024 (and for the sparse H=4096 matrices, ~7-13 MB) the
weights stay in the 32 MB L3 cache between steps, so fractions above 1 are possible:
the ratio is against DRAM bandwidth.

Synthetic models are Elman (``--cell rnn``), LSTM or GRU layers (``--cell lstm gru``: the
stacked ``(4H, H)`` / ``(3H, H)`` recurrent matrix is pruned as one). ``--threads 1 2``
measures every row with each thread count. The floor column is the time this process
takes to read a row's bytes per step (a buffer of that size summed, so from whichever
cache level it fits in), times the steps; "x floor" is the row's time over it. The
recurrent bytes are not all of a sequence's work: every library also projects its inputs
(``W_ih x_t + b`` for all steps, one dense product per layer), which the byte floor
leaves out. "proj. (ms)" times that product alone (``torch.addmm`` into a ready buffer,
same process and threads), and "x (floor + proj.)" is the row's time over the sum.

Libraries (rows):
    torch_rnn      PyTorch dense ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` module
    dense_loop     best dense kernel: loop of addmv / addmm on pre-projected inputs
    torch_csr      loop of PyTorch int32 CSR addmv / addmm (unstructured weights)
    ort_dense      ONNX Runtime on the dense module exported by ``torch.onnx.export``
    ours           :class:`SparseRNN` ``kernel="auto"`` on the unstructured weights
    ours_tiled     :class:`SparseRNN` ``kernel="auto"`` on tile-pruned weights in
                   geometric (Hilbert) order, permutation folded in
    ours_tiled_fp16  the same weights with ``kernel="tiles16"``: tiles stored in float16
                   (half the bytes; outputs those of W_hh rounded to float16), CPU only

On a CUDA device (``--device cuda``) the same rows run on the GPU: ``torch_rnn`` is the
dense cuDNN/cuBLAS reference, ``dense_loop`` cuBLAS addmv/addmm, ``torch_csr`` and the
``csr``/``bsr``/``gather`` kernels of ``ours``/``ours_tiled`` cuSPARSE or plain CUDA ops;
every timing is bracketed by ``torch.cuda.synchronize`` and the bandwidth is the device
memory's. ``ort_dense`` (ONNX Runtime's CPU provider) is skipped there with a note, and
the numba ``tiles`` kernel, CPU only, is not among ``ours_tiled``'s candidates.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from moduli_transform.device import DEVICE_HELP, exact_float32, resolve_device
from moduli_transform.export import core_load
from moduli_transform.export.safetensors_format import atomic_write_bytes
from moduli_transform.export.sparse_runtime import SparseRNN, layers_from_module
from moduli_transform.export.tiles import magnitude_mask, order_neurons, permute_rnn, tile_prune

__all__ = [
    "LIBRARIES",
    "PATTERNS",
    "BenchConfig",
    "BenchError",
    "CPU_ONLY",
    "device_libraries",
    "build_module",
    "run_worker",
    "run_benchmark",
    "write_outputs",
    "add_arguments",
    "main",
]

LIBRARIES = ("torch_rnn", "dense_loop", "torch_csr", "ort_dense", "ours", "ours_tiled", "ours_tiled_fp16")
# Rows that need the CPU: skipped on a CUDA device, with the reason printed.
CPU_ONLY = {"ort_dense": "ONNX Runtime runs here with its CPU execution provider",
            "ours_tiled_fp16": "the numba tiles kernels are CPU only"}
PATTERNS = ("random", "torus", "tiles")
CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
INPUT_SIZE = 64
TILE = 16


class BenchError(ValueError):
    """Bad benchmark option (unknown library / pattern, unreadable file)."""


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark point: synthetic Elman / LSTM / GRU layer or an exported model file."""

    hidden: int
    batch: int
    sparsity: float
    pattern: str = "random"
    steps: int = 50
    seed: int = 0
    file: str = ""
    cell: str = "rnn"

    @property
    def label(self) -> str:
        source = Path(self.file).name if self.file else self.pattern
        cell = "" if self.file or self.cell == "rnn" else f"{self.cell} "
        return f"{cell}{source} H={self.hidden} B={self.batch} s={self.sparsity:g}"


# --------------------------------------------------------------------------- models
def _torus_embedding(hidden: int, generator: torch.Generator) -> Tensor:
    return torch.rand(hidden, 2, generator=generator) * 10.0


def _torus_weights(embedding: Tensor, generator: torch.Generator) -> Tensor:
    """Random weights scaled by closeness on the torus, as moduli regularization leaves."""
    delta = (embedding[:, None, :] - embedding[None, :, :]).abs()
    delta = torch.minimum(delta, 10.0 - delta)
    closeness = torch.exp(-(delta**2).sum(-1) / 2.0)
    weights = torch.randn(embedding.shape[0], embedding.shape[0], generator=generator)
    return weights * closeness / embedding.shape[0] ** 0.5


def _synthetic(config: BenchConfig) -> tuple[nn.RNNBase, Tensor]:
    generator = torch.Generator().manual_seed(config.seed)
    module = CELLS[config.cell](INPUT_SIZE, config.hidden)
    gates = module.weight_hh_l0.shape[0] // config.hidden
    embedding = _torus_embedding(config.hidden, generator)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        for gate in range(gates):   # one block per gate, all on the same neurons' embedding
            if config.pattern == "random":
                block = torch.randn(config.hidden, config.hidden, generator=generator)
                block /= config.hidden**0.5
            else:
                block = _torus_weights(embedding, generator)
            module.weight_hh_l0[gate * config.hidden: (gate + 1) * config.hidden].copy_(block)
    return module, embedding


def _elman_on_cat(state: dict[str, Tensor]) -> nn.RNN | None:
    """An ``nn.RNN`` (ReLU) equal to the widest Linear on ``cat([x, h])`` in ``state``, or None.

    Such a cell (the adding task's ``ElmanCat``) stores ``weight (H, I + H)`` with the hidden
    columns last, as ``cat([x, h])`` orders them, and a bias ``(H,)``.
    """
    candidates = [(v.shape[0], k[: -len("weight")]) for k, v in state.items()
                  if k.endswith("weight") and v.dim() == 2 and 2 <= v.shape[0] < v.shape[1]
                  and tuple(state.get(k[: -len("weight")] + "bias", torch.empty(0)).shape) == (v.shape[0],)]
    if not candidates:
        return None
    hidden, prefix = max(candidates)
    weight, bias = state[prefix + "weight"], state[prefix + "bias"]
    module = nn.RNN(weight.shape[1] - hidden, hidden, nonlinearity="relu")
    with torch.no_grad():
        module.weight_ih_l0.copy_(weight[:, : weight.shape[1] - hidden])
        module.weight_hh_l0.copy_(weight[:, weight.shape[1] - hidden:])
        module.bias_ih_l0.copy_(bias)
        module.bias_hh_l0.zero_()
    return module


def _load_file(path: str) -> tuple[nn.RNNBase, Tensor | None]:
    """An RNN module from a safetensors file (moduli_transform.export.load_safetensors, else plain tensors)."""
    try:
        from moduli_transform.export import load_safetensors  # type: ignore[attr-defined]
        loaded = load_safetensors(path)
    except ImportError:
        from safetensors.torch import load_file
        loaded = load_file(path)
    if isinstance(loaded, nn.Module):
        found = [m for m in loaded.modules() if isinstance(m, (nn.RNN, nn.GRU, nn.LSTM))]
        if not found:
            raise BenchError(f"{path}: the loaded model has no nn.RNN / nn.GRU / nn.LSTM")
        return found[0], None
    state = loaded[0] if isinstance(loaded, tuple) else loaded
    state = {k: (v.to_dense() if v.layout != torch.strided else v) for k, v in state.items()
             if isinstance(v, Tensor)}
    key = next((k for k in state if k.endswith("weight_hh_l0")), None)
    if key is None:
        elman = _elman_on_cat(state)
        if elman is None:
            raise BenchError(f"{path}: no '*weight_hh_l0' tensor and no Linear on cat([x, h]) "
                             f"(weight (H, I+H) with bias (H,)); keys: {sorted(state)[:8]}")
        return elman, None
    prefix = key[: -len("weight_hh_l0")]
    weight_hh = state[key]
    hidden, gates = weight_hh.shape[1], weight_hh.shape[0] // weight_hh.shape[1]
    layers = sum(1 for k in state if k.startswith(prefix + "weight_hh_l"))
    cls = {3: nn.GRU, 4: nn.LSTM}.get(gates, nn.RNN)
    module = cls(state[prefix + "weight_ih_l0"].shape[1], hidden, num_layers=layers,
                 bias=prefix + "bias_ih_l0" in state)
    module.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                            if k.startswith(prefix) and "_l" in k}, strict=False)
    embedding = next((v for k, v in state.items() if "embedding" in k and v.dim() == 2
                      and v.shape[0] == hidden), None)
    return module, embedding


def build_module(config: BenchConfig, variant: str) -> tuple[nn.RNNBase, list[Tensor] | None]:
    """Module for one benchmark variant: ``dense``, ``unstructured`` or ``tiled``.

    ``dense`` is the unpruned matrix (dense libraries do the same work at any sparsity);
    ``unstructured`` is pruned by magnitude (``tiles`` pattern: by tiles, in tile order);
    ``tiled`` is reordered along the torus and tile-pruned, and returns its permutations.
    """
    if config.file:
        module, embedding = _load_file(config.file)
    else:
        module, embedding = _synthetic(config)
    tiled = variant == "tiled" or config.pattern == "tiles"
    if variant == "dense" or (config.file and not tiled):
        return module, None
    if tiled:
        perm = order_neurons(embedding) if embedding is not None \
            else torch.arange(module.hidden_size)
        module = permute_rnn(module, [perm] * module.num_layers)
    with torch.no_grad():
        for layer in range(module.num_layers):
            weight = getattr(module, f"weight_hh_l{layer}")
            mask = tile_prune(weight, config.sparsity, TILE) if tiled \
                else magnitude_mask(weight, config.sparsity)
            weight.mul_(mask)
    perms = [perm] * module.num_layers if tiled else None
    return module, perms


# --------------------------------------------------------------------------- runners
def _pin_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    if hasattr(os, "sched_setaffinity"):
        available = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, available[:threads])


def _torch_runner(module: nn.RNNBase) -> Callable[[Tensor], object]:
    module.eval()

    def run(x: Tensor):
        with torch.no_grad():
            return module(x)
    return run


def _ort_runner(module: nn.RNNBase, threads: int, batch: int) -> Callable[[Tensor], object]:
    import onnxruntime as ort

    handle, path = tempfile.mkstemp(suffix=".onnx")
    os.close(handle)
    # export at the batch size it will run with: the exported zero initial state has it
    example = torch.randn(3, batch, module.input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # tracer warnings about the RNN's shape checks
        torch.onnx.export(module.eval(), (example,), path, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "time"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    os.unlink(path)

    def run(x: Tensor):
        return session.run(None, {"x": x.numpy()})
    return run


def _runner(library: str, config: BenchConfig, threads: int, device: torch.device):
    """``(run function, bytes read per step, kernel names, input size, input projections)`` for
    one library on one config, on ``device``; the projections as ``(rows, inputs, outputs)``
    per layer."""
    if library in ("torch_rnn", "ort_dense", "dense_loop"):
        module, perms = build_module(config, "dense")
    elif library in ("ours_tiled", "ours_tiled_fp16"):
        module, perms = build_module(config, "tiled")
    else:
        module, perms = build_module(config, "unstructured")
    module = module.to(device)  # built on the CPU (same weights everywhere), timed on the device
    if library == "torch_rnn":
        run = _torch_runner(module)
    elif library == "ort_dense":
        run = _ort_runner(module, threads, config.batch)
    else:
        kernel = {"dense_loop": "dense", "torch_csr": "csr", "ours_tiled_fp16": "tiles16"}.get(library, "auto")
        # block kernels only for tile patterns: on a random pattern every tile is occupied
        tiled = library == "ours_tiled" or config.pattern == "tiles"
        candidates = ("csr", "bsr", "gather", "tiles") if tiled else ("dense", "csr")
        runtime = SparseRNN(layers_from_module(module), kernel=kernel, perms=perms,
                            tile=TILE, candidates=candidates, threads=threads)
        runtime.nbytes_per_step(config.batch)
        run = runtime
    gates = module.weight_hh_l0.shape[0] // module.hidden_size
    dense_bytes = module.num_layers * (4 * gates * module.hidden_size**2
                                       + 4 * module.hidden_size * config.batch)
    nbytes = run.nbytes_per_step(config.batch) if isinstance(run, SparseRNN) else dense_bytes
    kernel_names = ",".join(sorted({k.name for k in run._kernels.values()})) \
        if isinstance(run, SparseRNN) else library
    projections = [(config.steps * config.batch, module.input_size if layer == 0 else module.hidden_size,
                    gates * module.hidden_size) for layer in range(module.num_layers)]
    return run, nbytes, kernel_names, module.input_size, projections


def _median(function: Callable[[], object], repeats: int, device: torch.device = torch.device("cpu")) -> float:
    """Median seconds of ``function``; on CUDA the queued kernels are waited for on both sides."""
    cuda = device.type == "cuda"  # checked once: the CPU loop stays as it was
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_worker(library: str, configs: Sequence[BenchConfig], threads: int, repeats: int,
               device: str = "cpu") -> list[dict]:
    """Time one library on every config (in this process) on ``device``; one result dict per config."""
    _pin_threads(threads)
    where = resolve_device(device)
    if library == "bandwidth":
        return [{"library": "bandwidth", "bandwidth_gbps": measure_bandwidth(repeats, device=where)}]
    if library not in LIBRARIES:
        raise BenchError(f"unknown library {library!r}; expected one of {', '.join(LIBRARIES)}")
    if where.type != "cpu" and library in CPU_ONLY:
        raise BenchError(f"library {library} runs on the CPU only ({CPU_ONLY[library]}); got device {where}")
    with exact_float32(where):   # torch_rnn's cuDNN in IEEE float32, as the other rows' products
        return _time_configs(library, configs, threads, repeats, where)


def _time_configs(library: str, configs: Sequence[BenchConfig], threads: int, repeats: int,
                  where: torch.device) -> list[dict]:
    results = []
    for config in configs:
        run, nbytes, kernel, input_size, projections = _runner(library, config, threads, where)
        generator = torch.Generator().manual_seed(1)
        sequence = torch.randn(config.steps, config.batch, input_size, generator=generator).to(where)
        single = sequence[:1].contiguous()
        for _ in range(2):
            run(sequence)
        step_s = _median(lambda: run(single), max(10, 4 * repeats), where)
        sequence_s = _median(lambda: run(sequence), repeats, where)
        floor_s = config.steps * read_seconds(nbytes, repeats, where)
        results.append({**asdict(config), "library": library, "kernel": kernel, "threads": threads,
                        "step_us": step_s * 1e6, "sequence_ms": sequence_s * 1e3,
                        "floor_ms": floor_s * 1e3, "projection_ms": projection_seconds(projections, repeats, where) * 1e3,
                        "bytes_per_step": nbytes})
    return results


def read_seconds(nbytes: int, repeats: int = 5, device: torch.device = torch.device("cpu")) -> float:
    """Median time to read ``nbytes`` once (a float32 buffer of that size, summed).

    The buffer is read repeatedly, so it comes from the cache level it fits in, as a
    recurrent matrix read at every step does: the floor of a row that reads ``nbytes``.
    """
    buffer = torch.ones(max(1, nbytes // 4), device=device)
    buffer.sum()
    return _median(lambda: buffer.sum(), max(5, 4 * repeats), device)


def projection_seconds(shapes: Sequence[tuple[int, int, int]], repeats: int = 5,
                       device: torch.device = torch.device("cpu")) -> float:
    """Median time of a sequence's input projections alone: for each ``(rows, inputs, outputs)``
    one ``bias + x W^T`` (``torch.addmm`` into a buffer made beforehand)."""
    operands = [(torch.randn(outputs, device=device), torch.randn(rows, inputs, device=device),
                 torch.randn(outputs, inputs, device=device), torch.empty(rows, outputs, device=device))
                for rows, inputs, outputs in shapes]

    def project() -> None:
        for bias, x, weight, out in operands:
            torch.addmm(bias, x, weight.t(), out=out)
    project()
    return _median(project, max(5, 4 * repeats), device)


def measure_bandwidth(repeats: int = 5, megabytes: int = 512, device: torch.device = torch.device("cpu")) -> float:
    """Memory read bandwidth in GB/s (DRAM; a GPU's own memory on CUDA): median time to sum a
    buffer far larger than the last-level cache."""
    buffer = torch.ones(megabytes * 2**20 // 4, device=device)
    buffer.sum()
    seconds = _median(lambda: buffer.sum(), max(3, repeats), device)
    return buffer.numel() * 4 / seconds / 1e9


# --------------------------------------------------------------------------- driver
def _spawn(library: str, configs: Sequence[BenchConfig], threads: int, repeats: int,
           device: str = "cpu") -> list[dict]:
    command = [sys.executable, "-m", "moduli_transform.export.bench", "--worker", library,
               "--configs", json.dumps([asdict(c) for c in configs]),
               "--threads", str(threads), "--repeats", str(repeats), "--device", device]
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    if done.returncode != 0:
        raise BenchError(f"worker {library} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summarize(rows: list[dict], bandwidth: float) -> list[dict]:
    keyed: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["file"], row["cell"], row["pattern"], row["hidden"], row["batch"],
               row["sparsity"], row["threads"], row["library"])
        keyed.setdefault(key, []).append(row)
    table = []
    for key, group in keyed.items():
        row = dict(group[0])
        for field in ("step_us", "sequence_ms", "floor_ms", "projection_ms"):
            row[field] = statistics.median(r[field] for r in group)
        row["rounds"] = len(group)
        for field in ("others_busy", "steal"):   # None where not measured (not Linux)
            values = [r[field] for r in group if r.get(field) is not None]
            row[field] = max(values) if values else None
        table.append(row)
    by_config = {}
    for row in table:
        by_config.setdefault((_label(row), row["threads"]), {})[row["library"]] = row
    for config_rows in by_config.values():
        for row in config_rows.values():
            base = config_rows.get("torch_rnn")
            dense = config_rows.get("dense_loop")
            row["speedup_vs_rnn"] = base["sequence_ms"] / row["sequence_ms"] if base else None
            row["speedup_vs_dense"] = dense["sequence_ms"] / row["sequence_ms"] if dense \
                else None
            per_step_s = row["sequence_ms"] / 1e3 / row["steps"]
            row["gbps"] = row["bytes_per_step"] / per_step_s / 1e9
            row["bandwidth_fraction"] = row["gbps"] / bandwidth
            row["x_floor"] = row["sequence_ms"] / row["floor_ms"] if row["floor_ms"] > 0 else None
            with_projection = row["floor_ms"] + row["projection_ms"]
            row["x_floor_with_projection"] = row["sequence_ms"] / with_projection if with_projection > 0 else None
    order = {name: index for index, name in enumerate(LIBRARIES)}
    table.sort(key=lambda r: (r["file"], r["cell"], r["pattern"], r["hidden"], r["batch"],
                              r["sparsity"], r["threads"], order[r["library"]]))
    return table


def _label(row: dict) -> str:
    return BenchConfig(row["hidden"], row["batch"], row["sparsity"], row["pattern"],
                       row["steps"], row["seed"], row["file"], row.get("cell", "rnn")).label


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device_libraries(libraries: Sequence[str], device: torch.device,
                     log: Callable[[str], None] = print) -> list[str]:
    """The libraries that run on ``device``; each one left out (CPU only, on CUDA) is logged.

    Example:
        >>> device_libraries(["torch_rnn", "ort_dense"], torch.device("cpu"))
        ['torch_rnn', 'ort_dense']
    """
    if device.type == "cpu":
        return list(libraries)
    kept = []
    for library in libraries:
        if library in CPU_ONLY:
            log(f"note: {library} skipped on {device}: {CPU_ONLY[library]}")
        else:
            kept.append(library)
    if "ours_tiled" in kept:
        log(f"note: the numba tiles kernel is CPU only; on {device} ours_tiled chooses among csr, bsr and gather")
    return kept


def run_benchmark(configs: Sequence[BenchConfig], libraries: Sequence[str] = LIBRARIES,
                  rounds: int = 3, repeats: int = 5, threads: int | Sequence[int] | None = None,
                  log: Callable[[str], None] = print, device: str = "cpu") -> tuple[list[dict], float]:
    """Interleaved rounds of one process per library and thread count on ``device``; (table rows, GB/s).

    ``threads``: one count, several (every row is measured with each), or None (all usable
    cores). Memory bandwidth is measured with the largest count. On a CUDA device the
    CPU-only libraries are left out (:func:`device_libraries`).
    """
    counts = [_usable_cores()] if threads is None else \
        [threads] if isinstance(threads, int) else list(threads)
    where = resolve_device(device)
    libraries = device_libraries(libraries, where, log)
    rows, bandwidths = [], []
    for round_index in range(rounds):
        bandwidths.append(_spawn("bandwidth", [], max(counts), repeats, str(where))[0]["bandwidth_gbps"])
        for library in libraries:
            for count in counts:
                log(f"round {round_index + 1}/{rounds}: {library}, {count} thread(s)")
                with core_load.watch() as load:
                    measured = _spawn(library, configs, count, repeats, str(where))
                if load.others is not None and load.others > core_load.BUSY_WARNING:
                    log(f"warning: other processes took {load.others:.0%} of the cores while {library} "
                        f"ran ({count} thread(s)): its times are inflated")
                for row in measured:
                    row["others_busy"], row["steal"] = load.others, load.steal
                rows.extend(measured)
    bandwidth = statistics.median(bandwidths)
    return _summarize(rows, bandwidth), bandwidth


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


COLUMNS = ("config", "threads", "library", "kernel", "step_us", "sequence_ms", "speedup_vs_rnn",
           "speedup_vs_dense", "floor_ms", "x_floor", "projection_ms", "x_floor_with_projection",
           "bytes_per_step", "gbps", "bandwidth_fraction", "others_busy", "steal")


def _device_name(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def markdown_table(table: Sequence[dict], bandwidth: float, device: str = "cpu") -> str:
    """The result rows as a markdown table (one line per config, thread count and library).

    "x torch_rnn" is the speed-up over the PyTorch module of the same cell (nn.RNN,
    nn.LSTM or nn.GRU); floor (ms) is the time to read the row's bytes per step ``T`` times;
    proj. (ms) the sequence's input projections alone (see the module docstring).
    """
    where = torch.device(device)
    memory = "DRAM" if where.type == "cpu" else "device memory"
    header = f"Measured {memory} read bandwidth: {bandwidth:.1f} GB/s; T = {table[0]['steps']} " \
             "steps; times are medians over rounds."
    if where.type != "cpu":
        header = f"Device {_device_name(where)}. {header}"
    lines = [header, *_load_lines(table), "",
             "| config | threads | library | kernel | step (us) | sequence (ms) | x torch_rnn "
             f"| x dense loop | floor (ms) | x floor | proj. (ms) | x (floor + proj.) | MB/step | GB/s "
             f"| of {'DRAM' if where.type == 'cpu' else 'memory'} bw | others' CPU |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in table:
        lines.append(
            f"| {_label(row)} | {row['threads']} | {row['library']} | {row['kernel']} | "
            f"{_fmt(row['step_us'], 0)} | {_fmt(row['sequence_ms'])} | {_fmt(row['speedup_vs_rnn'])} | "
            f"{_fmt(row['speedup_vs_dense'])} | {_fmt(row['floor_ms'])} | {_fmt(row['x_floor'])} | "
            f"{_fmt(row['projection_ms'], 3)} | {_fmt(row['x_floor_with_projection'])} | "
            f"{row['bytes_per_step'] / 1e6:.2f} | {_fmt(row['gbps'], 1)} | "
            f"{_fmt(row['bandwidth_fraction'])} | {_share(row.get('others_busy'))} |")
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _load_lines(table: Sequence[dict]) -> list[str]:
    """The header's note on the other processes' share of the cores (``core_load``)."""
    busy = [row["others_busy"] for row in table if row.get("others_busy") is not None]
    if not busy:
        return ["Other processes' share of the cores was not measured (no /proc/stat)."] \
            if any("others_busy" in row for row in table) else []
    steal = [row["steal"] for row in table if row.get("steal") is not None]
    line = (f"Other processes took up to {max(busy):.0%} of the cores while a row was timed "
            f"(\"others' CPU\", the most of its rounds); the hypervisor stole up to {max(steal):.0%}.")
    if max(busy) > core_load.BUSY_WARNING or max(steal) > core_load.BUSY_WARNING:
        line += (f" **Above {core_load.BUSY_WARNING:.0%}: those rows' times are inflated; rerun them on "
                 "idle cores** (docs/BENCHMARKS.md, \"Busy cores\").")
    return [line]


OUTPUT_FILES = ("bench.md", "bench.csv", "bench.png")


def earlier_outputs(out: Path) -> list[Path]:
    """The result files of an earlier benchmark already in ``out`` (which a run would replace)."""
    return [out / name for name in OUTPUT_FILES if (out / name).exists()]


def write_outputs(table: Sequence[dict], bandwidth: float, out: Path, device: str = "cpu") -> list[Path]:
    """Write ``bench.md``, ``bench.csv`` and ``bench.png`` into ``out`` (each atomically);
    return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    markdown, table_csv, plot = (out / name for name in OUTPUT_FILES)
    atomic_write_bytes(markdown, (markdown_table(table, bandwidth, device) + "\n").encode())
    text = io.StringIO(newline="")
    fields = ["config", *[k for k in table[0] if k != "label"]]
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in table:
        writer.writerow({"config": _label(row), **row})
    atomic_write_bytes(table_csv, text.getvalue().encode())
    image = io.BytesIO()
    _plot(table, image)
    atomic_write_bytes(plot, image.getvalue())
    return [markdown, table_csv, plot]


def _plot(table: Sequence[dict], path: Path | io.BytesIO) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(_label(r) for r in table))
    libraries = [lib for lib in LIBRARIES if any(r["library"] == lib for r in table)]
    width = 0.8 / max(1, len(libraries))
    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4.5))
    for index, library in enumerate(libraries):
        values = [next((r["sequence_ms"] for r in table if _label(r) == label
                        and r["library"] == library), float("nan")) for label in labels]
        axis.bar([i + index * width for i in range(len(labels))], values, width, label=library)
    axis.set_yscale("log")
    axis.set_ylabel(f"ms per sequence (T={table[0]['steps']}), log")
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    axis.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120, format="png")
    plt.close(figure)


# --------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``python -m moduli_transform.export.bench`` and ``moduli-transform bench``."""
    parser.add_argument("--file", default="", help="safetensors file from the export")
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--pattern", nargs="+", default=["random"], choices=PATTERNS)
    parser.add_argument("--cell", nargs="+", default=["rnn"], choices=list(CELLS),
                        help="synthetic layer type(s): Elman rnn, lstm, gru")
    parser.add_argument("--steps", type=int, default=50, help="sequence length T")
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--repeats", type=int, default=5, help="timed sequences per round")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="thread count(s); several (e.g. 1 2) measure every row with each; "
                             "default: all usable cores")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: H=512 and 1024, batch 1, sparsity 0.9, 1 round")
    parser.add_argument("--out", default="bench_results", help="folder for md / csv / png")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier benchmark in --out (refused without it)")
    parser.add_argument("--device", default="auto",
                        help=f"where to time: {DEVICE_HELP}; on cuda, ONNX Runtime (CPU) is skipped and the "
                             "numba tiles kernel is not tried")


def configs_from_args(args: argparse.Namespace) -> list[BenchConfig]:
    """The benchmark grid the options describe (``--quick`` overrides the grid)."""
    if args.quick:
        args.hidden, args.batch, args.sparsity, args.rounds, args.repeats = \
            [512, 1024], [1], [0.9], 1, 3
    if args.file:
        if not Path(args.file).is_file():
            raise BenchError(f"no such file: {args.file}")
        module, _ = _load_file(args.file)
        weight = module.weight_hh_l0.detach()
        file_sparsity = float((weight == 0).float().mean())
        # absolute: the timing workers run in the package's directory, not the caller's
        file = str(Path(args.file).resolve())
        return [BenchConfig(module.hidden_size, b, s, "random", args.steps, file=file)
                for b in args.batch for s in ([file_sparsity] if file_sparsity > 0.5
                                              else args.sparsity)]
    return [BenchConfig(h, b, s, p, args.steps, cell=cell) for cell in args.cell
            for p in args.pattern for h in args.hidden for b in args.batch for s in args.sparsity]


def _validate(args: argparse.Namespace) -> None:
    """Raise :class:`BenchError` for bad sizes before any benchmarking starts."""
    for option, values, low in (("--hidden", args.hidden, 1), ("--batch", args.batch, 1),
                                ("--steps", [args.steps], 1), ("--rounds", [args.rounds], 1),
                                ("--repeats", [args.repeats], 1)):
        for value in values:
            if value < low:
                raise BenchError(f"{option} must be >= {low}, got {value}")
    for sparsity in args.sparsity:
        if not 0.0 <= sparsity < 1.0:
            raise BenchError(f"--sparsity {sparsity} is not in [0, 1)")
    for count in args.threads or []:
        if count < 1:
            raise BenchError(f"--threads must be >= 1, got {count}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise BenchError(f"--out {args.out} is a file, not a folder")
    earlier = earlier_outputs(Path(args.out))
    if earlier and not args.overwrite:
        raise BenchError(f"--out {args.out} holds an earlier benchmark's {', '.join(p.name for p in earlier)}; "
                         f"choose another --out, or pass --overwrite to replace them")


def main(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed options describe, print the table and save files."""
    try:
        _validate(args)
        device = str(resolve_device(args.device))
        configs = configs_from_args(args)
    except ValueError as error:  # BenchError, DeviceError
        print(f"moduli-transform bench: error: {error}", file=sys.stderr)
        return 2
    table, bandwidth = run_benchmark(configs, args.libraries, args.rounds, args.repeats,
                                     args.threads, log=lambda m: print(m, file=sys.stderr), device=device)
    print(markdown_table(table, bandwidth, device))
    for path in write_outputs(table, bandwidth, Path(args.out), device):
        print(f"wrote {path}")
    return 0


def _cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moduli_transform.export.bench", description=__doc__)
    add_arguments(parser)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--configs", default="[]", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        configs = [BenchConfig(**c) for c in json.loads(args.configs)]
        threads = args.threads[0] if args.threads else 1
        print(json.dumps(run_worker(args.worker, configs, threads, args.repeats, args.device)))
        return 0
    return main(args)


if __name__ == "__main__":
    sys.exit(_cli())
