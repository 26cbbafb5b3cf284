"""moduli_transform.tasks.ray_backend: finished runs are skipped, failed and missing ones re-run (serial and Ray)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from moduli_transform.tasks.ray_backend import (
    RunFailure, execute_ray, execute_serial, plan_run_dir, read_summary, split_finished,
)


def make_run_fn():
    """A trivial run: counts its calls in the run directory, fails when the plan says so.

    Defined in a function so Ray ships it by value (workers need not import this test file).
    """

    def run_fn(plan: dict) -> dict:
        out = Path(plan["out"])
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "calls.txt", "a") as file:
            file.write(f"{os.getpid()}\n")
        if (out / "fail").exists():
            raise RuntimeError(f"planned failure of {out.name}")
        summary = {"name": out.name, "metric": plan["value"] * 2}
        (out / "summary.json").write_text(json.dumps(summary))
        return summary

    return run_fn


def calls(plan: dict) -> int:
    path = Path(plan["out"]) / "calls.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture
def plans(tmp_path):
    """Four runs: finished, failing, never started, and crashed with an unreadable summary."""
    plans = [{"out": tmp_path / name, "value": i} for i, name in enumerate(["done", "bad", "new", "torn"])]
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "summary.json").write_text('{"name": "done", "metric": -1}')
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "fail").touch()
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "summary.json").write_text('{"name": "to')
    return plans


def check_first_and_second_sweep(execute, plans) -> None:
    run_fn = make_run_fn()
    first = execute(plans, run_fn)
    assert first[0] == {"name": "done", "metric": -1}  # read back, not re-run
    assert isinstance(first[1], RunFailure) and "planned failure of bad" in first[1].error
    assert first[1].run_dir == plans[1]["out"]
    assert first[2] == {"name": "new", "metric": 4} and first[3] == {"name": "torn", "metric": 6}
    assert [calls(p) for p in plans] == [0, 1, 1, 1]

    (plans[1]["out"] / "fail").unlink()  # the failed run's cause is fixed
    second = execute(plans, run_fn)
    assert second == [first[0], {"name": "bad", "metric": 2}, first[2], first[3]]
    assert [calls(p) for p in plans] == [0, 2, 1, 1]  # only the failed run ran again
    assert execute(plans, run_fn) == second and [calls(p) for p in plans] == [0, 2, 1, 1]


# -- without Ray ----------------------------------------------------------------------------
def test_serial_sweep_skips_finished_and_reruns_failed(plans):
    check_first_and_second_sweep(execute_serial, plans)


def test_split_finished_and_summaries(plans):
    finished, pending = split_finished(plans)
    assert list(finished) == [0] and pending == [1, 2, 3]
    assert read_summary(plans[3]["out"]) is None and read_summary(plans[2]["out"]) is None


@pytest.mark.parametrize("plan, expected", [
    ({"out": "runs/a"}, Path("runs/a")),
    ({"run_dir": "runs/b"}, Path("runs/b")),
    (type("Plan", (), {"config": type("Config", (), {"out": "runs/c"})()})(), Path("runs/c")),
])
def test_plan_run_dir(plan, expected):
    assert plan_run_dir(plan) == expected


def test_plan_without_directory_is_refused():
    with pytest.raises(ValueError, match="run_dir_of"):
        plan_run_dir({"name": "x"})


def test_all_finished_needs_no_ray(plans):
    assert execute_ray(plans[:1], make_run_fn()) == [{"name": "done", "metric": -1}]


def test_bad_resources_are_refused(plans):
    with pytest.raises(ValueError, match="cpus_per_run"):
        execute_ray(plans, make_run_fn(), cpus_per_run=-1)


# -- with Ray (skipped when it is not installed) --------------------------------------------
@pytest.mark.slow
def test_ray_sweep_skips_finished_and_reruns_failed(plans, monkeypatch):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    # Run from elsewhere with no PYTHONPATH: workers still import ``tasks`` (installed, or via
    # the runtime environment execute_ray gives a local instance).
    monkeypatch.chdir(plans[0]["out"].parent)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    check_first_and_second_sweep(lambda p, f: execute_ray(p, f, cpus_per_run=1), plans)
    assert not ray.is_initialized()  # the local instance it started is stopped again
