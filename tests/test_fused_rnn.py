"""The navigation model's fused ReLU recurrence: same values and gradients as nn.RNN, used only when safe."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moduli_transform as mt
from moduli_transform.tasks.fused_rnn import relu_rnn
from moduli_transform.tasks.navigation import PathIntegrationRNN


def _gradients(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def test_gradients_match_finite_differences_in_double_precision():
    torch.manual_seed(0)
    rnn = torch.nn.RNN(3, 6, nonlinearity="relu", bias=False, batch_first=True).double()
    inputs = torch.randn(4, 5, 3, dtype=torch.double, requires_grad=True)
    h0 = torch.randn(4, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(relu_rnn, (inputs, h0, rnn.weight_ih_l0, rnn.weight_hh_l0))


def test_values_and_gradients_equal_nn_rnn():
    torch.manual_seed(1)
    rnn = torch.nn.RNN(2, 32, nonlinearity="relu", bias=False, batch_first=True)
    inputs, h0 = torch.randn(8, 12, 2, requires_grad=True), torch.randn(8, 32, requires_grad=True)
    weights = [rnn.weight_ih_l0, rnn.weight_hh_l0]
    reference = rnn(inputs, h0[None])[0]
    fused = relu_rnn(inputs, h0, *weights)
    assert fused.shape == reference.shape == (8, 12, 32)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    # Some ReLUs are off, so the mask in the backward matters.
    assert 0.1 < float((reference == 0).float().mean()) < 0.9
    probe = torch.randn_like(reference)
    expected = _gradients((reference * probe).sum(), [inputs, h0, *weights])
    got = _gradients((fused * probe).sum(), [inputs, h0, *weights])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"expects inputs \(B, T, I\) and h0 \(B, H\); got \(5, 2\) and \(3, 8\)"):
        relu_rnn(torch.zeros(5, 2), torch.zeros(3, 8), torch.zeros(8, 2), torch.zeros(8, 8))


def _model_and_batch():
    torch.manual_seed(2)
    model = PathIntegrationRNN(place_cells=10, grid_cells=16)
    return model, torch.randn(4, 7, 2), torch.softmax(torch.randn(4, 10), -1)


def test_model_trains_through_the_fused_path_with_nn_rnn_values():
    model, velocities, start = _model_and_batch()
    assert model._fused_training()
    fused = model(velocities, start)
    with torch.no_grad():
        assert not model._fused_training()
        reference = model(velocities, start)
    torch.testing.assert_close(fused.detach(), reference, rtol=1e-5, atol=1e-6)


class _Watch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_model_falls_back_to_nn_rnn_when_something_watches_the_layer():
    model, velocities, start = _model_and_batch()
    calls = []
    handle = model.rnn.register_forward_hook(lambda *_: calls.append(1))
    assert not model._fused_training()
    model(velocities, start)
    assert calls == [1]  # the user's hook ran: nn.RNN did the work
    handle.remove()
    with _Watch():
        assert not model._fused_training()
    glob = torch.nn.modules.module.register_module_forward_pre_hook(lambda *_: None)
    assert not model._fused_training()
    glob.remove()
    assert model._fused_training()


def test_attach_finds_the_same_target_and_auto_mode_keeps_nn_rnn():
    model, velocities, start = _model_and_batch()
    handle = mt.attach(model, manifold="torus", sparsity=0.5, total_steps=10)
    try:
        assert [t.name for t in handle.targets if t.name in handle.regularizers] == ["rnn.weight_hh_l0"]
        if handle.config.auto:  # auto mode resolves its steps in a forward pre-hook of nn.RNN
            assert not model._fused_training()
    finally:
        handle.remove()
    assert model._fused_training()


def test_an_auto_handle_on_another_model_leaves_the_fused_path_on():
    """Its global forward pre-hook acts on that model's modules alone; before, it switched this
    model to nn.RNN (other float rounding) until the garbage collector removed the hook."""
    model, _, _ = _model_and_batch()
    other = torch.nn.RNN(3, 8)
    other_handle = mt.attach(other, sparsity=0.5, total_steps=4, auto=True)
    own_handle = None
    try:
        assert torch.nn.modules.module._global_forward_pre_hooks  # the other handle's hook is there
        assert model._fused_training()
        own_handle = mt.attach(model, sparsity=0.5, total_steps=4, auto=True)
        assert not model._fused_training()  # a hook that watches this model's layer still counts
    finally:
        other_handle.remove()
        if own_handle is not None:
            own_handle.remove()
    assert model._fused_training()


def test_a_navigation_run_is_bit_identical_with_an_unrelated_auto_handle_alive(tmp_path):
    from safetensors.torch import load_file

    from moduli_transform.tasks.runner import RunConfig, run

    def weights(name: str) -> dict[str, torch.Tensor]:
        config = RunConfig(task="navigation", preset="test", sparsity=0.5, seed=3, out=str(tmp_path / name), threads=1)
        run(config, progress=False)
        return load_file(str(tmp_path / name / "weights.safetensors"))

    alone = weights("alone")
    other = torch.nn.RNN(3, 8)
    handle = mt.attach(other, sparsity=0.5, total_steps=4, auto=True)
    try:
        beside = weights("beside")
    finally:
        handle.remove()
    assert alone.keys() == beside.keys() and all(torch.equal(alone[k], beside[k]) for k in alone)
