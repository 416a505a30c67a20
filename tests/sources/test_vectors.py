"""Reading precomputed embeddings: the float16 -> float32 conversion the scoring tasks use."""

import numpy as np
import pytest

from pipeline.sources.vectors import as_float32


def test_every_float16_value_converts_exactly_as_numpy_casts_it():
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(-1, 64)  # all 65,536 bit patterns
    want, got = halves.astype(np.float32), as_float32(halves)
    assert got.dtype == np.float32 and got.shape == halves.shape
    finite = np.isfinite(want)
    assert finite.sum() == 63_488  # 2 x (31 exponents x 1024 mantissas), subnormals and both zeros included
    assert np.array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))  # bit for bit, -0.0 too
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(want).sum() == 2046
    assert np.array_equal(got[np.isinf(want)], want[np.isinf(want)])  # +inf and -inf
    assert got[0, 1] == np.float32(2.0 ** -24)  # the smallest subnormal


def test_a_block_view_other_dtypes_and_a_buffer_to_write_into():
    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float16)
    np.testing.assert_array_equal(as_float32(x[10:20]), x[10:20].astype(np.float32))
    buffer = np.full((64, 8), 7.0, dtype=np.float32)  # reused across blocks: the first rows are written
    got = as_float32(x[10:20], buffer[:10])
    assert np.shares_memory(got, buffer) and (buffer[10:] == 7.0).all()
    np.testing.assert_array_equal(got, x[10:20].astype(np.float32))
    for dtype in (np.float32, np.float64):
        y = x.astype(dtype)
        out = as_float32(y)
        assert out.dtype == np.float32 and out is not y
        np.testing.assert_array_equal(out, x.astype(np.float32))
        np.testing.assert_array_equal(as_float32(y[:5], buffer[:5]), x[:5].astype(np.float32))


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_a_non_finite_value_stays_non_finite(value):
    x = np.ones((3, 4), dtype=np.float16)
    x[1, 2] = value
    got = as_float32(x)
    assert np.isfinite(got).all(axis=1).tolist() == [True, False, True]
    assert (np.isnan(got[1, 2]) if np.isnan(value) else got[1, 2] == value)
