"""Runs: config validation, the run directory, resume bit-identity, learning (CPU, seeded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from moduli_transform.tasks.runner import METRIC_KEYS, SUMMARY_KEYS, Phases, RunConfig, RunConfigError, RunInterrupted, run


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, name: str = "run", **changes) -> RunConfig:
    options = dict(task="adding", preset="test", sparsity=0.5, lottery=True, seed=0, out=str(tmp_path / name),
                   threads=1)
    options.update(changes)
    return RunConfig(**options)


# -- config ---------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    RunConfig(task="adding"),
    RunConfig(task="navigation", preset="paper", manifold="sphere", regularizer="l1", embedding="trained",
              sparsity=0.0, lottery=True, seed=3, out="x", strength=0.5, steps=10, resume=True, data="d",
              checkpoint_every=5),
])
def test_run_config_round_trips_through_json(config):
    assert RunConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("changes, message", [
    ({"task": "adder"}, "unknown task 'adder'; expected one of adding"),
    ({"preset": "huge"}, "expected one of test, cpu, paper"),
    ({"regularizer": "l2"}, "moduli, l1, l1-mean, l1-matched, shuffled, none"),
    ({"embedding": "learned"}, "fixed, trained"),
    ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
    ({"seed": -1}, "seed"),
    ({"steps": 2}, "steps must be >= 3"),
    ({"strength": -0.1}, "strength"),
])
def test_run_config_rejects_bad_values(changes, message):
    with pytest.raises(RunConfigError, match=message):
        RunConfig(**{"task": "adding", **changes})


def test_run_config_rejects_unknown_keys():
    with pytest.raises(RunConfigError, match="unknown run config keys"):
        RunConfig.from_dict({"task": "adding", "sparsty": 0.9})


def test_phases_cover_every_step():
    phases = Phases.plan(10, 0.4, 0.4, lottery=10)
    assert (phases.dense, phases.prune, phases.finetune, phases.total) == (4, 4, 2, 20)
    assert [phases.at(s)[0] for s in (0, 3, 4, 8, 9, 10, 19)] == \
        ["dense", "dense", "prune", "finetune", "finetune", "lottery", "lottery"]
    assert Phases.plan(3, 0.4, 0.4, 0).finetune == 1


# -- run directory ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    config = _config(tmp_path_factory.mktemp("runs"))
    return config, run(config, progress=False)


def test_run_writes_all_files_with_the_documented_keys(finished):
    config, summary = finished
    out = __import__("pathlib").Path(config.out)
    assert set(SUMMARY_KEYS) <= set(summary)
    assert json.loads((out / "summary.json").read_text()) == summary
    resolved = json.loads((out / "config.json").read_text())
    assert RunConfig.from_dict(resolved["run"]) == config
    assert {"preset", "phases", "moduli"} <= set(resolved)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(set(METRIC_KEYS) == set(r) for r in records)
    assert {r["phase"] for r in records} == {"dense", "prune", "finetune", "lottery"}
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    tensors = load_file(str(out / "weights.safetensors"))
    masks = {k: v for k, v in tensors.items() if k.startswith("mask/")}
    # The authors' scope: i2h (input columns too) and h2o, pruned globally.
    assert set(masks) == {"mask/i2h.weight", "mask/h2o.weight"}
    for name in ("i2h.weight", "h2o.weight"):
        assert torch.equal(tensors[name] * ~masks[f"mask/{name}"], torch.zeros_like(tensors[name]))


def test_run_summary_values(finished):
    config, summary = finished
    assert summary["steps"] == (4 + 12 + 8) + 12 and summary["metric_name"] == "rmse" and summary["higher_is_better"] is False
    for key in ("dense_metric", "sparse_metric", "lottery_metric"):
        assert isinstance(summary[key], float) and summary[key] > 0
    # Read after epoch 0, once the handle has pruned to epoch 1's target (0.5 * 1/3 of 130*16 + 16 weights).
    assert abs(summary["dense_sparsity"] - 0.5 / 3) < 0.01
    assert abs(summary["sparse_sparsity"] - 0.5) < 0.01 and abs(summary["lottery_sparsity"] - 0.5) < 0.01
    assert 0.0 < summary["data_time_fraction"] < 1.0 and summary["wall_time_s"] > 0


# -- resume -----------------------------------------------------------------------------
@pytest.mark.parametrize("task, stop_after", [("adding", 27), ("navigation", 21), ("language_model", 37)])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, task, stop_after):
    """Stop mid-run (between checkpoints, in a different phase per task), resume, compare."""
    data = None
    if task == "language_model":
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("\n".join(f"the cat {i % 5} sat on mat {i % 11}" for i in range(300)) + "\n")
        data = str(corpus)
    options = dict(task=task, data=data, regularizer="moduli", embedding="trained")
    whole = run(_config(tmp_path, "whole", **options), progress=False)
    interrupted = _config(tmp_path, "interrupted", **options)
    with pytest.raises(RunInterrupted):
        run(interrupted, progress=False, stop_after=stop_after)
    resumed = run(RunConfig.from_dict({**interrupted.to_dict(), "resume": True}), progress=False)
    first = load_file(str(tmp_path / "whole" / "weights.safetensors"))
    second = load_file(str(tmp_path / "interrupted" / "weights.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    for key in ("dense_metric", "sparse_metric", "lottery_metric", "steps"):
        assert whole[key] == resumed[key]
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "interrupted" / "metrics.jsonl").read_text()


def test_resume_refuses_other_settings(tmp_path):
    config = _config(tmp_path, lottery=False)
    with pytest.raises(RunInterrupted):
        run(config, progress=False, stop_after=10)
    with pytest.raises(RunConfigError, match="sparsity"):
        run(RunConfig.from_dict({**config.to_dict(), "resume": True, "sparsity": 0.8}), progress=False)


def test_run_never_clears_a_run_folder_it_did_not_make(tmp_path):
    from moduli_transform.tasks.run_folder import RunFolderError

    config = _config(tmp_path, lottery=False)
    first = run(config, progress=False)
    out = tmp_path / "run"
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert any(p.parts[0] == "checkpoints" for p in before)
    for again in (config, RunConfig.from_dict({**config.to_dict(), "seed": 1})):  # the same settings too
        with pytest.raises(RunFolderError, match=r"already holds a run; pass --resume .* --overwrite"):
            run(again, progress=False)
    with pytest.raises(RunConfigError, match=r"cannot resume .*other settings \(seed\)"):
        run(RunConfig.from_dict({**config.to_dict(), "seed": 1, "resume": True}), progress=False)
    with pytest.raises(RunFolderError, match="contradict"):
        run(RunConfig.from_dict({**config.to_dict(), "resume": True}), progress=False, overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    second = run(RunConfig.from_dict({**config.to_dict(), "seed": 1}), progress=False, overwrite=True)
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1  # the old run moved aside, every file kept
    assert {p.relative_to(moved[0]): p.read_bytes() for p in moved[0].rglob("*") if p.is_file()} == before
    assert second["seed"] == 1 and first["seed"] == 0
    assert json.loads((out / "summary.json").read_text())["seed"] == 1


HOLD_LOCK = """
import sys, time
from moduli_transform.tasks.run_folder import lock_run_folder
with lock_run_folder(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_run_folder_another_process_trains_is_neither_resumed_nor_moved(tmp_path):
    from moduli_transform.tasks.run_folder import RunFolderError

    config = _config(tmp_path, lottery=False)
    with pytest.raises(RunInterrupted):
        run(config, progress=False, stop_after=10)
    out = tmp_path / "run"
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        refused = rf"{out} is being trained by another process \(pid {holder.pid}\); .* such as {out}-2"
        with pytest.raises(RunFolderError, match=refused):
            run(RunConfig.from_dict({**config.to_dict(), "resume": True}), progress=False)
        with pytest.raises(RunFolderError, match=refused):
            run(RunConfig.from_dict({**config.to_dict(), "seed": 1}), progress=False, overwrite=True)
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]   # nothing moved aside
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and p.name != ".lock"} == before
    # the holder gone (killed: its lock went with it), the run resumes
    resumed = run(RunConfig.from_dict({**config.to_dict(), "resume": True}), progress=False)
    assert resumed["steps"] > 10 and (out / "summary.json").exists()


