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
    assert [bitwise for *_, bitwise in rows] == [True, False, True, False, False]
    for name, shipping, alternative, bitwise in rows[:3]:   # the int8 rows: below
        reference, result = shipping(), alternative()
        assert reference.shape == result.shape == (7, 1, 256), name
        assert np.count_nonzero(reference) > 0.9 * reference.size
        if bitwise:
            np.testing.assert_array_equal(result, reference, err_msg=name)
        else:   # the fused projection sums in another order than torch.addmm
            np.testing.assert_allclose(result, reference, rtol=0, atol=5e-6, err_msg=name)
    # the orders differ, so the ordered comparison would catch a scatter to the wrong places
    assert not np.array_equal(rows[0][1](), rows[2][1]())


def test_int8_tiles_compute_what_the_dequantised_matrix_computes(monkeypatch):
    script = _script(monkeypatch)
    rng = np.random.default_rng(0)
    ptr = np.array([0, 2, 2, 3], np.int32)                 # 3 block rows, the middle one empty
    cols = np.array([0, 2, 1], np.int32)
    tiles = rng.standard_normal((3, 16, 16)).astype(np.float32)
    tiles[:2, :, 5] = 0.0                                  # row 5: no kept weight in its tiles
    quantised, scales = script.int8_tiles(ptr, tiles)
    assert quantised.dtype == np.int8 and scales.shape == (48,)
    assert np.abs(quantised).max() == 127 and scales[5] == 1.0 and np.all(scales[16:32] == 1.0)
    row_of = np.array([0, 0, 2])[:, None] * 16 + np.arange(16)
    dequantised = (quantised * scales[row_of][:, None, :]).astype(np.float32)
    assert np.abs(dequantised - tiles).max() <= scales.max() / 2 * 1.0001   # rounding to the nearest step
    projected = rng.standard_normal((4, 1, 48)).astype(np.float32)
    h0 = rng.standard_normal((1, 48)).astype(np.float32)
    expected, result = np.empty((4, 1, 48), np.float32), np.empty((4, 1, 48), np.float32)
    numba_kernels._elman_sequence(ptr, cols, dequantised, projected, h0, expected, script.TANH,
                                  np.empty(0, np.int64), True)
    script._int8_sequence(ptr, cols, quantised, scales, projected, h0, result, script.TANH)
    np.testing.assert_allclose(result, expected, rtol=0, atol=2e-6)


def test_bad_counts_are_refused_with_their_value(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        _script(monkeypatch).main(["--ahead", "0"])
    assert "--ahead must be at least 1, got 0" in capsys.readouterr().err
