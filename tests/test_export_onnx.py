"""moduli_transform.export.onnx_export: fused layers at any length, unrolled cells refused beyond their length,
gate-order mapping, sparse initializers, atomic writes, and the `export` CLI command."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from conftest import CellLoopModel
from moduli_transform.export import OnnxExportError, SequenceLengthError, load_safetensors, run_onnx, save_safetensors, to_onnx
from moduli_transform.export.onnx_export import ONNX_GATE_PERMUTATION
from test_export_safetensors import make_handle


class Fused(nn.Module):
    """A fused recurrent layer + read-out of the last step."""

    def __init__(self, cell: type = nn.LSTM, **options) -> None:
        super().__init__()
        self.rnn = cell(2, 6, batch_first=True, **options)
        directions = 2 if options.get("bidirectional") else 1
        self.readout = nn.Linear(6 * directions, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.readout(out[:, -1])


class CellLoop(CellLoopModel):
    """conftest's GRUCell loop with rollout as forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rollout(x)


def factory() -> nn.Module:
    torch.manual_seed(0)
    return Fused(nn.GRU)


def pruned(model: nn.Module) -> tuple[nn.Module, dict]:
    torch.manual_seed(1)
    return model, dict(make_handle(model, sparsity=0.6).masks)


FUSED = [
    ("lstm", lambda: Fused(nn.LSTM)),
    ("gru-2layer-bidirectional", lambda: Fused(nn.GRU, num_layers=2, bidirectional=True)),
    ("rnn-no-bias", lambda: Fused(nn.RNN, bias=False)),
]


@pytest.mark.parametrize("name, build", FUSED, ids=[f[0] for f in FUSED])
@pytest.mark.parametrize("sparse", [False, True])
def test_fused_layers_run_at_other_lengths(name, build, sparse, tmp_path):
    torch.manual_seed(0)
    model, masks = pruned(build())
    path = tmp_path / "model.onnx"
    report = to_onnx(model, (torch.randn(3, 5, 2),), path, masks=masks, sparse_initializers=sparse)
    onnx.checker.check_model(onnx.load(str(path)))
    assert report.dynamic_sequence and report.max_sequence_length is None
    assert max(report.max_abs_error.values()) <= 1e-5 and set(report.max_abs_error) == {5, 8}
    for length in (1, 17):
        x = torch.randn(2, length, 2)
        with torch.no_grad():
            expected = model.eval()(x).numpy()
        assert np.max(np.abs(run_onnx(path, x)[0] - expected)) <= 1e-5
    assert bool(report.sparse_initializers) == sparse
    assert report.file_bytes == path.stat().st_size


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_gate_permutation_and_masks_in_onnx_layout(cell, tmp_path):
    torch.manual_seed(0)
    model, masks = pruned(Fused(getattr(nn, cell)))
    path = tmp_path / "model.onnx"
    report = to_onnx(model, (torch.randn(2, 4, 2),), path, masks=masks)
    proto = onnx.load(str(path))
    arrays = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    recurrent = next(m for m in report.mappings if m.role == "R")
    assert recurrent.parameters == ["rnn.weight_hh_l0"] and recurrent.op_type == cell
    assert recurrent.gate_permutation == list(ONNX_GATE_PERMUTATION[cell])
    expected_order = {"LSTM": ["i", "o", "f", "c"], "GRU": ["z", "r", "n"]}[cell]
    assert recurrent.onnx_gate_order == expected_order
    weight = model.rnn.weight_hh_l0.detach()
    blocks = weight.chunk(len(recurrent.gate_permutation))
    onnx_weight = arrays[recurrent.initializer][0]
    for onnx_block, torch_block in zip(np.split(onnx_weight, len(blocks)), recurrent.gate_permutation):
        assert np.array_equal(onnx_block, blocks[torch_block].numpy())
    onnx_mask = report.masks[recurrent.initializer][0].numpy()
    assert np.array_equal(onnx_mask | (onnx_weight != 0), onnx_mask)  # zeros wherever pruned
    assert onnx_mask.sum() == int(masks["rnn.weight_hh_l0"].sum())
    stored = json.loads(next(p.value for p in proto.metadata_props if p.key == "moduli_transform"))
    assert any(m["initializer"] == recurrent.initializer and m["parameters"] == ["rnn.weight_hh_l0"]
               for m in stored["mappings"])


