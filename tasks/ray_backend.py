"""Sweeps on Ray: each planned run is one Ray task; results land in the usual run directories.

Ray is optional (``pip install 'moduli-transform[ray]'``) and imported only when
:func:`execute_ray` is called. The resumption rule is shared with serial execution
(:func:`execute_serial`) so it can be tested without Ray:

* a run whose directory holds a readable ``summary.json`` is finished: it is not run again
  and its result is that summary;
* any other run (never started, crashed, failed, summary missing or unreadable) is run
  again; the run function resumes from its own checkpoints if it has any.

A run function takes one plan and returns its summary dict, writing ``summary.json`` last
(:func:`moduli_transform.tasks.runner.run` does). A run that raises does not stop the sweep: its slot in the
result list is a :class:`RunFailure`, and re-running the sweep retries only those runs.

On a multi-node cluster (``address="ray://head:10001"`` or ``"auto"``) the run directories
must be on storage every node sees, and the run function must be importable on the workers.
"""

from __future__ import annotations

import json
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["RunFailure", "SUMMARY_NAME", "plan_run_dir", "read_summary", "same_recorded_run", "split_finished",
           "execute_serial", "execute_ray"]

SUMMARY_NAME = "summary.json"
RunFunction = Callable[[Any], dict]


@dataclass(frozen=True)
class RunFailure:
    """A run that raised: the plan, its run directory and the error with its traceback."""

    plan: Any
    run_dir: Path | None
    error: str


def plan_run_dir(plan: Any) -> Path:
    """The run directory of a plan: ``plan.out``, ``plan.run_dir``, ``plan.config.out``, or dict keys.

    Raises:
        ValueError: the plan has none of these.
    """
    for holder in (plan, getattr(plan, "config", None)):
        for key in ("out", "run_dir", "directory"):
            value = holder.get(key) if isinstance(holder, dict) else getattr(holder, key, None)
            if value is not None:
                return Path(value)
    raise ValueError(f"cannot find the run directory of plan {plan!r}; give it an 'out' or 'run_dir' field, "
                     "or pass run_dir_of=<function plan -> directory>")


def read_summary(run_dir: str | os.PathLike) -> dict | None:
    """The run's ``summary.json`` as a dict, or None when it is missing or unreadable."""
    try:
        summary = json.loads((Path(run_dir) / SUMMARY_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) else None


# Fields that may differ between a finished run and a plan that reuses it.
_REUSE_IGNORES = ("threads", "resume", "out")


def same_recorded_run(plan: Any, run_dir: Path) -> bool:
    """Whether the run recorded in ``run_dir/config.json`` is the run ``plan`` asks for.

    Plans with ``to_dict``/``from_dict`` (a :class:`~moduli_transform.tasks.runner.RunConfig`) are compared
    field by field (fields the record lacks take their defaults), all but
    ``threads``/``resume``/``out``; other plans only need a summary.
    """
    if not (hasattr(plan, "to_dict") and hasattr(type(plan), "from_dict")):
        return True
    try:
        recorded = type(plan).from_dict(json.loads((Path(run_dir) / "config.json").read_text())["run"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return False  # unreadable, or written by another version: run it again

    def comparable(config: Any) -> dict:
        return {k: v for k, v in config.to_dict().items() if k not in _REUSE_IGNORES}

    return comparable(recorded) == comparable(plan)


def split_finished(plans: Sequence[Any], run_dir_of: Callable[[Any], Path] = plan_run_dir
                   ) -> tuple[dict[int, dict], list[int]]:
    """Summaries of the finished plans by index, and the indices of the plans still to run.

    A finished run is reused only when its recorded config is the plan's (see
    :func:`same_recorded_run`); a run directory left by another config is run again.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> _ = (root / "a").mkdir(), (root / "a" / "summary.json").write_text('{"metric": 1}')
        >>> split_finished([{"out": root / "a"}, {"out": root / "b"}])
        ({0: {'metric': 1}}, [1])
    """
    finished, pending = {}, []
    for index, plan in enumerate(plans):
        run_dir = run_dir_of(plan)
        summary = read_summary(run_dir)
        if summary is None or not same_recorded_run(plan, run_dir):
            pending.append(index)
        else:
            finished[index] = summary
    return finished, pending


def _guarded(run_fn: RunFunction, plan: Any, run_dir: Path | None) -> dict | RunFailure:
    try:
        return run_fn(plan)
    except Exception:  # a failed run is reported, the sweep goes on
        return RunFailure(plan, run_dir, traceback.format_exc())


def execute_serial(plans: Sequence[Any], run_fn: RunFunction, *,
                   run_dir_of: Callable[[Any], Path] = plan_run_dir) -> list[dict | RunFailure]:
    """Run the unfinished plans one after another in this process; same rules as Ray."""
    finished, pending = split_finished(plans, run_dir_of)
    results: list[dict | RunFailure | None] = [finished.get(i) for i in range(len(plans))]
    for index in pending:
        results[index] = _guarded(run_fn, plans[index], run_dir_of(plans[index]))
    return results


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise ImportError("the Ray sweep backend needs Ray: pip install 'moduli-transform[ray]' "
                          "(or pip install ray), or use the local backend") from error
    return ray


def _local_runtime_env() -> dict:
    """Workers of a local instance import ``tasks`` from this checkout, installed or not."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return {"env_vars": {"PYTHONPATH": path}}


def execute_ray(plans: Sequence[Any], run_fn: RunFunction, address: str | None = None, cpus_per_run: float = 1,
                gpus_per_run: float = 0, *, run_dir_of: Callable[[Any], Path] = plan_run_dir,
                retries: int = 0) -> list[dict | RunFailure]:
    """Run the unfinished plans as Ray tasks; finished ones are read from their summaries.

    Args:
        plans: the sweep's plans (anything :func:`plan_run_dir` or ``run_dir_of`` understands).
        run_fn: plan -> summary dict; it must write ``<run dir>/summary.json`` when done.
        address: a Ray cluster (``"auto"``, ``"ray://host:10001"``); None starts a local
            Ray instance for this call (and stops it afterwards). An already initialised
            Ray is reused as it is.
        cpus_per_run, gpus_per_run: resources Ray reserves for each run (this bounds how
            many run at once).
        retries: how often Ray retries a run whose worker process died (crash, OOM kill);
            a run that raises is not retried but reported as a :class:`RunFailure`.

    Returns:
        One entry per plan, in order: its summary dict, or a :class:`RunFailure`.

    Raises:
        ImportError: Ray is not installed.
        ValueError: negative resources or retries.
    """
    if cpus_per_run < 0 or gpus_per_run < 0 or retries < 0:
        raise ValueError(f"cpus_per_run, gpus_per_run and retries must be >= 0; got "
                         f"{cpus_per_run}, {gpus_per_run}, {retries}")
    finished, pending = split_finished(plans, run_dir_of)
    results: list[dict | RunFailure | None] = [finished.get(i) for i in range(len(plans))]
    if not pending:
        return results
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env=None if address else _local_runtime_env())
    try:
        remote = ray.remote(_guarded).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=retries)
        references = {index: remote.remote(run_fn, plans[index], run_dir_of(plans[index])) for index in pending}
        for index, reference in references.items():
            try:
                results[index] = ray.get(reference)
            except Exception as error:  # the worker died (ray.exceptions.WorkerCrashedError and kin)
                results[index] = RunFailure(plans[index], run_dir_of(plans[index]), repr(error))
    finally:
        if started:
            ray.shutdown()
    return results
