"""`reproduce`: the plan's order and cells, reuse/resume/conflict rules, and the report on partial results."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from moduli_transform.tasks.reproduce import execute, plan, run_status
from moduli_transform.tasks.reproduction import cell, collect, render
from moduli_transform.tasks.runner import RunInterrupted, run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_plan_covers_the_grid_once_with_dense_baselines_and_three_seeds_first(tmp_path):
    plans = plan("adding", "test", seeds=5, runs=tmp_path)
    cells = {(c.regularizer, c.sparsity, c.seed) for c in plans}
    assert len(plans) == len(cells) == 5 * (5 * 3 + 5)  # 5 controls x (3 sparsities + dense) x 5 seeds
    assert {(r, s) for r, s, _ in cells if s == 0.0} == {(r, 0.0) for r in ("moduli", "l1", "l1-mean", "shuffled",
                                                                               "none")}
    # The paper's 90% level for the four controls, seeds 0-2, comes first, seed-major.
    first = plans[:12]
    assert [c.seed for c in first] == [0] * 4 + [1] * 4 + [2] * 4
    assert {(c.regularizer, c.sparsity) for c in first} == {(r, 0.9) for r in ("moduli", "l1", "shuffled", "none")}
    assert {(c.regularizer, c.sparsity) for c in plans[12:18]} == {("none", 0.0), ("l1-mean", 0.9)}
    assert all(c.threads == 1 and not c.lottery for c in plans)
    # l1-mean at 95% is the first cell dropped: it comes last.
    assert (plans[-1].regularizer, plans[-1].sparsity) == ("l1-mean", 0.95)


def test_plan_rejects_unknown_tasks():
    with pytest.raises(ValueError, match="no reproduction grid for task 'adder'; expected one of adding"):
        plan("adder", "test")


def test_runs_are_reused_resumed_or_left_alone(tmp_path, capsys):
    finished, partial, foreign = plan("adding", "test", seeds=1, runs=tmp_path)[:3]
    assert run_status(finished) == "new"
    run(finished, progress=False)
    assert run_status(finished) == "finished"
    with pytest.raises(RunInterrupted):
        run(partial, progress=False, stop_after=5)
    assert run_status(partial) == "partial"
    # A folder recording another run (here: another sparsity) is never overwritten.
    run(replace(foreign, sparsity=0.3), progress=False)
    before = (Path(foreign.out) / "summary.json").read_text()
    assert run_status(foreign) == "conflict"
    finished_summary = json.loads((Path(finished.out) / "summary.json").read_text())

    results = execute([finished, partial, foreign])
    assert results[finished.out] == finished_summary  # reused as it was
    assert results[foreign.out] == "conflict"
    assert (Path(foreign.out) / "summary.json").read_text() == before
    assert "left alone" in capsys.readouterr().err
    # The resumed run ends as an uninterrupted one would.
    whole = run(replace(partial, out=str(tmp_path / "whole")), progress=False)
    assert results[partial.out]["sparse_tail_metric"] == whole["sparse_tail_metric"]
    assert run_status(partial) == "finished"


def test_a_changed_preset_makes_a_finished_run_a_conflict(tmp_path, monkeypatch):
    from moduli_transform.tasks import adding

    config = plan("adding", "test", seeds=1, runs=tmp_path)[0]
    run(config, progress=False)
    monkeypatch.setitem(adding.PRESETS, "test", replace(adding.PRESETS["test"], lr=0.5))
    assert run_status(config) == "conflict"


def test_report_on_partial_results_marks_missing_cells_and_counts_learned_seeds(tmp_path):
    runs = tmp_path / "runs"
    configs = plan("adding", "test", seeds=2, runs=runs)
    for config in configs[:2]:
        run(config, progress=False)
    records = collect(runs)
    assert len(records) == 2
    text = render(runs, ["adding"])
    assert "not run" in text and "## adding" in text and "not transcribed" in text.lower()
    ours = text.split("### Ours, `test` preset")[1]
    row = [line for line in ours.splitlines() if line.startswith("| 90% |")][0]
    values = [r["sparse_tail_metric"] for r in records if r["regularizer"] == "moduli"]
    assert row.split(" | ")[1] == cell(values, 0.1, False)  # the moduli column: its one finished seed
    assert "### Ours, `cpu` preset" in text  # presets without runs are listed as not run
    assert cell([0.05, 0.2, 0.09], 0.1, False).endswith(" 2/3")
    assert cell([31.0, 12.0], 30.0, False).endswith(" 1/2")


def test_report_puts_the_authors_saved_navigation_tables_beside_ours_and_counts_each_seed_once(tmp_path):
    runs = tmp_path / "runs"
    with_ticket = plan("navigation", "test", seeds=1, runs=runs, lottery=True)[0]
    without = plan("navigation", "test", seeds=1, runs=runs)[0]
    first, second = run(with_ticket, progress=False), run(without, progress=False)
    assert first["sparse_tail_metric"] == second["sparse_tail_metric"]  # the lottery runs after the sparse phase
    text = render(runs, ["navigation"])
    authors = text.split("### The authors' numbers")[1].split("### Ours")[0]
    assert "| 90% | 5.69 | 86.7 | 10.9 | 71.8 |" in authors  # the paper's Table 1 row
    assert "| 90% | 6.29 (1.17) | 72.96 (20.30) | 9.66 (0.30) | 78.64 (12.64) |" in authors  # their notebook
    assert "| 90% | 6.29 (1.17) | 25.95 (33.92) | 69.12 (12.06) | 5.89 (0.58) | 14.52 (5.84) |" in authors
    sparse = text.split("### Ours, `test` preset, sparse")[1].split("###")[0]
    row = [line for line in sparse.splitlines() if line.startswith("| 90% |")][0]
    assert row.split(" | ")[1].startswith(cell([first["sparse_tail_metric"]], 30.0, False))  # one seed, not two
    assert row.split(" | ")[1].endswith("/1")
    lottery = text.split("### Ours, `test` preset, lottery")[1].split("###")[0]
    assert [line for line in lottery.splitlines() if line.startswith("| 90% |")][0].split(" | ")[1].endswith("/1")


def test_reproduce_command_errors_are_one_line_with_status_2(tmp_path, capsys):
    from moduli_transform.cli import main

    assert main(["reproduce", "--tasks", "adder", "--runs", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "moduli-transform reproduce: error: unknown task 'adder'; expected one of adding, navigation, " \
                    "language_model"
    assert main(["reproduce", "--preset", "huge", "--runs", str(tmp_path)]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err


def test_report_only_writes_the_report_atomically(tmp_path):
    from moduli_transform.cli import main

    report = tmp_path / "docs" / "REPRODUCTION.md"
    assert main(["reproduce", "--report-only", "--runs", str(tmp_path / "none"), "--report", str(report)]) == 0
    text = report.read_text()
    assert text.startswith("# Reproduction of arXiv 2406.06290")
    assert "all zeros" in text and list(report.parent.iterdir()) == [report]


def test_report_never_replaces_a_file_it_did_not_write(tmp_path, capsys):
    from moduli_transform.cli import main

    runs = tmp_path / "runs"
    assert main(["reproduce", "--report-only", "--runs", str(runs)]) == 0
    default = runs / "REPRODUCTION.md"  # the default report lives beside the runs it reports
    assert default.read_text().startswith("# Reproduction of arXiv 2406.06290")
    assert main(["reproduce", "--report-only", "--runs", str(runs)]) == 0  # an earlier report is replaced
    notes = tmp_path / "NOTES.md"
    notes.write_text("# my notes\n")
    capsys.readouterr()
    assert main(["reproduce", "--report-only", "--runs", str(runs), "--report", str(notes)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(notes) in error and "--report" in error
    assert notes.read_text() == "# my notes\n"


def _fake_run(runs: Path, preset: str, regularizer: str, sparsity: float, seed: int, metric: float) -> None:
    """A finished navigation run as `collect` reads it (summary.json + config.json)."""
    folder = runs / f"navigation-{preset}" / f"{regularizer}-s{sparsity:g}-seed{seed}"
    folder.mkdir(parents=True)
    summary = {"task": "navigation", "preset": preset, "regularizer": regularizer, "sparsity": sparsity,
               "seed": seed, "sparse_tail_metric": metric, "lottery_tail_metric": None, "wall_time_s": 60.0}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.json").write_text(json.dumps({"run": {"lottery": False}}))


def test_a_preset_differing_only_in_what_is_pruned_shows_the_dense_runs_it_shares(tmp_path):
    from moduli_transform.tasks.reproduction import dense_source

    # cpu-recurrent is the cpu preset with another pruning scope: nothing is pruned at sparsity 0.
    assert dense_source("navigation", "cpu-recurrent", ["paper", "cpu"]) == "cpu"
    assert dense_source("navigation", "cpu-recurrent", ["paper"]) is None  # paper trains differently
    assert dense_source("navigation", "cpu", ["cpu", "cpu-recurrent"]) == "cpu"  # its own first
    runs = tmp_path / "runs"
    for seed, metric in enumerate((10.0, 12.0)):
        _fake_run(runs, "cpu", "none", 0.0, seed, metric)
    for seed, metric in enumerate((20.0, 22.0)):
        _fake_run(runs, "cpu-recurrent", "moduli", 0.9, seed, metric)
        _fake_run(runs, "cpu-recurrent", "none", 0.9, seed, metric + 40)
    text = render(runs, ["navigation"])
    recurrent = text.split("### Ours, `cpu-recurrent` preset, sparse")[1].split("###")[0]
    dense_row = [line for line in recurrent.splitlines() if line.startswith("| Dense")][0]
    assert dense_row.startswith("| Dense (the `cpu` runs: the same training, nothing pruned) |")
    assert dense_row.split(" | ")[-1] == cell([10.0, 12.0], 30.0, False) + " |"  # the none column
    statement = [line for line in recurrent.splitlines() if line.startswith("* 90%")][0]
    assert "The dense model (none at sparsity 0, 2 seeds) scores 11; the best pruned control, moduli, is 10 worse." \
        in statement
    own = text.split("### Ours, `cpu` preset, sparse")[1].split("###")[0]
    assert [line for line in own.splitlines() if line.startswith("| Dense")][0].startswith("| Dense | ")
