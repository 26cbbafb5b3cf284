"""Gradual tile pruning (granularity="tile"): whole tiles in the manifold order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moduli_transform as mt
from moduli_transform.export.sparse_runtime import SparseRNN
from moduli_transform.export.tiles import handle_perms, permute_linear_input, permute_rnn, permute_state, tile_sparsity
from moduli_transform.pruning import MagnitudeSparsifier, tile_norms


def _tiles_uniform(mask: torch.Tensor, tile: int) -> bool:
    """Every tile is entirely kept or entirely pruned."""
    kept = tile_norms(mask.float(), tile) ** 2
    sizes = tile_norms(torch.ones_like(mask, dtype=torch.float), tile) ** 2
    return bool(((kept == 0) | (kept == sizes)).all())


def test_tile_sparsifier_keeps_the_largest_tiles():
    weight = torch.full((8, 8), 0.01)
    weight[:4, 4:] = 5.0          # the strongest tile
    weight[4:, :4] = 1.0          # the second
    mask = torch.ones(8, 8, dtype=torch.bool)
    MagnitudeSparsifier(granularity="tile", tile=4).update_masks({"w": weight}, {"w": mask}, 0.5)
    assert mask[:4, 4:].all() and mask[4:, :4].all()
    assert not mask[:4, :4].any() and not mask[4:, 4:].any()


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_tile_pruning_is_exact_uniform_and_monotone(sparsity):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 48, generator=generator)
    perm_rows, perm_cols = torch.randperm(32, generator=generator), torch.randperm(48, generator=generator)
    mask = torch.ones(32, 48, dtype=torch.bool)
    sparsifier = MagnitudeSparsifier(granularity="tile", tile=8)
    previous = mask.clone()
    for level in (sparsity / 2, sparsity):
        sparsifier.update_masks({"w": weight}, {"w": mask}, level, {"w": (perm_rows, perm_cols)})
        assert not (mask & ~previous).any()          # nothing revived
        previous = mask.clone()
    in_order = mask[perm_rows][:, perm_cols]
    assert _tiles_uniform(in_order, 8)
    assert tile_sparsity(in_order, 8) == pytest.approx(round(sparsity * 24) / 24)
    # in the original numbering the same mask is scattered, not tiled
    assert not _tiles_uniform(mask, 8)


def test_global_tile_scope_prunes_the_weaker_tensor_first():
    strong, weak = torch.full((8, 8), 3.0), torch.full((8, 8), 0.1)
    masks = {"a": torch.ones(8, 8, dtype=torch.bool), "b": torch.ones(8, 8, dtype=torch.bool)}
    MagnitudeSparsifier("global", "tile", 4).update_masks({"a": strong, "b": weak}, masks, 0.5)
    assert masks["a"].all() and not masks["b"].any()


def test_bad_granularity_and_tile_are_named():
    with pytest.raises(ValueError, match="'blocks'.*element, tile"):
        mt.attach(nn.RNN(4, 16), sparsity=0.5, granularity="blocks")
    with pytest.raises(ValueError, match="tile must be a positive integer, got 0"):
        mt.attach(nn.RNN(4, 16), sparsity=0.5, granularity="tile", tile=0)


def test_conv_targets_refuse_tiles():
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match="2-D weight blocks.*granularity='element'"):
        mt.attach(model, targets="conv", sparsity=0.5, granularity="tile")


@pytest.mark.parametrize("module", [nn.RNN(6, 32), nn.GRU(6, 32), nn.LSTM(6, 32, num_layers=2)])
def test_attach_prunes_gate_blocks_in_whole_tiles(module):
    handle = mt.attach(module, manifold="torus", sparsity=0.75, schedule="linear", total_steps=4,
                       granularity="tile", tile=8)
    for _ in range(4):
        handle.step()
    for target in handle.targets:
        rows, cols = handle.neuron_orders[target.name]
        mask = handle.masks[target.name][rows][:, cols]
        for gate in range(target.gates):
            block = mask[gate * 32:(gate + 1) * 32]
            assert _tiles_uniform(block, 8)
        assert handle.sparsity()[target.name] == pytest.approx(0.75)


def test_orders_follow_the_manifold_and_survive_state_dict():
    module = nn.RNN(4, 64)
    handle = mt.attach(module, manifold="circle", sparsity=0.5, total_steps=1, granularity="tile", tile=16)
    rows, cols = handle.neuron_orders["weight_hh_l0"]
    points = handle.regularizers["weight_hh_l0"].row_embedding.detach()[cols]
    angles = torch.atan2(points[:, 1], points[:, 0])
    assert bool((angles[1:] >= angles[:-1]).all())        # sorted around the circle
    handle.step()
    state = handle.state_dict()
    fresh = mt.attach(nn.RNN(4, 64), manifold="circle", sparsity=0.5, total_steps=1, granularity="tile",
                      tile=16, seed=5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.neuron_orders["weight_hh_l0"][0], rows)
    assert torch.equal(fresh.masks["weight_hh_l0"], handle.masks["weight_hh_l0"])


def test_tile_pruned_model_runs_block_sparse_with_unchanged_outputs():
    torch.manual_seed(0)
    rnn, decoder = nn.RNN(5, 32, num_layers=2), nn.Linear(32, 3)
    handle = mt.attach(rnn, manifold="torus", sparsity=0.75, schedule="oneshot", total_steps=1,
                       granularity="tile", tile=8)
    handle.step()
    perms = handle_perms(handle, rnn)
    permuted = permute_rnn(rnn, perms)
    for layer in range(2):
        weight = getattr(permuted, f"weight_hh_l{layer}")
        assert tile_sparsity(weight != 0, 8) == pytest.approx(0.75)
    x, h0 = torch.randn(7, 2, 5), torch.randn(2, 2, 32)
    expected = decoder(rnn(x, h0)[0])
    out, _ = permuted(x, permute_state(h0, perms))
    torch.testing.assert_close(permute_linear_input(decoder, perms[-1])(out), expected, atol=1e-5, rtol=1e-5)
    runtime = SparseRNN.from_module(permuted, kernel="bsr", tile=8)
    sparse_out, _ = runtime(x, permute_state(h0, perms))
    torch.testing.assert_close(sparse_out, out, atol=1e-5, rtol=1e-5)


def test_handle_perms_needs_a_tile_handle():
    rnn = nn.RNN(4, 16)
    handle = mt.attach(rnn, sparsity=0.5, total_steps=1)
    with pytest.raises(ValueError, match="granularity='tile'"):
        handle_perms(handle, rnn)
