"""Navigation protocol: the authors' values in the presets, AdamW and its schedule, chance level."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from moduli_transform.tasks.navigation import (CHANCE_LEVEL_CM, PRESETS, NavigationPreset, NavigationTask,
                                               learning_rate_factor)
from moduli_transform.tasks.runner import WEIGHTS_FILE, RunConfig, run

pytestmark = pytest.mark.usefixtures("one_thread")

AUTHORS_SCOPE = ("encoder.weight", "rnn.weight_ih_l0", "decoder.weight")


def test_paper_preset_is_the_authors_protocol():
    preset = PRESETS["paper"]
    sizes = (preset.place_cells, preset.grid_cells, preset.batch_size, preset.sequence_length)
    assert sizes == (512, 4096, 200, 50)
    assert (preset.place_cell_width, preset.surround_scale) == (0.12, 2.0)
    assert (preset.lr, preset.weight_decay, preset.strength) == (1e-4, 0.01, 0.1)
    assert (preset.lr_warmup, preset.lr_half_life) == (0, 0)  # constant rate
    assert (preset.schedule, preset.epochs, preset.steps_per_epoch, preset.stabilizer_epochs) == ("epochs", 30, 1000, 0)
    assert preset.eval_size == 1000


@pytest.mark.parametrize("name", ["test", "cpu", "paper"])
def test_every_preset_prunes_and_retrains_as_the_authors(name):
    preset = PRESETS[name]
    assert (preset.scope, preset.prune_also) == ("global", AUTHORS_SCOPE)
    assert (preset.lottery_penalty, preset.lottery_embedding) == (True, "redraw")
    assert preset.schedule == "epochs" and preset.stabilizer_epochs == 0
    assert preset.lottery_epochs == preset.epochs  # the lottery retrains as long as the first run
    assert preset.steps == preset.epochs * preset.steps_per_epoch


def test_cpu_recurrent_preset_differs_from_cpu_only_in_pruning_w_hh_alone():
    from dataclasses import asdict

    cpu, recurrent = asdict(PRESETS["cpu"]), asdict(PRESETS["cpu-recurrent"])
    assert {k for k in cpu if cpu[k] != recurrent[k]} == {"scope", "prune_also"}
    assert (recurrent["scope"], tuple(recurrent["prune_also"])) == ("per_tensor", ())


def test_cpu_preset_sizes():
    preset = PRESETS["cpu"]
    assert (preset.place_cells, preset.grid_cells, preset.batch_size, preset.sequence_length) == (256, 256, 100, 20)
    assert (preset.epochs, preset.steps_per_epoch, preset.lr, preset.lr_half_life) == (30, 200, 3e-3, 3000)
    assert preset.weight_decay == PRESETS["paper"].weight_decay and preset.strength == PRESETS["paper"].strength


def test_optimizer_is_adamw_with_the_presets_rate_and_weight_decay():
    task = NavigationTask(PRESETS["test"])
    optimizer = task.make_optimizer(task.build_model())
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["lr"] == PRESETS["test"].lr
    assert optimizer.param_groups[0]["weight_decay"] == 0.01


def test_learning_rate_follows_the_optimizers_own_step_count_across_a_reload():
    preset = NavigationPreset(**{**PRESETS["test"].to_dict(), "lr": 1e-2, "lr_warmup": 2, "lr_half_life": 3})
    task = NavigationTask(preset)
    model = task.build_model()
    optimizer = task.make_optimizer(model)
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(5):
        model(torch.zeros(1, 2, 2), torch.zeros(1, preset.place_cells)).sum().backward()
        optimizer.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([1e-2 * learning_rate_factor(k, 2, 3) for k in range(6)])
    assert rates[:3] == pytest.approx([5e-3, 1e-2, 1e-2]) and rates[5] == pytest.approx(5e-3)
    # A fresh optimizer loaded from the state dict continues the schedule (checkpoints, resume).
    restored = task.make_optimizer(model)
    restored.load_state_dict(optimizer.state_dict())
    model(torch.zeros(1, 2, 2), torch.zeros(1, preset.place_cells)).sum().backward()
    restored.step()
    assert restored.param_groups[0]["lr"] == pytest.approx(1e-2 * learning_rate_factor(6, 2, 3))


def test_negative_schedule_lengths_are_rejected():
    with pytest.raises(ValueError, match="lr_half_life must be >= 0"):
        NavigationPreset(**{**PRESETS["test"].to_dict(), "lr_half_life": -1})


def test_chance_level_is_the_mean_distance_to_the_arenas_centre():
    assert NavigationTask.chance_level == CHANCE_LEVEL_CM == pytest.approx(84.17, abs=0.01)
    points = (torch.rand(200_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5) * 2.2
    assert float(100 * points.norm(dim=-1).mean()) == pytest.approx(CHANCE_LEVEL_CM, abs=0.3)
    assert NavigationTask.learned_threshold == 30.0


def test_test_preset_run_prunes_four_matrices_globally_and_retrains_the_ticket(tmp_path):
    config = RunConfig(task="navigation", preset="test", sparsity=0.9, lottery=True, out=str(tmp_path / "run"))
    summary = run(config, progress=False)
    assert summary["phases"] == {"dense": 10, "prune": 20, "finetune": 0, "lottery": 30}
    tensors = load_file(str(tmp_path / "run" / WEIGHTS_FILE))
    masks = {name[len("mask/"):]: mask for name, mask in tensors.items() if name.startswith("mask/")}
    assert set(masks) == {"rnn.weight_hh_l0", *AUTHORS_SCOPE}
    kept = sum(int(mask.sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    assert kept == total - math.floor(0.9 * total) or abs(1 - kept / total - 0.9) < 2 / total
    for name, mask in masks.items():  # pruned weights are zero after the lottery retrain
        assert torch.all(tensors[name][mask == 0] == 0)