def test_custom_cell_is_fixed_length_and_longer_inputs_are_refused(tmp_path):
    torch.manual_seed(0)
    model, masks = pruned(CellLoop())
    path = tmp_path / "cell.onnx"
    report = to_onnx(model, (torch.randn(3, 6, 2),), path, masks=masks, sparse_initializers=True)
    assert not report.dynamic_sequence and report.max_sequence_length == 6
    assert report.max_abs_error[6] <= 1e-5
    assert "cell.weight_hh" in report.sparse_initializers
    x = torch.randn(4, 6, 2)
    with torch.no_grad():
        assert np.max(np.abs(run_onnx(path, x)[0] - model(x).numpy())) <= 1e-5
    for length in (9, 3):
        with pytest.raises(SequenceLengthError, match="traced .* at exactly 6 steps"):
            run_onnx(path, torch.randn(4, length, 2))
    import onnxruntime as ort  # ONNX Runtime itself also refuses: the time axis is fixed

    with pytest.raises(Exception, match="(?i)dimension"):
        ort.InferenceSession(str(path)).run(None, {"input": torch.randn(4, 9, 2).numpy()})


def test_sparse_initializers_make_a_smaller_file(tmp_path):
    torch.manual_seed(0)
    model = nn.LSTM(4, 64, batch_first=True)
    model, masks = pruned(model)
    with torch.no_grad():  # 90% sparse recurrent weights
        weight = model.weight_hh_l0
        threshold = weight.abs().flatten().kthvalue(int(0.9 * weight.numel())).values
        masks["weight_hh_l0"] = weight.abs() > threshold
        weight.mul_(masks["weight_hh_l0"])
    x = (torch.randn(1, 3, 4),)
    dense = to_onnx(model, x, tmp_path / "dense.onnx", masks=masks)
    sparse = to_onnx(model, x, tmp_path / "sparse.onnx", masks=masks, sparse_initializers=True)
    assert sparse.file_bytes < 0.6 * dense.file_bytes
    assert max(sparse.max_abs_error.values()) <= 1e-5


def test_unpruned_weights_and_failed_writes_leave_nothing(tmp_path, monkeypatch):
    model = Fused(nn.RNN)
    path = tmp_path / "model.onnx"
    with pytest.raises(ValueError, match="prune first"):
        to_onnx(model, (torch.randn(1, 3, 2),), path,
                masks={"rnn.weight_hh_l0": torch.zeros(6, 6, dtype=torch.bool)})
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        to_onnx(model, (torch.randn(1, 3, 2),), path)
    assert os.listdir(tmp_path) == []


def test_unexportable_model_raises_a_clear_error(tmp_path):
    class Unsupported(nn.Module):
        def forward(self, x):
            return torch.linalg.eigvals(x[:, :2, :2].repeat(1, 1, 1)).real

    with pytest.raises(OnnxExportError, match="torch.onnx.export failed"):
        to_onnx(Unsupported(), (torch.randn(1, 3, 2),), tmp_path / "bad.onnx")


