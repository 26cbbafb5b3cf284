"""Table sweeps: planning, skip-finished execution, aggregation, the paper's layout."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from dataclasses import replace

from moduli_transform.tasks.checkpoint import list_checkpoints
from moduli_transform.tasks.figures import persistence_diagram
from moduli_transform.tasks.run_folder import RunFolderError
from moduli_transform.tasks.runner import RunInterrupted, run
from moduli_transform.tasks.table import aggregate, execute, format_markdown, plan_runs, run_table


def test_plan_covers_the_grid_and_names_runs_deterministically(tmp_path):
    plans = plan_runs("adding", "test", "all", 3, [0.9, 0.99], tmp_path)
    variants = {variant for variant, _ in plans}
    assert variants == {"moduli", "none", "l1", "l1-mean", "shuffled", "torus", "circle", "sphere", "klein", "torus6",
                        "torus-fixed", "torus-trained", "r3-fixed", "r3-trained"}
    assert len({config.out for _, config in plans}) == len(plans)
    assert all(config.lottery == (config.sparsity > 0) for _, config in plans)
    trained = [c for v, c in plans if v == "r3-trained"]
    assert {(c.manifold, c.embedding) for c in trained} == {("r3", "trained")} and len(trained) == 6 + 3
    # The dense baseline: one separate sparsity-0 run per variant and seed.
    assert sorted(c.seed for v, c in plans if v == "l1-mean" and c.sparsity == 0.0) == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown grid 'control'; expected one of controls, manifolds"):
        plan_runs("adding", "test", "control", 1, [0.9], tmp_path)


def test_aggregate_gives_mean_and_std_in_the_paper_layout(tmp_path):
    plans = plan_runs("adding", "test", "controls", 2, [0.9], tmp_path)
    results = []
    for index, (variant, config) in enumerate(plans):
        dense = config.sparsity == 0.0
        results.append({"dense_metric": 9.0, "sparse_metric": 8.0, "sparse_tail_metric":
                        (0.05 if dense else 0.1) * (config.seed + 1), "lottery_tail_metric": None if dense else 2.0})
    rows = aggregate(plans, results)
    sparse = {r["variant"]: r for r in rows if r["kind"] == "sparse"}
    assert sparse["moduli"]["mean"] == pytest.approx(0.15)  # the last-5% metric, not the end point
    assert sparse["moduli"]["std"] == pytest.approx(math.sqrt(0.005))
    table = format_markdown(rows, "rmse", threshold=0.15).splitlines()
    assert table[0] == "| rmse | moduli | none | l1 | l1-mean | shuffled |"
    # Dense: the sparsity-0 runs alone, each seed's value once (not the dense phase of the pruned runs).
    assert table[2].startswith("| Dense | 0.075 (0.035) 2/2 |")
    assert table[3].startswith("| 90% Sparse | 0.15 (0.071) 1/2 |")
    assert table[4].startswith("| 90% Lottery | 2 (0) 0/2 |")


def test_execute_reuses_finished_runs_and_refuses_a_foreign_one(tmp_path):
    plans = plan_runs("adding", "test", "controls", 1, [0.5], tmp_path, steps=6)
    configs = [config for _, config in plans]
    fake = {"dense_metric": 7.0, "sparse_metric": 7.0}
    for config, recorded_steps in ((configs[0], 6), (configs[1], 9)):
        finished = Path(config.out)
        finished.mkdir(parents=True)
        recorded = {**config.to_dict(), "steps": recorded_steps, "threads": 3}  # threads may differ
        (finished / "config.json").write_text(json.dumps({"run": recorded}))
        (finished / "summary.json").write_text(json.dumps(fake))
    foreign = {p.name: p.read_text() for p in Path(configs[1].out).iterdir()}
    with pytest.raises(RunFolderError, match=r"moduli-dense-seed0 holds another run \(other steps\); it is never "
                                             r"replaced: move it away"):
        execute(configs[1:], jobs=1)
    assert {p.name: p.read_text() for p in Path(configs[1].out).iterdir()} == foreign
    assert not any(Path(c.out).exists() for c in configs[2:])  # refused before any run started
    Path(configs[1].out, "config.json").unlink()  # no readable settings: still another run
    with pytest.raises(RunFolderError, match="config.json is missing or unreadable"):
        execute(configs, jobs=1)

    Path(configs[1].out, "summary.json").unlink()
    Path(configs[1].out).rmdir()
    results = execute(configs, jobs=1)
    assert results[0] == fake  # same config: reused, not retrained
    for config, result in zip(configs[1:], results[1:]):
        assert json.loads((Path(config.out) / "summary.json").read_text()) == result
        assert result["sparsity"] == config.sparsity


def test_execute_continues_a_partial_run_with_its_settings(tmp_path):
    plans = plan_runs("adding", "test", "controls", 1, [0.5], tmp_path / "table", steps=9)
    config = plans[0][1]
    with pytest.raises(RunInterrupted):  # as a sweep with --jobs 2 (one thread per run) killed mid-run
        run(replace(config, threads=1), progress=False, stop_after=7)
    assert list_checkpoints(Path(config.out) / "checkpoints")
    [result] = execute([config], jobs=1)
    whole = run(replace(config, threads=1, out=str(tmp_path / "whole")), progress=False)
    recorded = json.loads((Path(config.out) / "config.json").read_text())["run"]
    assert recorded["resume"] is True and recorded["threads"] == 1
    for key in ("dense_metric", "sparse_metric", "lottery_metric", "steps"):
        assert result[key] == whole[key]


def test_run_table_writes_markdown_and_csv(tmp_path):
    args = argparse.Namespace(task="adding", preset="test", grid="controls", seeds=1, sparsities=[0.5], steps=6,
                              data=None, out=str(tmp_path), jobs=1, backend="local", address=None)
    assert run_table(args) == 0
    markdown = (tmp_path / "adding-controls.md").read_text().splitlines()
    assert markdown[0] == "| rmse | moduli | none | l1 | l1-mean | shuffled |" and len(markdown) == 5
    assert markdown[2].startswith("| Dense | ") and markdown[2].count("/1") == 5  # seeds-learned counts
    csv_lines = (tmp_path / "adding-controls.csv").read_text().splitlines()
    assert csv_lines[0] == "variant,sparsity,kind,mean,std,seeds,values" and len(csv_lines) == 1 + 5 * 3
    assert (tmp_path / "adding-controls-sparsity.png").stat().st_size > 1000


def test_persistence_of_a_circle_and_two_clusters():
    angles = torch.linspace(0, 2 * math.pi, 25)[:-1]
    circle = torch.stack([angles.cos(), angles.sin()], 1)
    h0, h1 = persistence_diagram(torch.cdist(circle, circle))
    assert len(h1) == 1 and h1[0, 1] - h1[0, 0] > 1.0
    assert sum(1 for birth, death in h0 if math.isinf(death)) == 1
    clusters = torch.cat([torch.zeros(5, 2), torch.full((5, 2), 3.0)]) + 0.01 * torch.arange(10.0)[:, None]
    h0, _ = persistence_diagram(torch.cdist(clusters, clusters))
    deaths = sorted(h0[:, 1])
    assert math.isinf(deaths[-1]) and deaths[-2] == pytest.approx(float(torch.cdist(clusters[4:5], clusters[5:6])), rel=1e-4)


def test_a_table_says_when_its_runs_finished_on_several_devices(tmp_path):
    from moduli_transform.tasks.table import devices_note, write_tables

    assert devices_note([{"device": "cpu"}, {"device": "cpu"}, "failed"]) == ""
    assert devices_note([{}]) == ""   # summaries written before the device was recorded: the CPU
    note = devices_note([{"device": "cuda:0"}, {}, {"device": "cpu"}])
    assert note.startswith("Runs finished on several devices: cpu (2), cuda (1);")
    assert devices_note([{"device": "cuda:0"}, {"device": "cuda:1"}]) == ""   # one machine's GPUs
    rows = [{"variant": "moduli", "sparsity": 0.0, "kind": "dense", "values": [0.5], "mean": 0.5, "std": 0.0}]
    markdown, _ = write_tables(rows, tmp_path, "t", "RMSE", note=note)
    assert markdown.read_text().rstrip().endswith(note)
    plain, _ = write_tables(rows, tmp_path / "plain", "t", "RMSE")
    assert "devices" not in plain.read_text()
