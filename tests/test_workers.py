"""tasks/workers.py: pool workers end with the driver that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

# A driver that starts a worker and exits without a word to it, as one stopped by `kill`.
DRIVER = """
import subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)   # the caller waits for no pipe of its
assert worker.stdout.readline().strip() == "started"
print(worker.pid, flush=True)
"""
WORKER = """
import sys, time
from moduli_transform.tasks.workers import die_with_parent, start_worker
if sys.argv[1] == "start_worker":
    start_worker()
else:
    assert die_with_parent()
print("started", flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")   # a zombie has ended; only its exit status is left


@linux
@pytest.mark.parametrize("setup", ["die_with_parent", "start_worker"])
def test_a_worker_ends_when_its_driver_ends(setup):
    done = subprocess.run([sys.executable, "-c", DRIVER, WORKER, setup], capture_output=True, text=True,
                          check=True, timeout=60)
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 20
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


@linux
def test_without_it_the_worker_outlives_its_driver():
    # the control: the same worker without the request keeps running after the driver
    worker = WORKER.replace("    assert die_with_parent()", "    pass")
    done = subprocess.run([sys.executable, "-c", DRIVER, worker, "none"], capture_output=True, text=True,
                          check=True, timeout=60)
    pid = int(done.stdout.split()[0])
    try:
        time.sleep(0.5)
        assert _alive(pid)
    finally:
        subprocess.run(["kill", str(pid)], check=False)


@linux
def test_a_worker_whose_driver_already_ended_ends_at_once():
    # the driver named (here: a pid that is not this process's parent) is gone by the time
    # the worker asks: it ends at once instead of training on
    done = subprocess.run([sys.executable, "-c", "import os\nfrom moduli_transform.tasks.workers import "
                           "die_with_parent\ndie_with_parent(parent_pid=os.getppid() + 1_000_000)\n"
                           "print('trained on')"], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGTERM and "trained on" not in done.stdout


def test_runs_spread_over_the_gpus_only_when_no_gpu_is_named():
    from moduli_transform.tasks.workers import spread_over_gpus

    assert spread_over_gpus("cuda", 4, 2) == [0, 1, 0, 1]
    assert spread_over_gpus("auto", 3, 4) == [0, 1, 2]
    assert spread_over_gpus("cuda:1", 4, 2) == []   # a named GPU is where every run goes
    assert spread_over_gpus("cuda", 1, 4) == [] and spread_over_gpus("cuda", 4, 1) == []
    assert spread_over_gpus("cpu", 4, 2) == []


def test_pool_options_hand_each_worker_its_gpu(monkeypatch):
    import multiprocessing

    import torch

    from moduli_transform.tasks import workers

    context = multiprocessing.get_context("spawn")
    options, run_device = workers.pool_options("cpu", torch.device("cpu"), 4, context)
    assert options == {"initializer": workers.start_worker} and run_device == "cpu"
    # two GPUs "visible": a queue of slots, one per worker, and every run names plain "cuda"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    options, run_device = workers.pool_options("cuda", torch.device("cuda", 0), 3, context)
    assert run_device == "cuda" and options["initializer"] is workers.start_worker
    (queue,) = options["initargs"]
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(workers, "reuse_large_blocks", lambda: None)
    monkeypatch.setattr(workers, "die_with_parent", lambda **_: True)
    for _ in range(3):
        workers.start_worker(queue)
    assert chosen == [0, 1, 0]
    options, run_device = workers.pool_options("cuda:1", torch.device("cuda", 1), 3, context)
    assert "initargs" not in options and run_device == "cuda:1"


def test_training_pool_runs_workers_on_the_device_asked_for():
    import torch

    from moduli_transform.tasks import workers

    pool, run_device = workers.training_pool("cpu", torch.device("cpu"), 2)
    with pool:
        assert run_device == "cpu"
        assert pool._max_workers == 2 and pool._mp_context.get_start_method() == "spawn"
        assert pool.submit(os.getpid).result() != os.getpid()   # in a worker process
