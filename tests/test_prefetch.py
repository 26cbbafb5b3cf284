"""Batches drawn ahead in a background thread: same batches, same generator state, errors passed on."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

from moduli_transform.tasks.prefetch import BatchPrefetcher
from moduli_transform.tasks.runner import RunConfig, run


def _draw(generator: torch.Generator) -> torch.Tensor:
    return torch.randn(3, generator=generator)


def test_batches_and_generator_state_match_a_loop_drawing_in_series():
    reference = torch.Generator().manual_seed(7)
    expected = [_draw(reference) for _ in range(5)]
    generator = torch.Generator().manual_seed(7)
    with BatchPrefetcher(_draw, generator, depth=3) as batches:
        for k in range(5):
            assert torch.equal(batches.next(), expected[k])
        # The producer has drawn ahead; the loop's generator says "five consumed".
        assert torch.equal(generator.get_state(), reference.get_state())
    # Continuing in series from there gives what the reference draws next.
    assert torch.equal(_draw(generator), _draw(reference))


def test_a_new_prefetcher_continues_from_the_generator_state():
    """What a resumed run does: a new producer from the restored state."""
    reference = torch.Generator().manual_seed(1)
    expected = [_draw(reference) for _ in range(4)]
    generator = torch.Generator().manual_seed(1)
    with BatchPrefetcher(_draw, generator) as batches:
        first = [batches.next() for _ in range(2)]
    with BatchPrefetcher(_draw, generator) as batches:
        second = [batches.next() for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(first + second, expected))


def test_an_error_in_draw_is_raised_by_next_in_order():
    calls = []

    def draw(generator: torch.Generator) -> int:
        calls.append(None)
        if len(calls) == 3:
            raise ValueError("bad batch 3")
        return len(calls)

    batches = BatchPrefetcher(draw, torch.Generator())
    assert [batches.next(), batches.next()] == [1, 2]
    with pytest.raises(ValueError, match="bad batch 3"):
        batches.next()
    with pytest.raises(RuntimeError, match="after close"):
        batches.next()


def test_close_stops_the_thread_and_depth_is_checked():
    batches = BatchPrefetcher(_draw, torch.Generator(), depth=2)
    batches.next()
    batches.close()
    assert not batches._thread.is_alive()
    assert not any(t.name == "batch-prefetcher" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(ValueError, match="depth must be >= 1; got 0"):
        BatchPrefetcher(_draw, torch.Generator(), depth=0)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("task", ["navigation"])
def test_a_run_is_bit_identical_with_and_without_prefetch(tmp_path, task):
    outputs = {}
    for prefetch in (True, False):
        config = RunConfig(task=task, preset="test", sparsity=0.5, lottery=True, seed=3,
                           out=str(tmp_path / str(prefetch)), threads=1)
        outputs[prefetch] = run(config, progress=False, prefetch=prefetch)
    first = load_file(str(tmp_path / "True" / "weights.safetensors"))
    second = load_file(str(tmp_path / "False" / "weights.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / "True" / "metrics.jsonl").read_text() == (tmp_path / "False" / "metrics.jsonl").read_text()
    for key in ("dense_metric", "sparse_metric", "lottery_metric", "sparse_tail_metric"):
        assert outputs[True][key] == outputs[False][key]


@pytest.mark.skipif(not hasattr(os, "getpriority") or sys.platform != "linux", reason="per-thread priorities are Linux's")
def test_the_producer_thread_runs_at_the_lowest_priority_and_the_caller_keeps_its_own():
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with BatchPrefetcher(_draw, torch.Generator().manual_seed(0)) as batches:
        batches.next()  # the producer has run
        assert batches.thread_id is not None and batches.thread_id != threading.get_native_id()
        assert os.getpriority(os.PRIO_PROCESS, batches.thread_id) == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
