"""benchmarks/tile_alternatives.py: each alternative computes what the shipping kernel does,
so that its timing compares the same work."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from moduli_transform.export import numba_kernels

pytestmark = pytest.mark.skipif(not numba_kernels.AVAILABLE, reason="the tile kernels need numba")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))   # it imports its timer from tile_call_parts
    spec = importlib.util.spec_from_file_location("tile_alternatives", BENCHMARKS / "tile_alternatives.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("chunk, ahead", [(3, 3), (16, 10)])   # 7 steps: a partial window; one window
def test_each_alternative_gives_the_shipping_kernels_outputs(monkeypatch, chunk, ahead):
    torch.manual_seed(0)
    numba_kernels.set_threads(1)
    rows = _script(monkeypatch).comparisons(hidden=256, sparsity=0.75, steps=7, chunk=chunk, ahead=ahead)
    assert [bitwise for *_, bitwise in rows] == [True, False, True]
    for name, shipping, alternative, bitwise in rows:
        reference, result = shipping(), alternative()
        assert reference.shape == result.shape == (7, 1, 256), name
        assert np.count_nonzero(reference) > 0.9 * reference.size
        if bitwise:
            np.testing.assert_array_equal(result, reference, err_msg=name)
        else:   # the fused projection sums in another order than torch.addmm
            np.testing.assert_allclose(result, reference, rtol=0, atol=5e-6, err_msg=name)
    # the orders differ, so the ordered comparison would catch a scatter to the wrong places
    assert not np.array_equal(rows[0][1](), rows[2][1]())


def test_bad_counts_are_refused_with_their_value(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        _script(monkeypatch).main(["--ahead", "0"])
    assert "--ahead must be at least 1, got 0" in capsys.readouterr().err
