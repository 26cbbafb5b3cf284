"""moduli_transform.allocator: large freed blocks are reused instead of paged in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from moduli_transform.allocator import reuse_large_blocks

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt is glibc's")

# A training step's pattern: two 20 MB tensors alive, one freed, a third made; counted in
# minor page faults (each fresh page of an mmapped block is one).
FAULTS = """
import resource, sys, threading, torch
from moduli_transform.allocator import reuse_large_blocks
mode, where = sys.argv[1], sys.argv[2]
applied = None if mode == "default" else reuse_large_blocks(single_arena=mode == "reuse")
def step():
    a = torch.empty(5_000_000).fill_(1.0); b = torch.empty(5_000_000).fill_(1.0)
    del a
    c = torch.empty(5_000_000).fill_(1.0)
def steps(count):
    for _ in range(count):
        step()
def run(count):
    if where == "thread":   # as a batch producer thread allocates
        worker = threading.Thread(target=steps, args=(count,)); worker.start(); worker.join()
    else:
        steps(count)
run(3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
run(10)
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults(mode: str, where: str = "main") -> tuple[str, float]:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode, where], capture_output=True, text=True, check=True)
    applied, faults = done.stdout.split()
    return applied, float(faults)


@glibc
def test_a_threads_freed_blocks_are_not_paged_in_again():
    default_applied, default_faults = _faults("default", "thread")
    applied, faults = _faults("reuse", "thread")
    assert default_applied == "None" and applied == "True"
    # 15 MB of fresh pages a step is ~3,700 faults; reused blocks need (almost) none
    assert default_faults > 1000
    assert faults < 0.05 * default_faults
    # the thresholds alone leave a thread's own arena returning its memory: the one arena matters
    assert _faults("thresholds", "thread")[1] > 1000


@glibc
def test_the_main_threads_freed_blocks_are_not_paged_in_again():
    # (glibc's default here depends on the heap's layout at start: 0 or ~14,600 faults a step)
    applied, faults = _faults("reuse", "main")
    assert applied == "True" and faults < 50


@pytest.mark.parametrize("mmap_mb, trim_mb, message", [
    (0, 256, "between 1 and 32.*got 0"),
    (64, 256, "between 1 and 32.*got 64"),
    (32, 16, r"trim_threshold_mb \(16\) must be at least mmap_threshold_mb \(32\)"),
])
def test_bad_thresholds_are_refused_with_their_values(mmap_mb, trim_mb, message):
    with pytest.raises(ValueError, match=message):
        reuse_large_blocks(mmap_mb, trim_mb)
