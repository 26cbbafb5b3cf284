"""The authors' protocols as presets: schedule shape, pruning scope, controls, lottery, metric (test presets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moduli_transform as mt
from moduli_transform.tasks import get_task
from moduli_transform.tasks.adding import ElmanCat
from moduli_transform.tasks.runner import RunConfig, RunInterrupted, _Run, run, tail_mean

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path: Path, task: str = "adding", **changes) -> RunConfig:
    options = dict(task=task, preset="test", sparsity=0.6, seed=0, out=str(tmp_path / "run"), threads=1)
    options.update(changes)
    return RunConfig(**options)


def _records(config: RunConfig) -> list[dict]:
    return [json.loads(line) for line in (Path(config.out) / "metrics.jsonl").read_text().splitlines()]


# -- model: the graph pass finds the recurrent slice ----------------------------------------
def test_graph_pass_finds_the_hidden_columns_of_i2h_as_the_recurrent_block():
    model = ElmanCat(hidden_size=16)
    handle = mt.attach(model, example_inputs=(torch.zeros(1, 2, 2),))
    assert [(t.name, t.kind, t.rows, t.cols) for t in handle.targets] == \
        [("i2h.weight", "recurrent", slice(None), slice(2, 18))]
    assert handle.targets[0].block_shape == (16, 16)


# -- schedule shape -------------------------------------------------------------------------
def test_adding_paper_preset_is_the_authors_epoch_protocol():
    preset = get_task("adding").get_preset("paper")
    assert (preset.schedule, preset.steps_per_epoch, preset.epochs, preset.stabilizer_epochs) == ("epochs", 313, 100, 10)
    assert (preset.lr, preset.batch_size, preset.strength, preset.clip, preset.length) == (1e-4, 32, 1e-3, 0.5, 50)
    assert (preset.model, preset.markers, preset.ramp_offset) == ("elman_cat", "anywhere", 0)
    cpu = get_task("adding").get_preset("cpu")
    assert {k: v for k, v in cpu.to_dict().items() if getattr(preset, k) != v} == \
        {"epochs": 40, "stabilizer_epochs": 4, "lottery_epochs": 40}


def test_sparsity_at_each_epoch_start_is_final_times_e_over_n_minus_1(tmp_path):
    config = _config(tmp_path)  # test preset: 4 epochs of 4 steps, then 2 stabilizer epochs
    run(config, progress=False)
    train = {r["step"]: r["sparsity"] for r in _records(config) if r["kind"] == "train"}
    # A record at step 4e + 2 is in the middle of epoch e (logged every 2 steps).
    per_epoch = [train[4 * epoch + 2] for epoch in range(6)]
    assert per_epoch == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.6, 0.6], abs=2e-3)


def test_language_model_ramp_is_e_plus_1_over_n_with_epochs_of_one_pass(tmp_path):
    preset = get_task("language_model").get_preset("paper")
    assert (preset.schedule, preset.steps_per_epoch, preset.epochs, preset.ramp_offset) == ("epochs", 0, 15, 1)
    assert (preset.dropout, preset.init_range, preset.stabilizer_epochs) == (0.0, 0.1, 0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the cat {i % 5} sat on mat {i % 11}" for i in range(300)) + "\n")
    state = _Run(_config(tmp_path, "language_model", preset="cpu", data=str(corpus), sparsity=0.9))
    try:
        epoch = state.task.windows
        assert state.phases.dense == epoch and state.phases.prune == 14 * epoch
        assert [round(state.handle.schedule(k * epoch), 4) for k in (0, 1, 2, 14, 20)] == \
            [0.0, round(0.9 * 2 / 15, 4), round(0.9 * 3 / 15, 4), 0.9, 0.9]
    finally:
        state.handle.remove()


# -- pruning scope --------------------------------------------------------------------------
def test_adding_prunes_i2h_with_its_input_columns_and_h2o_globally(tmp_path):
    state = _Run(_config(tmp_path))
    try:
        handle = state.handle
        assert set(handle.masks) == {"i2h.weight", "h2o.weight"}
        assert handle.masks["i2h.weight"].shape == (16, 18)  # the whole matrix, input columns too
        with torch.no_grad():
            state.model.i2h.weight[0, 0] = 0.0  # an input-column weight: the smallest, so pruned first
        weights = {name: state.model.get_parameter(name).detach().clone() for name in handle.masks}
        handle.prune_now(0.5)
        kept = torch.cat([weights[n][m].abs() for n, m in handle.masks.items()])
        pruned_count = sum(int((~m).sum()) for m in handle.masks.values())
        assert pruned_count == round(0.5 * (16 * 18 + 16))
        assert not bool(handle.masks["i2h.weight"][0, 0])
        pruned = torch.cat([weights[n][~m].abs() for n, m in handle.masks.items()])
        assert float(kept.min()) >= float(pruned.max())  # one threshold over both tensors
    finally:
        state.handle.remove()


def test_global_threshold_is_shared_across_tensors():
    model = ElmanCat(hidden_size=16)
    with torch.no_grad():
        model.h2o.weight.mul_(100.0)  # h2o far larger: global pruning spares it, per-tensor would not
    handle = mt.attach(model, example_inputs=(torch.zeros(1, 2, 2),), sparsity=0.5, scope="global",
                       prune_also=("i2h.weight", "h2o.weight"))
    handle.prune_now(0.5)
    assert bool(handle.masks["h2o.weight"].all())
    assert int((~handle.masks["i2h.weight"]).sum()) == round(0.5 * (16 * 18 + 16))
    handle.remove()


def test_language_model_prunes_encoder_decoder_and_every_rnn_matrix_globally(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"a b {i % 7} c" for i in range(400)) + "\n")
    state = _Run(_config(tmp_path, "language_model", data=str(corpus)))
    try:
        names = {"embedding.weight", "decoder.weight", *(f"rnn.weight_{k}_l{i}" for k in ("ih", "hh") for i in range(3))}
        assert set(state.handle.masks) == names and state.handle.config.scope == "global"
        assert set(state.handle.regularizers) == {f"rnn.weight_hh_l{i}" for i in range(3)}
        # Plain L1 on W_ih, encoder and decoder beside the moduli term (model1.py:89-98).
        extra = sum(state.model.get_parameter(n).abs().mean() for n in state.preset.l1_also) * state.preset.strength
        assert float(state.penalty().detach()) == pytest.approx(float((state.handle.penalty() + extra).detach()), rel=1e-6)
    finally:
        state.handle.remove()


# -- controls -------------------------------------------------------------------------------
def _coefficients(tmp_path: Path, regularizer: str) -> torch.Tensor:
    state = _Run(_config(tmp_path, regularizer=regularizer))
    try:
        return next(iter(state.handle.regularizers.values())).coefficients().clone()
    finally:
        state.handle.remove()


def test_l1_controls_coefficients_are_one_mean_and_matched(tmp_path):
    moduli = _coefficients(tmp_path, "moduli")
    assert torch.equal(_coefficients(tmp_path, "l1"), torch.ones(16, 16))
    # The authors' mean: the un-inverted DoG over the same embedding.
    points = torch.rand(16, 2, generator=torch.Generator().manual_seed(0)) * 10
    dog = mt.inhibitors.get_inhibitor("dog")
    raw = dog.profile(mt.manifolds.get_manifold("torus").distance(points, points))
    mean = _coefficients(tmp_path, "l1-mean")
    assert torch.allclose(mean, torch.full((16, 16), float(raw.mean())))
    assert torch.allclose(moduli, raw.max() - raw)  # moduli: the inverted DoG on that embedding
    matched = _coefficients(tmp_path, "l1-matched")
    assert torch.allclose(matched, torch.full((16, 16), float(moduli.mean())))
    assert float(mean[0, 0]) < float(matched[0, 0])  # un-inverted mean < inverted mean


# -- lottery --------------------------------------------------------------------------------
def _into_lottery(tmp_path: Path, **changes) -> tuple[_Run, torch.Tensor]:
    """A run stopped one step into its lottery phase, and its C before training."""
    state = _Run(_config(tmp_path, lottery=True, **changes))
    state.out.mkdir(parents=True, exist_ok=True)
    before = next(iter(state.handle.regularizers.values())).coefficients().clone()
    with pytest.raises(RunInterrupted):
        state.train(progress=False, stop_after=state.phases.sparse_end + 1)
    assert state.phases.at(state.progress.step)[0] == "lottery"
    return state, before


def test_lottery_reinitialises_keeps_masks_and_reapplies_the_penalty_with_the_same_c(tmp_path):
    state, before = _into_lottery(tmp_path)
    try:
        assert state.preset.lottery_penalty and state.lottery_embedding == "reuse"
        regularizer = next(iter(state.handle.regularizers.values()))
        assert torch.equal(regularizer.coefficients(), before)
        penalty = float(state.penalty().detach())
        assert penalty > 0
        batch = state.task.train_batch(0, torch.Generator().manual_seed(5))
        task_loss = float(state.task.loss(state.model, batch)[0].detach())
        state.task.train_batch = lambda step, generator: batch
        total, _ = state.train_step("lottery", 0)
        assert total == pytest.approx(task_loss + penalty, rel=1e-5)
        pruned = ~state.handle.masks["i2h.weight"]
        assert bool(pruned.any()) and bool(state.model.get_parameter("i2h.weight")[pruned].eq(0).all())
    finally:
        state.handle.remove()


def test_lottery_can_redraw_the_embedding(tmp_path):
    state, before = _into_lottery(tmp_path, lottery_embedding="redraw")
    try:
        assert not torch.equal(next(iter(state.handle.regularizers.values())).coefficients(), before)
        assert float(state.penalty().detach()) > 0
    finally:
        state.handle.remove()


def test_lottery_without_penalty_trains_the_task_loss_alone(tmp_path):
    state, _ = _into_lottery(tmp_path, preset="legacy-test", steps=12)
    try:
        assert not state.preset.lottery_penalty
        batch = state.task.train_batch(0, torch.Generator().manual_seed(5))
        task_loss = float(state.task.loss(state.model, batch)[0].detach())
        state.task.train_batch = lambda step, generator: batch
        assert state.train_step("lottery", 0)[0] == pytest.approx(task_loss, rel=1e-6)
    finally:
        state.handle.remove()


def test_language_model_lottery_redraws_c_as_the_authors(tmp_path):
    assert get_task("language_model").get_preset("paper").lottery_embedding == "redraw"
    assert get_task("adding").get_preset("paper").lottery_embedding == "reuse"


# -- dense baseline and the metric ----------------------------------------------------------
def test_dense_baseline_run_stays_at_sparsity_0(tmp_path):
    summary = run(_config(tmp_path, sparsity=0.0, regularizer="none"), progress=False)
    assert summary["sparse_sparsity"] == 0.0 and summary["dense_sparsity"] == 0.0


def test_summary_metric_is_the_mean_of_the_last_5_percent_of_evaluations(tmp_path):
    config = _config(tmp_path, lottery=True)
    summary = run(config, progress=False)
    valid = [r for r in _records(config) if r["kind"] == "valid"]
    sparse = [r["metric"] for r in valid if r["phase"] != "lottery"]
    lottery = [r["metric"] for r in valid if r["phase"] == "lottery"]
    assert len(sparse) == 6 and len(lottery) == 3  # one evaluation per epoch
    assert summary["sparse_tail_metric"] == pytest.approx(tail_mean(sparse, 0.05)) == pytest.approx(sparse[-1])
    assert summary["lottery_tail_metric"] == pytest.approx(lottery[-1])
    assert tail_mean(list(range(100)), 0.05) == pytest.approx(sum(range(95, 100)) / 5)


def test_adding_paper_lr_preset_differs_from_paper_in_the_learning_rate_alone():
    presets = get_task("adding").presets
    paper, fast = presets["paper"].to_dict(), presets["paper-lr1e-3"].to_dict()
    assert {k for k in paper if paper[k] != fast[k]} == {"lr"}
    assert (paper["lr"], fast["lr"]) == (1e-4, 1e-3)
