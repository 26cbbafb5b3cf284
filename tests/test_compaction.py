"""Compaction: disconnected hidden units go, outputs stay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moduli_transform.export.compaction import (
    CompactionError,
    RecurrentPruner,
    compact_layers,
    compact_model,
    disconnected_units,
)
from moduli_transform.export.sparse_runtime import SparseRNN, layers_from_module

CELLS = [nn.RNN, nn.GRU, nn.LSTM]
DEAD = [1, 5, 9]


class _Decoded(nn.Module):
    def __init__(self, cell: type, reads_state: bool = False) -> None:
        super().__init__()
        self.rnn = cell(3, 16, batch_first=True)
        self.decoder = nn.Linear(16, 2)
        self.reads_state = reads_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, state = self.rnn(x)
        y = self.decoder(out)
        if self.reads_state:
            h = state[0] if isinstance(state, tuple) else state
            y = y + self.decoder(h[-1])[:, None]
        return y


def _disconnect(model: _Decoded, units: list[int]) -> None:
    with torch.no_grad():
        model.rnn.weight_hh_l0[:, units] = 0
        model.decoder.weight[:, units] = 0


@pytest.mark.parametrize("cell", CELLS)
def test_compaction_keeps_outputs_and_shrinks_hidden(cell):
    torch.manual_seed(0)
    model = _Decoded(cell)
    _disconnect(model, DEAD)
    x = torch.randn(2, 7, 3)
    compacted, report = compact_model(model, x)
    assert report.removed["rnn"] == DEAD and report.traced["rnn"]
    assert compacted.rnn.hidden_size == 13 and compacted.decoder.in_features == 13
    assert compacted.rnn.weight_hh_l0.shape == (13 * (model.rnn.weight_hh_l0.shape[0] // 16), 13)
    assert float((compacted(x) - model(x)).detach().abs().max()) <= 1e-5
    assert model.rnn.hidden_size == 16


def test_unit_still_read_by_decoder_is_kept():
    torch.manual_seed(0)
    model = _Decoded(nn.GRU)
    with torch.no_grad():
        model.rnn.weight_hh_l0[:, 3] = 0   # no recurrent output, but the decoder reads it
    compacted, report = compact_model(model, torch.randn(2, 4, 3))
    assert report.removed["rnn"] == [] and compacted.rnn.hidden_size == 16


def test_untraceable_model_needs_consumers():
    torch.manual_seed(0)
    model = _Decoded(nn.LSTM, reads_state=True)
    _disconnect(model, DEAD)
    x = torch.randn(2, 5, 3)
    with pytest.raises(CompactionError, match="consumers="):
        compact_model(model, x)
    compacted, report = compact_model(model, x, consumers={"rnn": ["decoder"]})
    assert report.removed["rnn"] == DEAD and not report.traced["rnn"]
    assert float((compacted(x) - model(x)).detach().abs().max()) <= 1e-5


def test_pruner_handles_gate_blocks():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 8)
    reference = lstm.weight_ih_l0.detach().clone()
    RecurrentPruner().prune_out_channels(lstm, [0, 7])
    assert lstm.weight_ih_l0.shape == (24, 3) and lstm.weight_hh_l0.shape == (24, 6)
    assert torch.equal(lstm.weight_ih_l0[6:12], reference[9:15])   # forget gate, units 1..6
    with pytest.raises(CompactionError, match="stacked"):
        RecurrentPruner().prune_out_channels(nn.GRU(3, 8, num_layers=2), [0])


def test_disconnected_units_needs_every_gate_zero():
    weight = torch.zeros(12, 4)
    weight[9, 2] = 1.0           # only the last gate block reads unit 2
    assert disconnected_units(weight).tolist() == [0, 1, 3]


def test_compact_layers_for_stacked_runtime():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 16, num_layers=3)
    with torch.no_grad():
        lstm.weight_hh_l0[:, [2, 4]] = 0
        lstm.weight_ih_l1[:, [2, 4, 5]] = 0
        lstm.weight_hh_l1[:, 7] = 0
        lstm.weight_ih_l2[:, 7] = 0
    layers, kept = compact_layers(layers_from_module(lstm))
    assert [len(k) for k in kept] == [14, 15, 16]
    x = torch.randn(6, 2, 3)
    assert float((SparseRNN(layers, kernel="csr")(x)[0] - lstm(x)[0]).detach().abs().max()) <= 1e-5
