"""moduli_transform.allocator: large freed blocks are reused instead of paged in again."""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys

import pytest

from moduli_transform.allocator import reuse_large_blocks

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt is glibc's")

# A training step's pattern: three 20 MB tensors made and freed (activations and their
# gradients), counted in minor page faults per step (each fresh 4 KB page is one) after ten
# steps of warm-up. The heap's first growth can fall on any of the first steps, so a step's
# faults are judged by the median ("steady state") and the contrast's by the mean.
FAULTS = """
import resource, sys, threading, torch
from moduli_transform.allocator import reuse_large_blocks
mode, where = sys.argv[1], sys.argv[2]
if mode == "small":     # 20 MB blocks above the mmap threshold: mmapped, unmapped on free
    applied = reuse_large_blocks(mmap_threshold_mb=1, trim_threshold_mb=1)
else:
    applied = reuse_large_blocks(single_arena=mode == "reuse")
faults = []
def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.empty(5_000_000).fill_(1.0); b = torch.empty(5_000_000).fill_(1.0)
    c = torch.empty(5_000_000).fill_(1.0)
    del a, b, c
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
def steps(count):
    for _ in range(count):
        step()
if where == "thread":   # as a batch producer thread allocates
    worker = threading.Thread(target=steps, args=(20,)); worker.start(); worker.join()
else:
    steps(20)
print(applied, *faults[10:])
"""


def _faults(mode: str, where: str) -> tuple[str, list[int]]:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode, where], capture_output=True, text=True, check=True)
    applied, *faults = done.stdout.split()
    return applied, [int(count) for count in faults]


@glibc
def test_the_main_threads_freed_blocks_are_not_paged_in_again():
    # (glibc's own default depends on the heap's layout at start, 0 or ~14,600 faults a
    # step between runs, so the contrast is a threshold below the blocks' size)
    small_applied, small_faults = _faults("small", "main")
    applied, faults = _faults("reuse", "main")
    assert small_applied == "True" and applied == "True" and len(faults) == 10
    assert statistics.mean(small_faults) > 10_000   # 60 MB of fresh pages a step is ~14,600
    assert statistics.median(faults) < 50


@glibc
def test_a_threads_freed_blocks_are_not_paged_in_again():
    applied, faults = _faults("reuse", "thread")
    assert applied == "True" and statistics.median(faults) < 50
    # the thresholds alone leave a thread's own arena trimming its heap (~4,900 faults every
    # other step): the one arena matters
    thresholds_applied, thresholds_faults = _faults("thresholds", "thread")
    assert thresholds_applied == "True" and statistics.mean(thresholds_faults) > 1000


@pytest.mark.parametrize("mmap_mb, trim_mb, message", [
    (0, 256, "between 1 and 32.*got 0"),
    (64, 256, "between 1 and 32.*got 64"),
    (32, 16, r"trim_threshold_mb \(16\) must be at least mmap_threshold_mb \(32\)"),
])
def test_bad_thresholds_are_refused_with_their_values(mmap_mb, trim_mb, message):
    with pytest.raises(ValueError, match=message):
        reuse_large_blocks(mmap_mb, trim_mb)
