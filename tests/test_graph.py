"""The dataflow pass (moduli_transform.graph) and the inspect command, over the model zoo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model_zoo import (ALL, B, H, I, EXPORT_REFUSES, T, ZOO, DataDependentRNN, StatefulGRU, StepModel,
                       WeightDropLSTM, ZooCase, sequence)
from moduli_transform.graph import GraphCaptureError, find_recurrent_targets
from moduli_transform.inspection import format_targets, register


def key(target) -> tuple:
    return (target.name, target.kind, (target.rows.start, target.rows.stop),
            (target.cols.start, target.cols.stop), target.gates)


def discover(case: ZooCase, steps_inputs: tuple | None = None):
    torch.manual_seed(0)
    model = case.factory()
    return model, find_recurrent_targets(model, steps_inputs or case.inputs(), method=case.method,
                                         driver=case.driver)


@pytest.mark.parametrize("case", ZOO, ids=[case.name for case in ZOO])
def test_zoo_ground_truth(case: ZooCase) -> None:
    model, targets = discover(case)
    assert {key(t) for t in targets} == case.expected
    parameters = dict(model.named_parameters())
    assert len({t.name for t in targets}) == len(targets)
    for target in targets:
        assert target.shape == tuple(parameters[target.name].shape)
        assert target.evidence
        target.block(parameters[target.name])  # the slices select inside the parameter


def test_at_least_two_steps_suffice() -> None:
    case = next(c for c in ZOO if c.name == "tutorial_char_rnn")
    _, targets = discover(case, (sequence(steps=2),))
    assert {key(t) for t in targets} == case.expected


def test_one_step_finds_nothing() -> None:
    case = next(c for c in ZOO if c.name == "elman_two_linear")
    _, targets = discover(case, (sequence(steps=1),))
    assert targets == []


@pytest.mark.parametrize("case_name, gate_names", [
    ("gru_cell_loop", ("r", "z", "n")), ("lstm_cell_loop", ("i", "f", "g", "o")),
    ("lstm_2layer_bidirectional", ("i", "f", "g", "o")), ("gru_module", ("r", "z", "n"))])
def test_pytorch_gate_names(case_name: str, gate_names: tuple) -> None:
    _, targets = discover(next(c for c in ZOO if c.name == case_name))
    assert {t.gate_names for t in targets} == {gate_names}


def test_fused_evidence_names_the_position_and_proj_shape() -> None:
    model, targets = discover(next(c for c in ZOO if c.name == "lstm_proj_size"))
    by_name = {t.name: t for t in targets}
    assert by_name["rnn.weight_hr_l0"].shape == tuple(model.rnn.weight_hr_l0.shape) == (2, H)
    assert "w_hh" in by_name["rnn.weight_hh_l0"].evidence
    assert "w_hr" in by_name["rnn.weight_hr_l0"].evidence


def test_evidence_reports_slice_and_orientation() -> None:
    _, (cat_target,) = discover(next(c for c in ZOO if c.name == "tutorial_char_rnn"))
    assert f"column slice {I}:{I + H} of the cat input" in cat_target.evidence
    assert f"used at {T} steps" in cat_target.evidence
    _, (raw,) = discover(next(c for c in ZOO if c.name == "raw_cat_at_W"))
    assert "h @ W" in raw.evidence and f"row slice {I}:{I + H}" in raw.evidence


def test_state_sliced_into_populations_is_not_a_gate_split() -> None:
    """``h[:, :4]`` and ``h[:, 4:]`` read as two populations must not make W 2 gates; slices
    count as gates only when each block is as wide as the state W reads."""

    class Halves(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w_in, self.w = nn.Linear(I, 8), nn.Linear(8, 8)

        def forward(self, x):
            h, outputs = x.new_zeros(x.shape[0], 8), []
            for t in range(x.shape[1]):
                h = torch.tanh(self.w_in(x[:, t]) + self.w(h))
                outputs.append(h[:, :4].sum(1) - h[:, 4:].sum(1))
            return torch.stack(outputs, 1)

    assert [(t.name, t.gates) for t in find_recurrent_targets(Halves(), (sequence(),))] == [("w.weight", 1)]
    model, (in_out,) = discover(next(c for c in ZOO if c.name == "in_out_gates_lstm"))
    assert "4 gates along the columns of the (in, out)-stored weight" in in_out.evidence
    assert in_out.transposed and in_out.block_shape == (4 * H, H) and in_out.is_square
    block = in_out.block(model.U)
    assert torch.equal(block[H:2 * H], model.U[:, H:2 * H].T)  # gate f: columns H:2H of U


def test_elementwise_is_listed_not_regularized() -> None:
    _, (target,) = discover(next(c for c in ZOO if c.name == "indrnn"))
    assert target.kind == "elementwise" and target.regularize is False


def test_loop_only_through_other_weights_is_linear_kind() -> None:
    """The attention matrix reads the decoder state but gets its own output back only
    through the decoder's weights: in the loop, yet not a hidden -> hidden matrix, so its
    (square) block must not share one embedding between input and output neurons."""
    _, targets = discover(next(c for c in ZOO if c.name == "attention_seq2seq"))
    by_name = {t.name: t for t in targets}
    attention = by_name["attention.weight"]
    assert attention.kind == "linear" and not attention.is_square and attention.regularize
    assert "only through other weights" in attention.evidence
    assert "decoder.weight_hh" in attention.evidence
    assert by_name["decoder.weight_hh"].is_square


def test_parametrized_target_is_what_the_optimizer_updates() -> None:
    model, (target,) = discover(next(c for c in ZOO if c.name == "orthogonal_parametrized"))
    assert target.module == "recurrent"
    assert dict(model.named_parameters())[target.name] is model.recurrent.parametrizations.weight.original


def test_learnable_initial_state_does_not_hide_recurrence() -> None:
    class LearnedStart(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.h0 = nn.Parameter(torch.zeros(H))
            self.w_in, self.w_hh = nn.Linear(I, H), nn.Linear(H, H)

        def forward(self, x):
            h = self.h0.expand(x.shape[0], H)
            for t in range(x.shape[1]):
                h = torch.tanh(self.w_in(x[:, t]) + self.w_hh(h))
            return h

    targets = find_recurrent_targets(LearnedStart(), (sequence(steps=2),))
    assert [t.name for t in targets] == ["w_hh.weight"]


def test_state_read_back_from_a_preallocated_tensor() -> None:
    """Simulation style ``h[t + 1] = f(h[t])``: the read refers to ``h``, not to the
    in-place copy of the previous step (not trainable as written, so not in the zoo)."""

    class Preallocated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W_in = nn.Parameter(torch.randn(H, I))
            self.W_rec = nn.Parameter(torch.randn(H, H))

        def forward(self, x):
            h = torch.zeros(x.shape[1] + 1, x.shape[0], H)
            for t in range(x.shape[1]):
                h[t + 1] = torch.tanh(x[:, t] @ self.W_in.T + h[t] @ self.W_rec.T)
            return h[1:]

    targets = find_recurrent_targets(Preallocated(), (sequence(),))
    assert [(t.name, t.kind, t.shape) for t in targets] == [("W_rec", "recurrent", (H, H))]
    assert f"used at {T} steps" in targets[0].evidence


def test_model_unchanged_by_discovery() -> None:
    torch.manual_seed(0)
    model, x = nn.LSTM(I, H, 2), torch.randn(T, B, I)
    before = model(x)[0]
    find_recurrent_targets(model, (x,))
    assert torch.equal(model(x)[0], before)
    assert all(isinstance(p, nn.Parameter) for p in model._flat_weights)


def test_method_argument_and_single_step_forward() -> None:
    model, x = StepModel(), sequence()
    assert find_recurrent_targets(model, (x[:, 0], torch.zeros(B, H))) == []
    assert [t.name for t in find_recurrent_targets(model, (x,), method="rollout")] == ["h2h.weight"]


def test_example_kwargs_are_passed() -> None:
    case = next(c for c in ZOO if c.name == "three_way_cat")
    x, context = case.inputs()
    targets = find_recurrent_targets(case.factory(), (x,), example_kwargs={"context": context})
    assert {key(t) for t in targets} == case.expected


@pytest.mark.parametrize("case", EXPORT_REFUSES, ids=[case.name for case in EXPORT_REFUSES])
def test_export_refuses_and_the_recording_on_real_values_captures(case: ZooCase) -> None:
    """The ground truth of these cases (checked in test_zoo_ground_truth) comes from the
    second capture: torch.export really refuses them."""
    from moduli_transform.capture import capture

    import warnings

    model = case.factory()
    with pytest.raises(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export's own complaints before it gives up
        torch.export.export(model, case.inputs(), strict=False)
    assert capture(model, case.inputs()).how == "recorded on the real values"


def test_when_every_capture_fails_the_error_names_the_users_line(monkeypatch) -> None:
    import moduli_transform.capture as capture_module

    def refuse(*args, **kwargs):
        raise RuntimeError("no recording")

    monkeypatch.setattr(capture_module, "_capture_real", refuse)
    with pytest.raises(GraphCaptureError) as error:
        find_recurrent_targets(DataDependentRNN(), (sequence(),))
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert "DataDependentRNN" in message and "at model_zoo.py:" in message and "<string>" not in message
    assert "method=" in message and "driver=" in message and "targets='types'" in message
    assert "cell.weight_hh" in message  # what targets='types' finds here


def test_a_model_without_forward_is_told_its_methods() -> None:
    class Sampler(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.RNNCell(I, H)

        def sample(self, x):
            return self.cell(x)

    with pytest.raises(GraphCaptureError, match=r"no forward\(\) to trace; its methods: sample"):
        find_recurrent_targets(Sampler(), (sequence(),))


def test_torchscript_cells_are_recorded_through() -> None:
    class ScriptedCell(torch.jit.ScriptModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight_hh = nn.Parameter(torch.randn(H, H))

        @torch.jit.script_method
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return torch.tanh(torch.mm(h, self.weight_hh.t()))

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = ScriptedCell()

        def forward(self, x):
            h = torch.tanh(x[:, 0, :1].expand(-1, H))
            for _ in range(x.shape[1]):
                h = self.cell(h)
            return h

    assert [t.name for t in find_recurrent_targets(Loop(), (sequence(),))] == ["cell.weight_hh"]


def test_traced_code_leaves_no_tensor_on_the_model() -> None:
    """AWD's weight drop sets rnn.weight_hh_l0 and a stateful model sets self.hidden inside
    forward; after discovery both are as before (no fake tensor of the trace left)."""
    awd, stateful = WeightDropLSTM(), StatefulGRU()
    find_recurrent_targets(awd, (sequence(),))
    find_recurrent_targets(stateful, (sequence(),))
    assert "weight_hh_l0" not in awd.rnn.__dict__ and stateful.hidden is None
    assert all(type(w) is nn.Parameter for w in awd.rnn._flat_weights if w is not None)
    stateful(sequence())
    carried = stateful.hidden
    find_recurrent_targets(stateful, (sequence(),))
    assert stateful.hidden is carried
    awd(sequence()), stateful(sequence())


def test_unknown_method_raises() -> None:
    with pytest.raises(GraphCaptureError, match="has no method 'generate'"):
        find_recurrent_targets(StepModel(), (sequence(),), method="generate")


def test_graph_finder_in_discovery() -> None:
    from moduli_transform.discovery import DiscoveryContext, discover_targets

    case = next(c for c in ZOO if c.name == "masked_weight")
    context = DiscoveryContext(example_inputs=case.inputs())
    targets = discover_targets(case.factory(), "graph", context)
    assert [t.name for t in targets] == ["weight_hh"]


# ------------------------------------------------------------------ inspect command


def test_format_targets_table() -> None:
    _, targets = discover(next(c for c in ZOO if c.name == "manual_lstm_chunk"))
    table = format_targets(targets).splitlines()
    assert table[0].split()[:5] == ["parameter", "kind", "shape", "slice", "gates"]
    row = table[1]
    assert row.startswith("gates.weight") and f"({4 * H}, {I + H})" in row
    assert f"[:, {I}:{I + H}]" in row and "output split into 4 gates" in row
    assert format_targets([]) == "no recurrent weights found"


def _run_inspect(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_inspect_command(tmp_path, capsys) -> None:
    source = tmp_path / "my_models.py"
    source.write_text(
        "import sys\nsys.path.insert(0, %r)\n"
        "from model_zoo import CellLoop, DataDependentRNN, TiedLSTMLanguageModel\n"
        "from torch import nn\n"
        "def lstm_cells():\n    return CellLoop(nn.LSTMCell)\n"
        "def lm():\n    return TiedLSTMLanguageModel()\n"
        "class Sampler(nn.Module):\n    def sample(self, x):\n        return x\n"
        "def broken():\n    return Sampler()\n" % str(__import__("pathlib").Path(__file__).parent))
    assert _run_inspect(["inspect", f"{source}:lstm_cells", "--input-shape", f"{B},{T},{I}"]) == 0
    out = capsys.readouterr().out
    assert "cell.weight_hh" in out and "4 (ifgo)" in out and "weight_ih" not in out
    assert _run_inspect(["inspect", f"{source}:lm", "--input-shape", f"{T},{B}", "--dtype", "long"]) == 0
    assert "rnn.weight_hh_l1" in capsys.readouterr().out
    assert _run_inspect(["inspect", f"{source}:broken", "--input-shape", f"{B},{T},{I}"]) == 2
    error = capsys.readouterr().err
    assert "targets='types'" in error and "its methods: sample" in error
    assert _run_inspect(["inspect", "no_colon_here"]) == 2
