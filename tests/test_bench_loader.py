"""export.bench's file loader: a Linear on cat([x, h]) becomes the nn.RNN it computes."""

from __future__ import annotations

import torch

from moduli_transform.export.bench import _elman_on_cat
from moduli_transform.tasks.adding import ElmanCat


def test_elman_on_cat_gives_the_same_hidden_states() -> None:
    torch.manual_seed(0)
    cell = ElmanCat(hidden_size=6, input_size=2)
    module = _elman_on_cat({k: v.detach() for k, v in cell.state_dict().items()})
    assert module is not None and (module.input_size, module.hidden_size) == (2, 6)
    inputs = torch.randn(3, 5, 2)
    hidden = torch.zeros(3, 6)
    for step in range(5):
        hidden = torch.relu(cell.i2h(torch.cat([inputs[:, step], hidden], dim=1)))
    states, _ = module(inputs.transpose(0, 1))
    assert torch.allclose(states[-1], hidden, atol=1e-6)


def test_elman_on_cat_is_none_without_such_a_weight() -> None:
    state = {"readout.weight": torch.zeros(1, 8), "readout.bias": torch.zeros(1),
             "square.weight": torch.zeros(4, 4), "square.bias": torch.zeros(4)}
    assert _elman_on_cat(state) is None