def test_run_folder_lock_is_exclusive_and_released(tmp_path):
    from moduli_transform.tasks.run_folder import RunFolderError, lock_run_folder

    with lock_run_folder(tmp_path / "r") as folder:
        assert (folder / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunFolderError, match=rf"pid {os.getpid()}"):
            with lock_run_folder(tmp_path / "r"):
                pass
    with lock_run_folder(tmp_path / "r"):   # released: taken again
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        with lock_run_folder(tmp_path / "file"):
            pass


def test_run_into_an_empty_folder_and_resume_without_checkpoint(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(_config(tmp_path, "empty", lottery=False), progress=False)["steps"] > 0
    fresh = run(_config(tmp_path, "fresh", lottery=False, resume=True), progress="log")
    assert json.loads((tmp_path / "fresh" / "summary.json").read_text()) == fresh
    err = capsys.readouterr().err
    assert f"adding/moduli: step {fresh['steps']}/{fresh['steps']} (100%)" in err  # the log fallback under pytest
    with pytest.raises(ValueError, match="unknown progress mode 'loud'"):
        run(_config(tmp_path, "loud"), progress="loud")
    assert not (tmp_path / "loud").exists()


# -- learning ---------------------------------------------------------------------------
@pytest.mark.slow
def test_adding_problem_learns(tmp_path):
    """A short dense run beats the 'always predict 1' baseline (RMSE 0.41) clearly."""
    config = RunConfig(task="adding", preset="legacy-test", regularizer="none", sparsity=0.0, steps=600, seed=0,
                       out=str(tmp_path / "learn"), checkpoint_every=10_000, threads=1)
    summary = run(config, progress=False)
    assert summary["sparse_metric"] < 0.25


# -- command line -----------------------------------------------------------------------
def test_train_command_parses_into_a_run_config(tmp_path):
    import argparse

    from moduli_transform.tasks.cli import config_from_args, register_table, register_train

    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    register_train(subparsers)
    register_table(subparsers)
    args = parser.parse_args(["train", "navigation", "--preset", "test", "--manifold", "sphere", "--inhibitor",
                              "ricker", "--regularizer", "l1", "--embedding", "trained", "--sparsity", "0.8",
                              "--lottery", "--seed", "2", "--out", str(tmp_path), "--steps", "9", "--resume",
                              "--lottery-embedding", "redraw"])
    assert config_from_args(args) == RunConfig(
        task="navigation", preset="test", manifold="sphere", inhibitor="ricker", regularizer="l1",
        embedding="trained", sparsity=0.8, lottery=True, seed=2, out=str(tmp_path), steps=9, resume=True,
        lottery_embedding="redraw")
    table = parser.parse_args(["table", "adding", "--seeds", "3", "--sparsities", "0.5", "0.9", "--grid", "all"])
    assert table.task == "adding" and table.seeds == 3 and table.sparsities == [0.5, 0.9]
    assert table.grid == "all" and table.backend == "local" and callable(table.func)
