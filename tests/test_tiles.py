"""Geometric ordering, tile pruning, permutation folding and the quality comparison."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from moduli_transform.export.sparse_runtime import SparseRNN
from moduli_transform.export.tiles import (
    ORDERINGS,
    QualityComparison,
    OrderingError,
    TileConfigError,
    order_neurons,
    permute_linear_input,
    permute_rnn,
    permute_state,
    tile_mask,
    tile_prune,
    tile_prune_rnn,
    tile_sparsity,
    tile_vs_unstructured_quality,
)

CELLS = [nn.RNN, nn.GRU, nn.LSTM]


@pytest.mark.parametrize("method", sorted(ORDERINGS))
def test_orderings_are_permutations(method):
    embedding = torch.rand(50, 2) * 10
    perm = order_neurons(embedding, method)
    assert torch.equal(torch.sort(perm).values, torch.arange(50))


def test_hilbert_order_keeps_torus_neighbours_close():
    embedding = torch.rand(1024, 2, generator=torch.Generator().manual_seed(0)) * 10
    ordered = embedding[order_neurons(embedding, "hilbert")]
    random_step = (embedding[1:] - embedding[:-1]).norm(dim=1).mean()
    hilbert_step = (ordered[1:] - ordered[:-1]).norm(dim=1).mean()
    assert hilbert_step < random_step / 5


def test_angle_order_on_circle():
    angles = torch.tensor([3.0, 0.5, 2.0, 1.0])
    points = torch.stack([angles.cos(), angles.sin()], 1)
    assert order_neurons(points, manifold="circle").tolist() == [1, 3, 2, 0]


def test_unknown_ordering_lists_choices():
    with pytest.raises(OrderingError, match="hilbert"):
        order_neurons(torch.rand(4, 2), "zorder")


@settings(max_examples=25, deadline=None)
@given(blocks=st.integers(1, 6), gates=st.sampled_from([1, 3, 4]),
       sparsity=st.floats(0.0, 1.0))
def test_tile_prune_reaches_exact_tile_sparsity(blocks, gates, sparsity):
    hidden = 16 * blocks
    weight = torch.randn(gates * hidden, hidden)
    mask = tile_prune(weight, sparsity)
    tiles = gates * blocks * blocks
    assert tile_sparsity(mask) == pytest.approx(1 - round((1 - sparsity) * tiles) / tiles)
    # every tile is all-kept or all-pruned, so element sparsity equals tile sparsity
    assert int((~mask).sum()) / mask.numel() == pytest.approx(tile_sparsity(mask))


def test_tile_prune_keeps_largest_tiles():
    weight = torch.full((32, 32), 0.01)
    weight[16:, :16] = 5.0
    mask = tile_prune(weight, 0.75)
    assert mask[16:, :16].all() and mask.sum() == 256


def test_tile_mask_maps_back_to_original_order():
    weight = torch.randn(48, 48)
    perm = torch.randperm(48)
    mask = tile_mask(weight, 0.5, perm)
    assert tile_sparsity(mask[perm][:, perm]) == pytest.approx(4 / 9, abs=1e-6) or \
        tile_sparsity(mask[perm][:, perm]) == pytest.approx(5 / 9, abs=1e-6)


@pytest.mark.parametrize("cell", CELLS)
def test_permutation_folding_leaves_outputs_unchanged(cell):
    torch.manual_seed(0)
    rnn, decoder = cell(3, 32, num_layers=2), nn.Linear(32, 2)
    perms = [torch.randperm(32), torch.randperm(32)]
    x, h0 = torch.randn(6, 2, 3), torch.randn(2, 2, 32)
    state = (h0, torch.randn(2, 2, 32)) if cell is nn.LSTM else h0
    permuted_state = tuple(permute_state(s, perms) for s in state) if cell is nn.LSTM \
        else permute_state(state, perms)
    out, _ = rnn(x, state)
    permuted_out, _ = permute_rnn(rnn, perms)(x, permuted_state)
    assert torch.allclose(permuted_out, out[..., perms[1]], atol=1e-6)
    assert torch.allclose(permute_linear_input(decoder, perms[1])(permuted_out), decoder(out),
                          atol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch", [1, 3])
def test_tiled_runtime_equals_pruned_module(cell, batch):
    torch.manual_seed(1)
    rnn = cell(3, 64, num_layers=2)
    embedding = torch.rand(64, 2) * 10
    pruned, perms = tile_prune_rnn(rnn, 0.75, embedding)
    for layer in range(2):
        assert tile_sparsity(getattr(pruned, f"weight_hh_l{layer}")) == pytest.approx(0.75)
    x = torch.randn(5, batch, 3)
    h0 = torch.randn(2, batch, 64)
    state = (h0, torch.zeros(2, batch, 64)) if cell is nn.LSTM else h0
    # the same pruned model in the original numbering, run by PyTorch
    inverse = [torch.argsort(p) for p in perms]
    original = permute_rnn(pruned, inverse)
    expected = original(x, state)
    for kernel in ("bsr", "gather", "csr"):
        actual = SparseRNN.from_module(pruned, kernel=kernel, perms=perms)(x, state)
        assert float((actual[0] - expected[0]).detach().abs().max()) <= 1e-5
        final = (actual[1][0], expected[1][0]) if cell is nn.LSTM else (actual[1], expected[1])
        assert float((final[0] - final[1]).detach().abs().max()) <= 1e-5


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, 32, batch_first=True)
        self.readout = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.rnn(x)[0][:, -1]).squeeze(-1)


def test_tile_vs_unstructured_quality_returns_both_metrics():
    torch.manual_seed(0)
    model = _Tiny()
    x = torch.rand(16, 5, 2)
    target = model(x).detach()

    def negative_mse(candidate: nn.Module) -> float:
        with torch.no_grad():
            return -float(((candidate(x) - target) ** 2).mean())

    before = [p.clone() for p in model.parameters()]
    result = tile_vs_unstructured_quality(model, negative_mse, 0.5,
                                          {"rnn.weight_hh_l0": torch.rand(32, 2) * 10})
    assert isinstance(result, QualityComparison) and result.sparsity == 0.5
    assert result.dense == 0.0
    assert result.unstructured < 0.0 and result.tile < 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(TileConfigError, match="no embedding"):
        tile_vs_unstructured_quality(model, negative_mse, 0.5, {"other": torch.rand(32, 2)})
