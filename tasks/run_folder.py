"""Run-folder safety: a command never replaces a run it did not make in this invocation.

Before a command trains into ``--out`` it calls :func:`claim_run_folder`:

- a missing or empty folder is used (with ``resume`` the user is told it starts fresh);
- a folder that holds a run (finished or partial) is refused unless ``resume`` continues
  it (and its recorded settings are the same) or ``overwrite`` moves it aside to
  ``<out>.old-<timestamp>``; nothing is ever deleted;
- ``--out`` naming a file is refused.

The refusal is one line naming ``--resume``, ``--overwrite`` and a free folder name.

While a run is trained, the process holds :func:`lock_run_folder` on its folder (an
exclusive ``flock`` on ``<out>/.lock``, released when the process ends, however it ends): a
second process that would train, resume or move aside the same folder meanwhile is
refused with the holder's pid (POSIX only; elsewhere nothing is locked).

Commands that fill many run folders from a plan (``table``, ``demo``) call
:func:`continue_or_refuse` per folder instead: a run with the plan's settings there is
continued from its checkpoints, a run with other settings is refused, never replaced.

Example:
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> claim_run_folder(root / "r1", {"seed": 0}, resume=False, overwrite=False)
    []
    >>> _ = (root / "r1").mkdir(), (root / "r1" / "summary.json").write_text("{}")
    >>> claim_run_folder(root / "r1", {"seed": 1}, resume=False, overwrite=False)
    Traceback (most recent call last):
    ...
    moduli_transform.tasks.run_folder.RunFolderError: ... already holds a run; pass --resume ...
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

from .ray_backend import same_recorded_run

__all__ = ["RunFolderError", "claim_run_folder", "continue_or_refuse", "free_name", "holds_run",
           "lock_run_folder", "recorded_identity"]

LOCK_FILE = ".lock"

# What a run writes; any of them present means the folder holds (part of) a run.
RUN_FILES = ("config.json", "summary.json", "metrics.jsonl", "checkpoints", "weights.safetensors")


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (it holds another run, or it is a file)."""


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a finished or partial run."""
    return out.is_dir() and any((out / name).exists() for name in RUN_FILES)


def free_name(out: Path) -> Path:
    """The first of ``<out>-2``, ``<out>-3``, ... that does not exist."""
    index = 2
    while (candidate := out.with_name(f"{out.name}-{index}")).exists():
        index += 1
    return candidate


def recorded_identity(out: Path) -> dict[str, Any] | None:
    """The run settings recorded in ``out/config.json`` (without ``resume``), if readable."""
    try:
        recorded = json.loads((out / "config.json").read_text())["run"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {k: v for k, v in recorded.items() if k != "resume"} if isinstance(recorded, dict) else None


@contextlib.contextmanager
def lock_run_folder(out: str | Path) -> Iterator[Path]:
    """Hold the run folder ``out`` (made if missing) for this process while the block runs.

    Raises:
        RunFolderError: another process holds it (the message names its pid), or ``out``
            is a file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out} is a file, not a run folder; choose a folder such as {free_name(out)}")
    out.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - not POSIX
        yield out
        return
    with open(out / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise RunFolderError(f"{out} is being trained by another process (pid {holder}); wait for it "
                                 f"to finish or stop it, or choose another folder such as {free_name(out)}") from None
        try:
            lock.seek(0)
            lock.truncate()
            lock.write(f"{os.getpid()}\n")
            lock.flush()
            yield out
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _move_aside(out: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out.with_name(f"{out.name}.old-{stamp}")
    index = 2
    while target.exists():  # two overwrites within a second
        target = out.with_name(f"{out.name}.old-{stamp}-{index}")
        index += 1
    out.rename(target)
    return target


def claim_run_folder(out: str | Path, identity: dict[str, Any], *, resume: bool, overwrite: bool) -> list[str]:
    """Check (and with ``overwrite`` clear) ``out`` before a run is trained into it.

    Args:
        out: the run folder.
        identity: the settings of the run about to start (``RunConfig.identity()``).
        resume: the user asked to continue the run in ``out``.
        overwrite: the user asked to replace it; the old folder is renamed, not deleted.

    Returns:
        Lines to tell the user (the folder moved aside, or a fresh start on ``--resume``).

    Raises:
        RunFolderError: ``out`` is a file, holds a run without ``resume``/``overwrite``,
            or holds a run with other settings on ``resume``.
    """
    out = Path(out)
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other; pass one of them")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a run folder; choose a folder such as "
                             f"--out {free_name(out)}")
    if not holds_run(out):
        return [f"nothing to resume in {out}: starting a fresh run"] if resume else []
    if overwrite:
        return [f"moved the previous run in {out} aside to {_move_aside(out)}"]
    if resume:
        recorded = recorded_identity(out)
        if recorded is not None and recorded != identity:
            changed = sorted(k for k in set(recorded) | set(identity) if recorded.get(k) != identity.get(k))
            raise RunFolderError(f"cannot --resume {out}: it was made with other settings ({', '.join(changed)}); "
                                 f"pass the same options, --overwrite to move it aside, or --out {free_name(out)}")
        return []
    raise RunFolderError(f"{out} already holds a run; pass --resume to continue it, --overwrite to move it "
                         f"aside to {out}.old-<timestamp>, or --out {free_name(out)}")


def _changed_settings(config: Any, out: Path) -> str:
    """The fields in which the run recorded in ``out`` differs from ``config`` (for messages)."""
    try:
        recorded = type(config).from_dict(json.loads((out / "config.json").read_text())["run"]).to_dict()
    except (OSError, ValueError, KeyError, TypeError):
        return "its config.json is missing or unreadable"
    planned = config.to_dict()
    changed = sorted(k for k in planned if k not in ("threads", "resume", "out") and recorded.get(k) != planned[k])
    return f"other {', '.join(changed)}"


def continue_or_refuse(config: Any, remedy: str) -> Any:
    """The plan to train into ``config.out`` without replacing a run that is already there.

    Args:
        config: a :class:`~moduli_transform.tasks.runner.RunConfig` (anything with
            ``out``, ``resume``, ``threads``, ``to_dict`` and ``from_dict``).
        remedy: what the user can do instead, ending the refusal (``"move it away or pass another --out"``).

    Returns:
        ``config`` itself when ``out`` holds no run; when it holds a run with the same
        settings (partial, or finished without a readable summary), ``config`` with
        ``resume=True`` and the recorded ``threads``, so its checkpoints are continued.

    Raises:
        RunFolderError: ``out`` is a file, or holds a run with other settings (the error names them).
    """
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out} is a file, not a run folder; {remedy}")
    if not holds_run(out):
        return config
    if not same_recorded_run(config, out):
        raise RunFolderError(f"{out} holds another run ({_changed_settings(config, out)}); it is never replaced: "
                             f"{remedy}")
    recorded = recorded_identity(out) or {}
    return replace(config, resume=True, threads=recorded.get("threads", config.threads))
