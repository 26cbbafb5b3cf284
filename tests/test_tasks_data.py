"""Data of the three tasks: trajectories, place cells, corpora, adding problem (CPU, seeded)."""

from __future__ import annotations

import math

import pytest
import torch

from moduli_transform.tasks import TASKS, UnknownTaskError, get_task
from moduli_transform.tasks.adding import AddingTask, adding_batch
from moduli_transform.tasks.language_model import CorpusError, LanguageModelTask, load_corpus, read_splits
from moduli_transform.tasks.navigation import ARENA, NavigationTask, PlaceCells, random_walk


pytestmark = pytest.mark.usefixtures("one_thread")


# -- navigation -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def walk():
    return random_walk(256, 200, torch.Generator().manual_seed(0))


def test_trajectory_stays_in_arena(walk):
    assert walk.positions.abs().max() <= ARENA / 2
    assert walk.start.abs().max() <= ARENA / 2
    # The walk actually explores: it is not stuck at a wall.
    assert walk.positions.abs().max() > 0.9 * ARENA / 2


def test_velocities_integrate_to_positions(walk):
    integrated = walk.start[:, None] + walk.velocities.cumsum(dim=1)
    assert torch.allclose(integrated, walk.positions, atol=1e-5)


def test_speeds_are_rat_like(walk):
    speed = walk.velocities.norm(dim=-1) / 0.02  # m/s
    assert 0.5 < float(speed.mean()) < 1.5  # Rayleigh(0.82) has mean ~1.0; slower near walls


def test_random_walk_is_seeded():
    first = random_walk(4, 10, torch.Generator().manual_seed(3))
    second = random_walk(4, 10, torch.Generator().manual_seed(3))
    assert torch.equal(first.positions, second.positions)


def test_place_cell_code_sums_to_one_and_is_nonnegative(walk):
    cells = PlaceCells(64, generator=torch.Generator().manual_seed(1))
    code = cells.activation(walk.positions[:8])
    assert torch.allclose(code.sum(-1), torch.ones(8, 200), atol=1e-5)
    assert float(code.min()) >= 0.0


def test_decoding_the_true_code_is_nearly_exact():
    task = NavigationTask(NavigationTask.presets["test"])
    cells = PlaceCells(512, generator=torch.Generator().manual_seed(2))
    positions = random_walk(64, 20, torch.Generator().manual_seed(4)).positions
    error_cm = 100 * (cells.decode(cells.activation(positions)) - positions).norm(dim=-1).mean()
    # Exactly zero would need a cell on every position; ~cell spacing (2.2 m / sqrt(512) ~ 10 cm) / 2.
    assert float(error_cm) < 8.0
    assert task.metric_name == "decoding_error_cm" and not task.higher_is_better


def test_navigation_batch_shapes_and_loss():
    task = NavigationTask(NavigationTask.presets["test"])
    preset = task.preset
    velocities, start_code, codes, positions = task.train_batch(0, torch.Generator().manual_seed(0))
    assert velocities.shape == (preset.batch_size, preset.sequence_length, 2)
    assert start_code.shape == (preset.batch_size, preset.place_cells)
    assert codes.shape == (preset.batch_size, preset.sequence_length, preset.place_cells)
    torch.manual_seed(0)
    model = task.build_model()
    loss, error = task.loss(model, (velocities, start_code, codes, positions))
    assert loss.requires_grad and math.isfinite(float(loss.detach()))
    # The batch's error is computed when asked for (on logged steps), from the same logits.
    with torch.no_grad():
        expected = task._error_cm(model(velocities, start_code), positions)
    assert callable(error) and error() == pytest.approx(expected) and expected > 0


