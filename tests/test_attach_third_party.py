"""attach() on third-party code: saved models stay plain, one handle per model, loops
outside the model (driver and slice syntax), optimizer-step schedules, misuse refused."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import moduli_transform as mt
from model_zoo import B, H, I, StepCharRNN, char_rnn_loop, sequence
from moduli_transform.discovery import NoTargetsError

NET = """
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, 6, batch_first=True)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])
"""

LOAD = """
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "moduli_transform":
            raise ImportError("moduli_transform is not installed here")

sys.meta_path.insert(0, Blocked())
sys.path.insert(0, {folder!r})
import torch
from torch import nn
from net import Net

with torch.serialization.safe_globals([Net, nn.RNN, nn.Linear]):
    model = torch.load({path!r}, weights_only=True)
print(int((model.rnn.weight_hh_l0 == 0).sum()))
"""


def test_saved_model_after_auto_attach_loads_without_moduli_transform(tmp_path, monkeypatch):
    (tmp_path / "net.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    from net import Net

    model = Net()
    handle = mt.attach(model, sparsity=0.5, total_steps=1, auto=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 4, 3)).sum().backward()
    optimizer.step()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    attached = io.BytesIO()
    torch.save(model, attached)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    handle.remove()
    plain = io.BytesIO()
    torch.save(model, plain)
    assert attached.getvalue() == plain.getvalue()  # nothing of ours in the pickle
    script = textwrap.dedent(LOAD.format(folder=str(tmp_path), path=str(path)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == 18  # half of the 6 x 6 recurrent matrix, pruned


def test_a_second_attach_is_refused_until_the_first_is_removed():
    model = nn.RNN(3, 4)
    first = mt.attach(model, sparsity=0.5, auto=True)
    with pytest.raises(ValueError, match=r"already has a handle attached \(ModuliHandle.*remove\(\)"):
        mt.attach(model, sparsity=0.9)
    first.remove()
    second = mt.attach(model, sparsity=0.9)
    assert second.config.sparsity == 0.9


def test_meta_device_models_are_refused():
    with torch.device("meta"):
        model = nn.RNN(3, 4)
    with pytest.raises(ValueError, match=r"meta device \(weight_ih_l0.*to_empty"):
        mt.attach(model, sparsity=0.5)


def test_sparsity_with_only_elementwise_targets_warns():
    from model_zoo import IndRNN

    with pytest.warns(UserWarning, match="regularize_elementwise=True"):
        mt.attach(IndRNN(), example_inputs=(sequence(),), sparsity=0.5)


@pytest.mark.parametrize("schedule_on, expected", [("optimizer", 3), ("backward", None)])
def test_lbfgs_advances_the_schedule_once_per_optimizer_step(schedule_on, expected):
    torch.manual_seed(0)
    model = nn.RNN(3, 6)
    handle = mt.attach(model, sparsity=0.5, total_steps=10, auto=True, schedule_on=schedule_on)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=4)
    x, calls = torch.randn(4, 2, 3), []

    def closure():
        optimizer.zero_grad()
        loss = model(x)[0].pow(2).mean()
        loss.backward()
        calls.append(1)
        return loss

    for _ in range(3):
        optimizer.step(closure)
    handle._resolve_pending()
    assert handle.step_count == (expected if expected is not None else len(calls))
    assert len(calls) > 3
    weight = model.weight_hh_l0
    assert int((weight == 0).sum()) == round(handle.schedule(handle.step_count) * weight.numel())


def test_an_optimizer_of_another_model_does_not_advance_the_schedule():
    model, other = nn.RNN(3, 6), nn.Linear(2, 2)
    handle = mt.attach(model, sparsity=0.5, total_steps=4, auto=True)
    optimizer, unrelated = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(other.parameters(), lr=0.1)
    model(torch.randn(4, 2, 3))[0].sum().backward()
    optimizer.step()
    other(torch.randn(1, 2)).sum().backward()
    unrelated.step()
    unrelated.step()
    assert handle.step_count == 1


def test_data_clamping_in_forward_is_an_update_of_the_parameter():
    """IndRNN code clamps ``weight_hh.data`` in forward: export refuses, the recording on
    real values finds the elementwise target, and the model's parameter is untouched."""
    from model_zoo import ClampedIndRNN

    model = ClampedIndRNN()
    with torch.no_grad():
        model.weight_hh.fill_(3.0)
    handle = mt.attach(model, example_inputs=(sequence(),), regularize_elementwise=True,
                       sparsity=0.4, total_steps=1)
    assert [(t.name, t.kind) for t in handle.targets] == [("weight_hh", "elementwise")]
    assert type(model.weight_hh) is nn.Parameter and bool((model.weight_hh == 3.0).all())
    handle.step()
    assert handle.sparsity()["weight_hh"] == 0.4


# -- loops outside the model --------------------------------------------------------------
def _key(target):
    return target.name, target.kind, target.cols.start, target.cols.stop, target.gates


def test_driver_and_slice_syntax_reach_exactly_the_hidden_columns():
    by_driver = mt.attach(StepCharRNN(), driver=char_rnn_loop, example_inputs=(sequence(),))
    by_slice = mt.attach(StepCharRNN(), targets=[f"i2h.weight[:, {I}:{I + H}]"])
    expected = [("i2h.weight", "recurrent", I, I + H, 1)]
    assert [_key(t) for t in by_driver.targets] == [_key(t) for t in by_slice.targets] == expected
    assert by_slice.regularizers["i2h.weight"].target.block_shape == (H, H)


def test_a_single_step_forward_explains_both_ways():
    with pytest.raises(NoTargetsError) as error:
        mt.attach(StepCharRNN(), example_inputs=(sequence()[:, 0], torch.zeros(B, H)))
    message = str(error.value)
    assert "closes outside the model" in message
    assert "driver=" in message and "i2h.weight[:, 57:89]" in message and "@4" in message


@pytest.mark.parametrize("spec, rows, cols, gates, kind", [
    ("cell.weight[:, 3:]@4", (None, None), (3, None), 4, "recurrent"),
    ("cell.weight[:, 3:] @ lstm", (None, None), (3, None), 4, "recurrent"),
    ("cell.weight[0:10, 3:8]@gru", (0, 10), (3, 8), 2, None),
    ("cell.weight@2", (None, None), (None, None), 2, "linear"),
])
def test_slice_and_gate_syntax(spec, rows, cols, gates, kind):
    model = nn.Module()
    model.cell = nn.Linear(3 + 5, 20)
    if gates == 2 and kind is None:  # '@gru' is 3 gates: 10 rows do not split
        with pytest.raises(NoTargetsError, match="cannot hold 3 gate blocks"):
            mt.attach(model, targets=[spec])
        return
    (target,) = mt.attach(model, targets=[spec]).targets
    assert ((target.rows.start, target.rows.stop), (target.cols.start, target.cols.stop)) == (rows, cols)
    assert (target.gates, target.kind) == (gates, kind)
    if gates == 4:
        assert target.gate_names == (("i", "f", "g", "o") if "lstm" in spec else ())


@pytest.mark.parametrize("spec, message", [
    ("cell.weight[:, a:b]", "bad slice 'a:b'"),
    ("cell.weight[:, 3]", "bad slice '3'"),
    ("cell.weight[:, :]@zero", "unknown gate count 'zero'.*lstm"),
    ("cel.weight[:, 3:]", "'cel.weight' matches no parameter"),
])
def test_bad_selections_name_the_value(spec, message):
    model = nn.Module()
    model.cell = nn.Linear(8, 20)
    with pytest.raises(NoTargetsError, match=message):
        mt.attach(model, targets=[spec])
