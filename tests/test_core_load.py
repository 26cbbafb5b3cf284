"""export/core_load.py: the other processes' share of the cores while a benchmark ran."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moduli_transform.export import core_load
from moduli_transform.export.bench import _summarize, markdown_table

TICKS = os.sysconf("SC_CLK_TCK")
CPUS = tuple(sorted(os.sched_getaffinity(0)))


def _stat(path: Path, busy: dict[int, int], steal: dict[int, int]) -> None:
    """A /proc/stat with the given busy ticks (as 'user') and steal ticks per CPU, idle 0."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    for cpu in CPUS:
        lines.append(f"cpu{cpu} {busy.get(cpu, 0)} 0 0 1000 0 0 0 {steal.get(cpu, 0)} 0 0")
    path.write_text("\n".join(lines) + "\nintr 1 2 3\n")


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_other_processes_ticks_count_and_our_own_cpu_time_is_subtracted(tmp_path):
    stat = tmp_path / "stat"
    _stat(stat, {}, {})
    with core_load.watch(stat) as load:
        time.sleep(0.3)
        _stat(stat, {CPUS[0]: int(0.3 * TICKS)}, {CPUS[-1]: int(0.15 * TICKS)})
    capacity = load.seconds * len(CPUS)
    assert load.cpus == CPUS
    assert load.others == pytest.approx(0.3 / capacity, abs=0.02)
    assert load.steal == pytest.approx(0.15 / capacity, abs=0.02)

    # ticks that were this process's own CPU time are not "others"
    _stat(stat, {}, {})
    with core_load.watch(stat) as load:
        own_before = os.times()
        _spin(0.3)
        own = os.times().user + os.times().system - own_before.user - own_before.system
        _stat(stat, {CPUS[0]: round(own * TICKS)}, {})
    assert load.others == pytest.approx(0.0, abs=0.03)


def test_children_that_were_waited_for_are_our_own(tmp_path):
    stat = tmp_path / "stat"
    _stat(stat, {}, {})
    code = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\n"
    with core_load.watch(stat) as load:
        before = os.times()
        subprocess.run([sys.executable, "-c", code], check=True)
        child = os.times().children_user + os.times().children_system \
            - before.children_user - before.children_system
        assert child >= 0.35
        _stat(stat, {CPUS[0]: round(child * TICKS)}, {})
    assert load.others == pytest.approx(0.0, abs=0.03)


def test_a_process_spinning_beside_us_is_seen_on_the_real_counters():
    if not core_load.STAT.exists():
        pytest.skip("no /proc/stat")
    code = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass\n"
    spinner = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.3)   # let it start
        with core_load.watch() as load:
            time.sleep(0.8)
    finally:
        spinner.wait()
    # one spinning process on one of our CPUs, not waited for inside the block: at least
    # most of one CPU's time (of len(CPUS) CPUs) is the others'
    assert load.others is not None and load.others >= 0.6 / len(CPUS)


def test_no_counters_leave_the_shares_unmeasured(tmp_path):
    with core_load.watch(tmp_path / "missing") as load:
        pass
    assert load.others is None and load.steal is None and load.seconds >= 0.0
    assert core_load.cpu_ticks(CPUS, tmp_path / "missing") is None


def _rows(busy: list[float | None]) -> list[dict]:
    base = {"file": "", "cell": "rnn", "pattern": "random", "hidden": 64, "batch": 1, "sparsity": 0.9,
            "steps": 10, "seed": 0, "kernel": "k", "step_us": 1.0, "bytes_per_step": 1000,
            "library": "torch_rnn", "threads": 1, "sequence_ms": 2.0, "floor_ms": 0.5, "projection_ms": 0.5}
    return [{**base, "others_busy": value, "steal": 0.01 if value is not None else None} for value in busy]


def test_the_table_reports_the_busiest_round_and_warns_above_ten_percent():
    quiet = _summarize(_rows([0.02, 0.05, 0.03]), bandwidth=10.0)
    assert quiet[0]["others_busy"] == pytest.approx(0.05)
    text = markdown_table(quiet, 10.0)
    assert "Other processes took up to 5% of the cores" in text and "inflated" not in text
    assert text.splitlines()[-1].endswith("| 5% |")
    busy = markdown_table(_summarize(_rows([0.02, 0.45, 0.03]), bandwidth=10.0), 10.0)
    assert "up to 45% of the cores" in busy and "Above 10%: those rows' times are inflated" in busy
    unmeasured = markdown_table(_summarize(_rows([None, None]), bandwidth=10.0), 10.0)
    assert "was not measured (no /proc/stat)" in unmeasured and unmeasured.splitlines()[-1].endswith("| - |")
