"""attach() and the handle: discovery by type, explicit and auto mode, lottery, state."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import moduli_transform as mt
from conftest import CellLoopModel, TinyRNNRegressor, toy_batch


def train(model, handle, steps, optimizer_factory=lambda p: torch.optim.Adam(p, lr=1e-2), explicit=True, call=None):
    optimizer = optimizer_factory(model.parameters())
    call = call or model
    for step in range(steps):
        x, y = toy_batch(step)
        loss = nn.functional.mse_loss(call(x), y)
        if explicit:
            loss = loss + handle.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if explicit:
            handle.step()
    return model


# -- discovery by type ------------------------------------------------------------------
@pytest.mark.parametrize("module, expected", [
    (nn.RNN(3, 8, num_layers=2, bidirectional=True),
     {"weight_hh_l0": 1, "weight_hh_l0_reverse": 1, "weight_hh_l1": 1, "weight_hh_l1_reverse": 1}),
    (nn.GRU(3, 8), {"weight_hh_l0": 3}),
    (nn.LSTM(3, 8, num_layers=2), {"weight_hh_l0": 4, "weight_hh_l1": 4}),
    (nn.LSTM(3, 8, proj_size=4), {"weight_hh_l0": 4, "weight_hr_l0": 1}),
    (nn.LSTMCell(3, 8), {"weight_hh": 4}),
    (nn.RNNCell(3, 8), {"weight_hh": 1}),
])
def test_discovery_by_layer_type(module, expected):
    handle = mt.attach(module)
    assert {t.name: t.gates for t in handle.targets} == expected
    for target in handle.targets:
        assert dict(module.named_parameters())[target.name].shape == target.shape


def test_layer_types_report_the_parameter_that_holds_the_weight():
    """AWD-LSTM's weight drop deletes weight_hh_l0 (weight_hh_l0_raw is what the optimizer
    updates; no forward has run yet), parametrizations keep it as ``original``."""
    from model_zoo import WeightDropLSTM

    for spec in ("types", ["rnn.weight_hh_l0_raw"]):
        handle = mt.attach(WeightDropLSTM(), targets=spec, sparsity=0.5, total_steps=1)
        assert [(t.name, t.gates) for t in handle.targets] == [("rnn.weight_hh_l0_raw", 4)]
        assert "held as weight_hh_l0_raw" in handle.targets[0].evidence
    rnn = nn.utils.parametrizations.orthogonal(nn.RNN(3, 8), "weight_hh_l0")
    (target,) = mt.attach(rnn, targets="types").targets
    assert target.name == "parametrizations.weight_hh_l0.original"
    assert target.evidence.startswith("RNN layer 0")


def test_lstm_proj_size_gets_separate_row_and_column_embeddings():
    handle = mt.attach(nn.LSTM(3, 8, proj_size=4))
    reg = handle.regularizers["weight_hh_l0"]
    assert not reg.shared
    assert reg.row_embedding.shape[0] == 8 and reg.col_embedding.shape[0] == 4
    assert handle.regularizers["weight_hr_l0"].row_embedding.shape[0] == 4


def test_each_layer_gets_its_own_embedding():
    handle = mt.attach(nn.RNN(3, 8, num_layers=2))
    a, b = (handle.regularizers[n].row_embedding for n in ("weight_hh_l0", "weight_hh_l1"))
    assert not torch.equal(a, b)


def test_feed_forward_weights_of_the_same_shape_are_not_targets():
    handle = mt.attach(nn.RNN(8, 8, num_layers=2))
    assert all("weight_ih" not in t.name for t in handle.targets)


def test_explicit_targets_and_linear_conv_kinds():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 6))
    handle = mt.attach(model, targets=["linear", "conv"])
    assert {t.name: t.kind for t in handle.targets} == {"2.weight": "linear", "0.weight": "conv"}
    assert handle.regularizers["2.weight"].row_embedding.shape[0] == 6
    assert handle.regularizers["0.weight"].col_embedding.shape[0] == 3
    named = mt.attach(TinyRNNRegressor(), targets=["re:rnn\\.weight_hh_l\\d"])
    assert [t.name for t in named.targets] == ["rnn.weight_hh_l0"]



def test_exclusions_drop_what_other_entries_found():
    from model_zoo import AttentionSeq2Seq

    model = AttentionSeq2Seq()
    inputs = (torch.randint(0, 11, (2, 4)),)
    handle = mt.attach(model, example_inputs=inputs, targets=["recurrent", "!attention.weight", "!re:decoder\\.weight_ih"])
    assert {t.name for t in handle.targets} == {"encoder.weight_hh_l0", "decoder.weight_hh"}
    handle.remove()
    with pytest.raises(ValueError, match="'nope' matches no parameter"):
        mt.attach(model, example_inputs=inputs, targets=["recurrent", "!nope"])
    with pytest.raises(ValueError, match="nothing to regularize"):
        mt.attach(nn.RNN(3, 4), targets=["recurrent", "!weight_hh_l0"])

# -- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (dict(manifold="toruss"), "unknown manifold 'toruss'"),
    (dict(inhibitor="dogg"), "unknown inhibitor 'dogg'"),
    (dict(schedule="cosine", sparsity=0.5), "unknown schedule 'cosine'"),
    (dict(sparsity=1.0), r"sparsity must be in \[0, 1\), got 1.0"),
    (dict(embedding="learned"), "unknown embedding 'learned'; expected one of fixed, trained"),
    (dict(targets=["rnn.weight_hh_l7"]), "'rnn.weight_hh_l7' matches no parameter"),
])
def test_bad_options_raise_value_errors_naming_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        mt.attach(TinyRNNRegressor(), **options)


def test_model_with_nothing_to_regularize():
    with pytest.raises(mt.NoTargetsError, match="nothing to regularize in Sequential"):
        mt.attach(nn.Sequential(nn.Linear(3, 3)))


# -- explicit mode ------------------------------------------------------------------------
def test_explicit_mode_reaches_exact_sparsity_and_pruned_weights_stay_zero(tiny_rnn):
    handle = mt.attach(tiny_rnn, sparsity=0.9, total_steps=5, strength=0.1)
    train(tiny_rnn, handle, 8)
    weight = tiny_rnn.rnn.weight_hh_l0
    assert int((weight == 0).sum()) == round(0.9 * weight.numel())
    assert torch.equal(weight == 0, ~handle.masks["rnn.weight_hh_l0"])
    assert handle.sparsity()["rnn.weight_hh_l0"] == pytest.approx(round(0.9 * 144) / 144)


def test_pruned_weights_are_not_revived_by_adam_momentum(tiny_rnn):
    handle = mt.attach(tiny_rnn, sparsity=0.5, total_steps=1)
    optimizer = torch.optim.Adam(tiny_rnn.parameters(), lr=0.1)
    for step in range(6):
        x, y = toy_batch(step)
        optimizer.zero_grad()
        nn.functional.mse_loss(tiny_rnn(x), y).backward()
        optimizer.step()
        if step == 0:
            handle.step()
        assert bool((tiny_rnn.rnn.weight_hh_l0[~handle.masks["rnn.weight_hh_l0"]] == 0).all())


def test_penalty_is_differentiable_and_pulls_weights_down(tiny_rnn):
    handle = mt.attach(tiny_rnn, strength=1.0)
    penalty = handle.penalty()
    penalty.backward()
    grad = tiny_rnn.rnn.weight_hh_l0.grad
    assert penalty.item() > 0 and grad is not None
    weight = tiny_rnn.rnn.weight_hh_l0.detach()
    assert bool((grad * weight >= 0).all())  # every step of descent shrinks |W|
    assert float((grad != 0).float().mean()) > 0.9


# -- auto mode -------------------------------------------------------------------------
def test_auto_mode_reaches_the_same_weights_as_explicit_mode():
    torch.manual_seed(0)
    explicit_model = TinyRNNRegressor()
    auto_model = copy.deepcopy(explicit_model)
    explicit = mt.attach(explicit_model, sparsity=0.8, total_steps=6, strength=0.5)
    auto = mt.attach(auto_model, sparsity=0.8, total_steps=6, strength=0.5, auto=True)
    train(explicit_model, explicit, 10)
    train(auto_model, auto, 10, explicit=False)
    assert auto.step_count == explicit.step_count == 10
    for (name, a), (_, b) in zip(explicit_model.named_parameters(), auto_model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert torch.equal(explicit.masks["rnn.weight_hh_l0"], auto.masks["rnn.weight_hh_l0"])


def test_auto_mode_with_trained_embeddings_matches_explicit():
    torch.manual_seed(1)
    explicit_model = TinyRNNRegressor()
    auto_model = copy.deepcopy(explicit_model)
    options = dict(sparsity=0.5, total_steps=4, strength=0.5, embedding="trained")
    explicit = mt.attach(explicit_model, **options)
    auto = mt.attach(auto_model, auto=True, **options)
    train(explicit_model, explicit, 5)
    train(auto_model, auto, 5, explicit=False)
    a = explicit.regularizers["rnn.weight_hh_l0"].row_embedding
    b = auto.regularizers["rnn.weight_hh_l0"].row_embedding
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(explicit_model.rnn.weight_hh_l0, auto_model.rnn.weight_hh_l0, atol=1e-5)


def test_auto_mode_with_a_hand_written_update_loop(tiny_rnn):
    handle = mt.attach(tiny_rnn, sparsity=0.75, total_steps=3, auto=True)
    for step in range(5):
        x, y = toy_batch(step)
        tiny_rnn.zero_grad()
        nn.functional.mse_loss(tiny_rnn(x), y).backward()
        for p in tiny_rnn.parameters():
            p.data.add_(p.grad, alpha=-0.05)
    handle.step()  # nothing pending would be lost: the hooks resolved earlier passes
    weight = tiny_rnn.rnn.weight_hh_l0
    assert int((weight == 0).sum()) == round(0.75 * weight.numel())


def test_auto_mode_with_lbfgs_closure_and_a_method_other_than_forward():
    torch.manual_seed(0)
    model = CellLoopModel()
    handle = mt.attach(model, sparsity=0.5, total_steps=2, auto=True)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    x, y = toy_batch(0)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model.rollout(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        optimizer.step(closure)
    weight = model.cell.weight_hh
    assert handle.step_count >= 2
    assert int((weight == 0).sum()) == round(0.5 * weight.numel())


def test_auto_mode_adds_the_penalty_gradient(tiny_rnn):
    reference = copy.deepcopy(tiny_rnn)
    handle = mt.attach(tiny_rnn, strength=2.0, auto=True)
    x, y = toy_batch(0)
    nn.functional.mse_loss(tiny_rnn(x), y).backward()
    ref_handle = mt.attach(reference, strength=2.0)
    (nn.functional.mse_loss(reference(x), y) + ref_handle.penalty()).backward()
    assert torch.allclose(tiny_rnn.rnn.weight_hh_l0.grad, reference.rnn.weight_hh_l0.grad, atol=1e-7)
    assert not handle.penalty().requires_grad


# -- third-party code keeps working -------------------------------------------------------
def test_save_reload_deepcopy_and_strict_state_dict_after_attach(tiny_rnn):
    handle = mt.attach(tiny_rnn, sparsity=0.5, total_steps=1, auto=True)
    train(tiny_rnn, handle, 2, explicit=False)
    keys_before = list(TinyRNNRegressor().state_dict())
    assert list(tiny_rnn.state_dict()) == keys_before
    fresh = TinyRNNRegressor()
    fresh.load_state_dict(tiny_rnn.state_dict(), strict=True)
    buffer = io.BytesIO()
    torch.save(tiny_rnn, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    clone = copy.deepcopy(tiny_rnn)
    x, _ = toy_batch(9)
    for other in (fresh, reloaded, clone):
        assert torch.equal(other(x), tiny_rnn(x))
        assert not other.rnn.weight_hh_l0._post_accumulate_grad_hooks


def test_remove_returns_the_plain_model_with_zeros_baked_in(tiny_rnn):
    handle = mt.attach(tiny_rnn, sparsity=0.5, total_steps=1, auto=True)
    train(tiny_rnn, handle, 2, explicit=False)
    model = handle.remove()
    assert model is tiny_rnn
    assert not model.rnn.weight_hh_l0._post_accumulate_grad_hooks
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert int((model.rnn.weight_hh_l0 == 0).sum()) == 72
    x, y = toy_batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    assert handle.step_count == 2  # detached: backward no longer advances the schedule


# -- lottery tickets and state --------------------------------------------------------------
@pytest.mark.parametrize("reinit", ["random", "rewind"])
def test_lottery_keeps_masks_and_freezes_embeddings(reinit):
    torch.manual_seed(0)
    model = TinyRNNRegressor()
    initial = copy.deepcopy(model.state_dict())
    handle = mt.attach(model, sparsity=0.7, total_steps=3, embedding="trained")
    train(model, handle, 4)
    mask = handle.masks["rnn.weight_hh_l0"].clone()
    trained_weight = model.rnn.weight_hh_l0.detach().clone()
    handle.lottery(reinit)
    weight = model.rnn.weight_hh_l0.detach()
    assert torch.equal(handle.masks["rnn.weight_hh_l0"], mask)
    assert bool((weight[~mask] == 0).all())
    assert not torch.equal(weight, trained_weight)
    if reinit == "rewind":
        assert torch.equal(weight, initial["rnn.weight_hh_l0"] * mask)
    embedding = handle.regularizers["rnn.weight_hh_l0"].row_embedding.clone()
    train(model, handle, 3)
    assert torch.equal(handle.regularizers["rnn.weight_hh_l0"].row_embedding, embedding)
    assert torch.equal(handle.masks["rnn.weight_hh_l0"], mask)
    with pytest.raises(ValueError, match="unknown reinit 'shuffle'; expected one of random, rewind"):
        handle.lottery("shuffle")


def test_random_lottery_is_seeded_and_leaves_the_global_generator_alone():
    tickets = []
    for draws in (0, 5):
        torch.manual_seed(0)
        model = TinyRNNRegressor()
        handle = mt.attach(model, sparsity=0.7, total_steps=3, seed=4)
        train(model, handle, 4)
        torch.rand(draws)   # a different global RNG position before the lottery
        state = torch.get_rng_state()
        handle.lottery("random")
        assert torch.equal(torch.get_rng_state(), state)
        tickets.append(model.rnn.weight_hh_l0.detach().clone())
    # the same ticket however the global generator stood: drawn from the config's seed + 1
    assert torch.equal(tickets[0], tickets[1])


def test_handle_state_dict_round_trip(tiny_rnn):
    handle = mt.attach(tiny_rnn, sparsity=0.6, total_steps=4, embedding="trained")
    train(tiny_rnn, handle, 3)
    state = handle.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other_model = TinyRNNRegressor()
    other_model.load_state_dict(tiny_rnn.state_dict())
    other = mt.attach(other_model, sparsity=0.6, total_steps=4, embedding="trained", seed=5)
    other.load_state_dict(state)
    assert other.step_count == 3
    assert torch.equal(other.masks["rnn.weight_hh_l0"], handle.masks["rnn.weight_hh_l0"])
    assert torch.equal(other.regularizers["rnn.weight_hh_l0"].row_embedding,
                       handle.regularizers["rnn.weight_hh_l0"].row_embedding)


def test_summary_and_memory_footprint():
    lstm = nn.LSTM(650, 650, num_layers=3)
    handle = mt.attach(lstm)
    assert handle.memory_bytes() == 3 * 650 * 650 * 4
    text = handle.summary()
    assert "weight_hh_l2" in text and "1.61 MiB" in text and "torus" in text


def test_trained_embeddings_move_and_stay_on_the_manifold(tiny_rnn):
    handle = mt.attach(tiny_rnn, embedding="trained", strength=5.0, embedding_lr=0.5)
    before = handle.regularizers["rnn.weight_hh_l0"].row_embedding.clone()
    train(tiny_rnn, handle, 3)
    after = handle.regularizers["rnn.weight_hh_l0"].row_embedding
    assert not torch.equal(before, after)
    assert bool(((after >= 0) & (after < 10)).all())


def test_a_handle_whose_model_is_gone_is_released():
    import gc
    import weakref

    model = TinyRNNRegressor()
    handle = mt.attach(model, sparsity=0.5, total_steps=1, auto=True)
    reference = weakref.ref(handle)
    del model, handle
    gc.collect()
    assert reference() is None


def test_prune_also_prunes_named_parameters_without_regularizing_them(tiny_rnn):
    handle = mt.attach(tiny_rnn, sparsity=0.5, total_steps=1, prune_also=["readout.weight"])
    handle.step()
    assert "readout.weight" not in handle.regularizers
    assert {t.name: t.kind for t in handle.targets}["readout.weight"] == "extra"
    assert int((tiny_rnn.readout.weight == 0).sum()) == 6
    assert handle.sparsity()["readout.weight"] == 0.5


def test_global_scope_prunes_over_all_targets_together():
    torch.manual_seed(0)
    model = nn.RNN(3, 8, num_layers=2)
    with torch.no_grad():
        model.weight_hh_l0.uniform_(-0.1, 0.1)
        model.weight_hh_l1.uniform_(1.0, 2.0)
    handle = mt.attach(model, sparsity=0.5, total_steps=1, scope="global")
    handle.step()
    sparsity = handle.sparsity()
    assert sparsity["overall"] == 0.5
    assert sparsity["weight_hh_l0"] == 1.0  # all 64 small weights go before any large one
    assert sparsity["weight_hh_l1"] == 0.0
