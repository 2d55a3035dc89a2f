"""MSE-optimal activation ranges (export.ranges) and the ``mse`` calibration method."""

import json

import numpy as np
import pytest

from resunetpp.export.ranges import mse_range


def _exact_mse(x: np.ndarray, a: float) -> float:
    s = a / 127
    return float(np.mean((x - np.minimum(np.round(x / s), 127) * s) ** 2))


@pytest.fixture(scope="module")
def laplace() -> np.ndarray:
    return np.abs(np.random.default_rng(0).laplace(0.0, 1.0, 2_000_000)).astype(np.float32)


def test_laplace_range_matches_the_analytic_optimum(laplace):
    # Banner et al. (NeurIPS 2019), table 1: 8-bit clipping of Laplace(0, b) is optimal at 9.89 b.
    h, e = np.histogram(laplace, bins=2048)
    a = mse_range(h, e)
    assert 9.4 < a < 10.4
    grid = np.linspace(5.0, 15.0, 41)
    assert _exact_mse(laplace, a) <= 1.01 * min(_exact_mse(laplace, g) for g in grid)
    assert a < 0.8 * float(laplace.max())  # clips the tail, unlike min-max


def test_exact_zeros_do_not_pull_the_range(laplace):
    h, e = np.histogram(laplace, bins=2048)
    z = np.concatenate([np.zeros(3 * laplace.size, np.float32), laplace])  # a post-ReLU tensor
    hz, ez = np.histogram(z, bins=2048)
    assert mse_range(hz, ez) == pytest.approx(mse_range(h, e), rel=0.03)


def test_uniform_values_keep_their_whole_range():
    x = np.random.default_rng(1).uniform(0, 3.0, 500_000)
    h, e = np.histogram(x, bins=2048)
    assert mse_range(h, e) == pytest.approx(3.0, rel=0.02)  # clipping a flat distribution never pays


def test_degenerate_histograms():
    assert mse_range(np.array([10]), np.array([0.0, 0.0])) == 0.0  # all zeros
    with pytest.raises(ValueError, match="one more entry"):
        mse_range(np.ones(3), np.arange(3.0))
    with pytest.raises(ValueError, match="empty histogram"):
        mse_range(np.zeros(3), np.arange(4.0))
    zeros, edges = np.histogram(np.zeros(100), bins=8)  # edges -0.5 .. 0.5
    assert 0 <= mse_range(zeros, edges) <= 0.5
    with pytest.raises(ValueError, match="must be increasing"):
        mse_range(np.ones(3), np.array([0.0, 2.0, 1.0, 3.0]))
