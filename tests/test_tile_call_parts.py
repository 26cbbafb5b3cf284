"""benchmarks/tile_call_parts.py: the parts it times are the runtime's call, taken apart."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from moduli_transform.export import numba_kernels
from moduli_transform.export.sparse_runtime import thread_pools

pytestmark = pytest.mark.skipif(not numba_kernels.AVAILABLE, reason="the tile kernels need numba")


def _script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tile_call_parts.py"
    spec = importlib.util.spec_from_file_location("tile_call_parts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_parts_in_sequence_give_the_whole_calls_output():
    torch.manual_seed(0)
    calls = _script().parts(hidden=256, sparsity=0.9, steps=5, threads=1)
    output, h_n = calls["whole call"]()
    for name in ("projection + kernel ordering its outputs", "projection + kernel + gather after"):
        with thread_pools(1):   # as the runtime's call runs its projection
            by_parts = calls[name]()
        assert output.shape == (5, 1, 256) and by_parts.shape == (5, 1, 256)
        torch.testing.assert_close(by_parts, output, rtol=0, atol=0, msg=name)
    with thread_pools(1):
        kernel_outputs, _ = calls["tile kernel alone"]()
    # the kernel alone works in the tiles' unit order: the same values, permuted (its
    # projection was made once on the default threads, so to float32 rounding)
    torch.testing.assert_close(kernel_outputs[:, 0].sort(dim=1).values, output[:, 0].sort(dim=1).values,
                               rtol=0, atol=1e-6)
    assert not torch.equal(kernel_outputs, output)   # ... and not in the module's order
    assert set(calls) == {"whole call", "projection + kernel ordering its outputs",
                          "projection + kernel + gather after", "projection + kernel",
                          "input projection alone", "tile kernel alone", "byte floor"}


def test_bad_rounds_are_refused_with_their_value(capsys):
    with pytest.raises(SystemExit):
        _script().main(["--rounds", "0"])
    assert "got 0 and 15" in capsys.readouterr().err
