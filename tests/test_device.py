"""--device: the resolver, a run on device="cpu" equal to today's, device-free run identity,
one-line CLI errors; CUDA paths where a GPU is present (skipped cleanly without one)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moduli_transform.cli import main
from moduli_transform.device import DeviceError, exact_float32, local_gpu, process_context, resolve_device, to_device
from moduli_transform.tasks.reproduce import plan, run_status
from moduli_transform.tasks.runner import RunConfig, RunInterrupted, run

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


# -- resolve_device ---------------------------------------------------------------------
def test_cpu_resolves_to_the_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@without_cuda
def test_auto_is_the_cpu_without_cuda():
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "gpu", "cpu:0", "cuda:x", "auto:1", "CUDA", ""])
def test_unknown_names_are_refused_naming_the_value_and_the_choices(name):
    with pytest.raises(DeviceError, match=f"unknown device '{name}'; expected one of auto, cpu, cuda, cuda:N"):
        resolve_device(name)


@without_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_refused(name):
    with pytest.raises(DeviceError, match=f"device '{name}': CUDA is not available .*expected one of auto, cpu"):
        resolve_device(name)


def test_device_error_is_a_value_error():
    assert issubclass(DeviceError, ValueError)


def test_an_indexed_gpu_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DeviceError, match=r"'cuda:1' under torchrun \(2 ranks\) would put every rank on GPU 1"):
        resolve_device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(DeviceError, match="not available" if not torch.cuda.is_available() else "GPU"):
        resolve_device("cuda:99")


def test_local_gpu_is_local_rank_or_the_one_visible_gpu():
    assert local_gpu(4, {"LOCAL_RANK": "3"}) == 3
    # a launcher that shows each rank only its own GPU (SLURM's per-task CUDA_VISIBLE_DEVICES)
    assert local_gpu(1, {"LOCAL_RANK": "3"}) == 0
    with pytest.raises(DeviceError, match="LOCAL_RANK=5, but 2 CUDA devices are visible"):
        local_gpu(2, {"LOCAL_RANK": "5"})


def test_exact_float32_sets_cudnn_to_ieee_on_cuda_only_and_restores():
    rnn, conv = torch.backends.cudnn.rnn, torch.backends.cudnn.conv
    before = (rnn.fp32_precision, conv.fp32_precision)
    with exact_float32("cpu"):
        assert (rnn.fp32_precision, conv.fp32_precision) == before
    with pytest.raises(KeyError):
        with exact_float32(torch.device("cuda", 0)):   # the flags exist without a GPU
            assert (rnn.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
            raise KeyError("the block failed")
    assert (rnn.fp32_precision, conv.fp32_precision) == before


def test_to_device_moves_nested_tensors_and_keeps_other_leaves():
    tensor = torch.arange(3.0)
    moved = to_device({"a": (tensor, [tensor, 1.5]), "b": None, "c": "text"}, "cpu")
    assert moved["a"][0] is tensor and moved["a"][1][0] is tensor  # already there: no copy
    assert isinstance(moved["a"], tuple) and isinstance(moved["a"][1], list)
    assert moved["a"][1][1] == 1.5 and moved["b"] is None and moved["c"] == "text"


def test_worker_processes_are_spawned_on_every_device():
    assert process_context("cpu").get_start_method() == "spawn"  # no fork after OpenMP ran in the parent
    assert process_context(torch.device("cuda")).get_start_method() == "spawn"


# -- a run on device="cpu" is today's run ------------------------------------------------
def _config(tmp_path: Path, name: str, task: str) -> RunConfig:
    data = None
    if task == "language_model":
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("\n".join(f"the cat {i % 5} sat on mat {i % 11}" for i in range(300)) + "\n")
        data = str(corpus)
    return RunConfig(task=task, preset="test", sparsity=0.5, lottery=True, seed=0, out=str(tmp_path / name),
                     threads=1, data=data, embedding="trained")


@pytest.mark.parametrize("task", ["adding", "navigation", "language_model"])
def test_device_cpu_gives_bit_identical_weights_and_the_same_files(tmp_path, task):
    default = run(_config(tmp_path, "default", task), progress=False)
    on_cpu = run(_config(tmp_path, "cpu", task), progress=False, device="cpu")
    first, second = (load_file(str(tmp_path / name / "weights.safetensors")) for name in ("default", "cpu"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert (tmp_path / "default" / "metrics.jsonl").read_text() == (tmp_path / "cpu" / "metrics.jsonl").read_text()
    for key in ("dense_metric", "sparse_metric", "lottery_metric", "sparse_tail_metric", "steps"):
        assert default[key] == on_cpu[key]
    assert default["device"] == on_cpu["device"] == "cpu"
    # The device is not recorded in the run's identity: config.json's "run" is the RunConfig as before.
    recorded = json.loads((tmp_path / "cpu" / "config.json").read_text())
    assert "device" not in recorded["run"] and RunConfig.from_dict(recorded["run"]).to_dict() == recorded["run"]


@pytest.mark.parametrize("task, preset, name, lottery", [
    ("adding", "paper", "moduli-s0.9-seed0", False),
    ("language_model", "cpu", "moduli-s0.9-seed0", False),
    ("navigation", "cpu", "moduli-s0.9-seed0-lottery", True),
])
def test_recorded_reproduction_runs_are_still_finished(tmp_path, task, preset, name, lottery):
    folder = tmp_path / f"{task}-{preset}" / name
    shutil.copytree(ROOT / "docs" / "reproduction-runs" / f"{task}-{preset}" / name, folder)
    [config] = [c for c in plan(task, preset, seeds=1, runs=tmp_path, lottery=lottery) if c.out == str(folder)]
    assert run_status(config) == "finished"


def test_a_partial_run_resumes_whatever_device_is_asked(tmp_path):
    config = _config(tmp_path, "partial", "adding")
    with pytest.raises(RunInterrupted):
        run(config, progress=False, stop_after=10, device="cpu")
    resumed = run(RunConfig.from_dict({**config.to_dict(), "resume": True}), progress=False, device="auto")
    assert resumed["steps"] == 36 and resumed["device"] == str(resolve_device("auto"))


def test_run_refuses_a_bad_device_before_any_work(tmp_path):
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        run(_config(tmp_path, "bad", "adding"), progress=False, device="tpu")
    assert not (tmp_path / "bad").exists()


# -- command line -----------------------------------------------------------------------
def _call(argv, capsys):
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def _commands(tmp_path: Path, device: str) -> list[list[str]]:
    return [
        ["train", "adding", "--preset", "test", "--out", str(tmp_path / "t"), "--device", device],
        ["table", "adding", "--preset", "test", "--seeds", "1", "--out", str(tmp_path / "table"), "--device", device],
        ["demo", "--quick", "--out", str(tmp_path / "demo"), "--device", device],
        ["reproduce", "--preset", "test", "--runs", str(tmp_path / "r"), "--report", str(tmp_path / "r.md"),
         "--device", device],
        ["bench", "--quick", "--out", str(tmp_path / "bench"), "--device", device],
    ]


@pytest.mark.parametrize("index", range(5), ids=["train", "table", "demo", "reproduce", "bench"])
def test_unknown_device_is_one_line_and_exit_2(tmp_path, capsys, index):
    status, err = _call(_commands(tmp_path, "tpu")[index], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, err
    assert "unknown device 'tpu'; expected one of auto, cpu, cuda, cuda:N" in lines[0]
    assert not any(tmp_path.iterdir())  # nothing was started


@without_cuda
@pytest.mark.parametrize("index", range(5), ids=["train", "table", "demo", "reproduce", "bench"])
def test_cuda_without_cuda_is_one_line_and_exit_2(tmp_path, capsys, index):
    status, err = _call(_commands(tmp_path, "cuda")[index], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, err
    assert "device 'cuda': CUDA is not available" in lines[0] and "expected one of auto, cpu" in lines[0]
    assert not any(tmp_path.iterdir())


# -- CUDA (skipped without a GPU) --------------------------------------------------------
@needs_cuda
def test_cuda_resolves_to_an_indexed_gpu_and_local_rank_picks_it(monkeypatch):
    assert resolve_device("cuda").type == "cuda" and resolve_device("cuda").index is not None
    assert resolve_device("auto").type == "cuda"
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("cuda") == torch.device("cuda", 0)
    count = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=f"GPU {count}, but {count} CUDA device"):
        resolve_device(f"cuda:{count}")


@needs_cuda
@pytest.mark.parametrize("task", ["adding", "navigation", "language_model"])
def test_a_run_trains_on_cuda_and_resumes_on_the_cpu_and_back(tmp_path, task):
    whole = run(_config(tmp_path, "whole", task), progress=False, device="cuda")
    assert whole["device"].startswith("cuda") and whole["steps"] > 0
    assert all(isinstance(whole[k], float) for k in ("dense_metric", "sparse_metric", "lottery_metric"))
    config = _config(tmp_path, "moved", task)
    with pytest.raises(RunInterrupted):
        run(config, progress=False, stop_after=8, device="cuda")
    resume = RunConfig.from_dict({**config.to_dict(), "resume": True})
    with pytest.raises(RunInterrupted):
        run(resume, progress=False, stop_after=20, device="cpu")
    moved = run(resume, progress=False, device="cuda")
    assert moved["steps"] == whole["steps"] and moved["device"] == whole["device"]
    tensors = load_file(str(tmp_path / "moved" / "weights.safetensors"))
    for name, mask in ((k[len("mask/"):], v) for k, v in tensors.items() if k.startswith("mask/")):
        assert not tensors[name][~mask].any(), name  # pruned weights stayed zero across the moves


@needs_cuda
def test_a_lottery_ticket_and_trained_embeddings_are_the_same_on_cuda_as_on_the_cpu():
    import moduli_transform as mt
    from torch import nn

    tickets, embeddings = {}, {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = nn.RNN(3, 32).to(device)
        handle = mt.attach(model, sparsity=0.5, total_steps=2, embedding="trained", seed=2)
        for points in handle.regularizers["weight_hh_l0"].embedding_tensors():
            assert points.is_leaf and points.requires_grad and points.device.type == device
        embeddings[device] = handle.regularizers["weight_hh_l0"].row_embedding.detach().cpu()
        cuda_state = torch.cuda.get_rng_state()
        handle.lottery("random")
        assert torch.equal(torch.cuda.get_rng_state(), cuda_state)   # no generator left reseeded
        assert model.weight_hh_l0.device.type == device
        tickets[device] = model.weight_hh_l0.detach().cpu()
    assert torch.equal(tickets["cpu"], tickets["cuda"])
    assert torch.equal(embeddings["cpu"], embeddings["cuda"])


@needs_cuda
def test_sparse_runtime_on_cuda_equals_the_module():
    from moduli_transform.export.sparse_runtime import SparseRNN

    torch.manual_seed(0)
    for cell in (torch.nn.RNN, torch.nn.GRU, torch.nn.LSTM):
        module = cell(8, 32, num_layers=2).cuda()
        with torch.no_grad():
            for layer in range(2):
                weight = getattr(module, f"weight_hh_l{layer}")
                weight.mul_(torch.rand_like(weight) > 0.8)
        inputs = torch.randn(6, 3, 8, device="cuda")
        expected = module(inputs)[0]
        for kernel in ("dense", "csr", "bsr", "gather", "auto"):
            output = SparseRNN.from_module(module, kernel=kernel, tile=16)(inputs)[0]
            assert output.device.type == "cuda"
            torch.testing.assert_close(output, expected, atol=1e-4, rtol=1e-4, msg=f"{cell.__name__} {kernel}")


@needs_cuda
def test_bench_worker_times_on_cuda_and_refuses_cpu_only_libraries():
    from moduli_transform.export.bench import BenchConfig, BenchError, device_libraries, run_worker

    config = BenchConfig(hidden=256, batch=1, sparsity=0.9, pattern="torus", steps=5)
    for library in ("torch_rnn", "dense_loop", "torch_csr", "ours", "ours_tiled"):
        [row] = run_worker(library, [config], threads=1, repeats=2, device="cuda")
        assert row["sequence_ms"] > 0 and row["bytes_per_step"] > 0 and "tiles" not in row["kernel"].split(",")
    with pytest.raises(BenchError, match="ort_dense runs on the CPU only"):
        run_worker("ort_dense", [config], threads=1, repeats=2, device="cuda")
    notes = []
    assert device_libraries(["torch_rnn", "ort_dense", "ours_tiled"], torch.device("cuda"), notes.append) == \
        ["torch_rnn", "ours_tiled"]
    assert len(notes) == 2 and "ort_dense skipped" in notes[0]