def test_cli_export_writes_both_files(tmp_path, capsys):
    import argparse

    from moduli_transform.export.cli import register_export

    parser = argparse.ArgumentParser()
    register_export(parser.add_subparsers(dest="command"))
    model, masks = pruned(factory())
    weights = tmp_path / "weights.safetensors"
    save_safetensors(model, weights, masks=masks)
    args = parser.parse_args(["export", f"{__name__}:factory", "--state", str(weights), "--input-shape", "1,4,2",
                              "--onnx", str(tmp_path / "m.onnx"), "--safetensors", str(tmp_path / "m.safetensors"),
                              "--sparse-initializers"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "sequence length any" in out and "1 CSR" in out
    fresh = factory()
    fresh.load_state_dict(load_safetensors(tmp_path / "m.safetensors"), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    bad = parser.parse_args(["export", f"{__name__}:factory", "--onnx", str(tmp_path / "x.onnx")])
    assert bad.func(bad) == 2 and "--input-shape" in capsys.readouterr().err


class _DataDependentBranch(torch.nn.Module):
    """issue 12's example: the tracer keeps whichever branch the example input takes."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        else:
            return x - 100


def test_data_dependent_branch_is_refused_naming_the_line(tmp_path):
    from moduli_transform.export import OnnxExportError, to_onnx

    with pytest.raises(OnnxExportError, match=r"test_export_onnx\.py:\d+: the forward branches on tensor values"):
        to_onnx(_DataDependentBranch(), (torch.ones(1, 3, 2),), tmp_path / "branch.onnx")
    assert not (tmp_path / "branch.onnx").exists()


class _ConstantFromExample(torch.nn.Module):
    """Wrong for other inputs without any tracer warning: the mean of the example is frozen."""

    def forward(self, x):
        return x - float(x.mean().item())


def test_model_wrong_on_other_inputs_is_refused(tmp_path):
    from moduli_transform.export import OnnxExportError, to_onnx

    with pytest.raises(OnnxExportError):
        to_onnx(_ConstantFromExample(), (torch.ones(1, 3, 2),), tmp_path / "constant.onnx")
    assert not (tmp_path / "constant.onnx").exists()


def test_onnx_file_keeps_the_umask(tmp_path):
    import os

    from moduli_transform.export import to_onnx

    previous = os.umask(0o022)
    try:
        to_onnx(torch.nn.RNN(2, 4, batch_first=True), (torch.randn(1, 5, 2),), tmp_path / "rnn.onnx")
    finally:
        os.umask(previous)
    assert (tmp_path / "rnn.onnx").stat().st_mode & 0o777 == 0o644


class _StartCoded(nn.Module):
    """The navigation model's shape: a (B, T, 2) sequence and a (B, D) start code as the initial state."""

    def __init__(self, code: int = 7, hidden: int = 5, fused: bool = True) -> None:
        super().__init__()
        self.encoder = nn.Linear(code, hidden, bias=False)
        self.fused = fused
        self.rnn = nn.RNN(2, hidden, batch_first=True) if fused else nn.RNNCell(2, hidden)
        self.decoder = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor, start_code: torch.Tensor) -> torch.Tensor:
        state = self.encoder(start_code)
        if self.fused:
            states, _ = self.rnn(x, state[None])
        else:
            steps = []
            for t in range(x.shape[1]):
                state = self.rnn(x[:, t], state)
                steps.append(state)
            states = torch.stack(steps, 1)
        return self.decoder(states)


def test_input_without_time_axis_keeps_its_shape(tmp_path):
    torch.manual_seed(0)
    model = _StartCoded().eval()
    x, code = torch.randn(2, 4, 2), torch.randn(2, 7)
    path = tmp_path / "coded.onnx"
    report = to_onnx(model, (x, code), path)
    assert report.sequence_inputs == ["input_0"] and report.dynamic_sequence
    assert set(report.max_abs_error) == {4, 7} and max(report.max_abs_error.values()) <= 1e-5
    proto = onnx.load(str(path))
    code_dims = [d.dim_value or d.dim_param for d in proto.graph.input[1].type.tensor_type.shape.dim]
    assert code_dims == ["input_1_batch", 7]  # the code's width stays fixed, only its batch is dynamic
    for length in (1, 11):
        x, code = torch.randn(3, length, 2), torch.randn(3, 7)
        with torch.no_grad():
            expected = model(x, code).numpy()
        assert np.max(np.abs(run_onnx(path, (x, code))[0] - expected)) <= 1e-5


def test_fixed_length_export_checks_only_the_sequence_input(tmp_path):
    torch.manual_seed(0)
    model = _StartCoded(fused=False).eval()
    path = tmp_path / "coded-cell.onnx"
    report = to_onnx(model, (torch.randn(2, 4, 2), torch.randn(2, 7)), path)
    assert not report.dynamic_sequence and report.max_sequence_length == 4
    assert report.sequence_inputs == ["input_0"]
    x, code = torch.randn(2, 4, 2), torch.randn(2, 7)  # the code's 7 columns are not 7 steps
    with torch.no_grad():
        assert np.max(np.abs(run_onnx(path, (x, code))[0] - model(x, code).numpy())) <= 1e-5
    with pytest.raises(SequenceLengthError, match="'input_0' has 6 steps"):
        run_onnx(path, (torch.randn(2, 6, 2), code))


def test_sequence_inputs_are_those_with_the_sequence_length():
    from moduli_transform.export.onnx_export import sequence_inputs

    assert sequence_inputs([torch.zeros(2, 9, 2), torch.zeros(2, 256)], axis=1) == [True, False]
    assert sequence_inputs([torch.zeros(3), torch.zeros(2, 9, 2), torch.zeros(4, 9)], axis=1) == [False, True, True]
    assert sequence_inputs([torch.zeros(9, 2, 2), torch.zeros(1, 2, 5)], axis=0) == [True, False]