# -- language model ---------------------------------------------------------------------
def _write_lines(path, count: int) -> list[str]:
    lines = [f"line {i} says word{i % 7} and word{i % 3}" for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return lines


def test_single_file_split_is_90_5_5_by_lines_and_deterministic(tmp_path):
    lines = _write_lines(tmp_path / "corpus.txt", 200)
    splits = read_splits(tmp_path / "corpus.txt")
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [180, 10, 10]
    assert splits["test"][0][:2] == ["line", "190"] and splits["train"][-1][:2] == ["line", "179"]
    assert splits == read_splits(tmp_path / "corpus.txt")
    assert all(line[-1] == "<eos>" for line in splits["valid"])
    assert len(lines) == 200


@pytest.mark.parametrize("names", [("train.txt", "valid.txt", "test.txt"),
                                   ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")])
def test_directory_layouts(tmp_path, names):
    for name, text in zip(names, ("a b c\nb c\n", "a <unk> c\n", "c b a zzz\n")):
        (tmp_path / name).write_text(text)
    corpus = load_corpus(tmp_path)
    assert corpus.ids["train"].numel() == 7  # 5 words + 2 <eos>
    unknown = corpus.vocabulary.index("<unk>")
    assert int(corpus.ids["test"][3]) == unknown  # "zzz" is not in the training vocabulary


def test_vocabulary_cap_maps_rare_words_to_unk(tmp_path):
    _write_lines(tmp_path / "corpus.txt", 100)
    corpus = load_corpus(tmp_path / "corpus.txt", max_vocabulary=10)
    assert len(corpus.vocabulary) == 10 and corpus.vocabulary[-1] == "<unk>"
    assert int(corpus.ids["train"].max()) < 10


def test_missing_corpus_says_what_to_do(tmp_path):
    with pytest.raises(CorpusError, match="--data"):
        read_splits(tmp_path)
    with pytest.raises(CorpusError, match="MODULI_DATA"):
        LanguageModelTask(LanguageModelTask.presets["test"], data=str(tmp_path / "absent.txt"))


def test_built_in_corpus_is_the_generated_fables_and_the_default_data(monkeypatch):
    from moduli_transform.tasks.corpus import FABLES_PATH, generate_fables
    from moduli_transform.tasks.language_model import default_corpus_path

    monkeypatch.delenv("MODULI_DATA", raising=False)
    assert default_corpus_path() == FABLES_PATH
    text = FABLES_PATH.read_text(encoding="utf-8")
    assert text == generate_fables()  # the shipped file is exactly what the generator writes
    assert 100_000 < len(text.encode()) < 400_000
    task = LanguageModelTask(LanguageModelTask.presets["cpu"])
    assert task.corpus.path == str(FABLES_PATH) and 300 < len(task.corpus.vocabulary) < 1000
    assert task.epoch_steps() == task.windows > 10


def test_language_model_init_range_is_the_authors(tmp_path):
    _write_lines(tmp_path / "corpus.txt", 100)
    task = LanguageModelTask(LanguageModelTask.presets["test"], data=str(tmp_path / "corpus.txt"))
    model = task.build_model()
    for weight in (model.embedding.weight, model.decoder.weight):
        assert float(weight.detach().abs().max()) <= 0.1
    assert bool(model.decoder.bias.eq(0).all())
    assert model.rnn.dropout == 0.0


def test_language_model_task_trains_on_a_tiny_corpus(tmp_path):
    _write_lines(tmp_path / "corpus.txt", 400)
    task = LanguageModelTask(LanguageModelTask.presets["test"], data=str(tmp_path / "corpus.txt"))
    torch.manual_seed(0)
    model = task.build_model()
    inputs, targets, first = task.train_batch(0, torch.Generator())
    assert first and torch.equal(inputs[:, 1:], targets[:, :-1])
    loss, perplexity = task.loss(model, (inputs, targets, first))
    assert math.isclose(perplexity, math.exp(float(loss.detach())), rel_tol=1e-5)
    assert 1.0 < task.evaluate(model, "test") < 10 * len(task.corpus.vocabulary)


# -- adding problem ---------------------------------------------------------------------
@pytest.mark.parametrize("markers", ["anywhere", "halves"])
def test_adding_targets_are_the_sum_of_the_marked_values(markers):
    inputs, targets = adding_batch(4096, 30, torch.Generator().manual_seed(0), markers)
    marks = inputs[..., 1]
    assert torch.equal(marks.sum(1), torch.full((4096,), 2.0))  # two distinct positions
    assert torch.allclose((inputs[..., 0] * marks).sum(1), targets)
    first_half = marks[:, :15].sum(1)
    if markers == "halves":
        assert torch.equal(first_half, torch.ones(4096))
    else:  # the authors': both marks in the first half with probability 14/58
        assert abs(float((first_half == 2).float().mean()) - 14 / 58) < 0.03
        assert bool(marks.sum(0).min() > 0)  # every position gets marked


def test_adding_batch_rejects_unknown_markers():
    with pytest.raises(ValueError, match="unknown markers 'middle'; expected one of anywhere, halves"):
        adding_batch(2, 10, torch.Generator(), "middle")


def test_predicting_one_scores_rmse_near_0_41():
    _, targets = adding_batch(100_000, 10, torch.Generator().manual_seed(1))
    rmse = float(torch.sqrt(((targets - 1.0) ** 2).mean()))
    assert abs(rmse - math.sqrt(1 / 6)) < 0.005


def test_adding_task_evaluates_untrained_model():
    task = AddingTask(AddingTask.presets["test"])
    torch.manual_seed(0)
    assert 0.0 < task.evaluate(task.build_model(), "valid") < 5.0


# -- registry ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_has_test_cpu_and_paper_presets(name):
    assert {"test", "cpu", "paper"} <= set(get_task(name).presets)


def test_unknown_names_list_the_choices():
    with pytest.raises(UnknownTaskError, match="adding, language_model, navigation"):
        get_task("addition")
    with pytest.raises(UnknownTaskError, match="test, cpu, paper"):
        get_task("adding").get_preset("gpu")


def test_navigation_paper_preset_has_the_papers_sizes():
    preset = get_task("navigation").presets["paper"]
    assert (preset.place_cells, preset.grid_cells, preset.batch_size, preset.sequence_length) == (512, 4096, 200, 50)
    assert (preset.lr, preset.strength) == (1e-4, 0.1)


def test_place_cell_activation_equals_the_direct_formula():
    from moduli_transform.tasks.navigation import PlaceCells, random_walk

    cells = PlaceCells(64, generator=torch.Generator().manual_seed(0))
    positions = random_walk(4, 7, torch.Generator().manual_seed(1)).positions
    squared = ((positions[..., None, :] - cells.centres) ** 2).sum(-1)
    code = (torch.softmax(-squared / (2 * cells.width ** 2), -1)
            - torch.softmax(-squared / (2 * cells.surround_scale * cells.width ** 2), -1))
    code = code - code.min(-1, keepdim=True).values
    assert torch.allclose(cells.activation(positions), code / code.sum(-1, keepdim=True), atol=1e-6)
