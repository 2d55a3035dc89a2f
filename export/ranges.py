"""Activation ranges that minimize the INT8 quantization error (``--method mse``).

A symmetric INT8 quantizer with range ``a`` (scale ``s = a / 127``) makes two errors: it rounds
every value inside ``[-a, a]`` to a multiple of ``s`` and it clips every value outside to ``±a``.
A percentile range fixes how much is clipped, whatever the distribution; the range that
minimizes the mean squared error of the quantized tensor balances the two, per tensor::

    MSE(a) = sum over |x| <= a of (x - s·round(x/s))^2  +  sum over |x| > a of (|x| - a)^2

computed here from the histogram of |x| that ONNX Runtime's percentile calibrator collects over
the calibration images (rounding error averaged over points spread within each bin, so the many
exact zeros after a ReLU count as exact), over a geometric grid of candidate ranges up to the
largest value seen. R. Banner, Y. Nahshan, D. Soudry, "Post training 4-bit quantization of
convolutional networks for rapid-deployment", NeurIPS 2019 (ACIQ) derives the same trade-off
analytically for known distributions; AIMET's "TF-enhanced" scheme searches a similar cost over a
histogram numerically, as here.

On the shipped Kvasir-SEG model (equalized, bias-corrected) the MSE ranges are 1.0-1.9x the
99.99th percentile and cut the INT8 logit error on held-out training images by about a tenth,
but not on the validation images (benchmarks/INT8.md, section 9): the percentile stays the default.
"""

from __future__ import annotations

import numpy as np

#: Signed symmetric INT8 (zero point 0), as the Q/DQ ONNX stores activations.
LEVELS = 127
#: Candidate ranges per tensor: a geometric grid from ``GRID_LOW`` x the largest value to it.
GRID_POINTS = 400
GRID_LOW = 1e-3
#: Points per histogram bin at which the rounding error is evaluated.
SUBSAMPLES = 8


def mse_range(hist: np.ndarray, edges: np.ndarray, largest: float | None = None, *, levels: int = LEVELS,
              points: int = GRID_POINTS, subsamples: int = SUBSAMPLES) -> float:
    """The range ``a`` minimizing the quantization MSE of values with |x|-histogram ``hist``
    over ``edges`` (``len(edges) == len(hist) + 1``, increasing; ``np.histogram`` of a constant
    tensor starts below 0, which holds no |x| and is cut off). The range never exceeds the end of
    the last non-empty bin, nor ``largest`` (the largest |x| seen) when given."""
    hist = np.asarray(hist, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    if hist.ndim != 1 or edges.shape != (hist.size + 1,):
        raise ValueError(f"edges must have one more entry than hist, got {edges.shape} and {hist.shape}")
    if np.any(np.diff(edges) < 0):
        raise ValueError("histogram edges must be increasing")
    edges = np.maximum(edges, 0.0)
    if hist.sum() <= 0:
        raise ValueError("empty histogram: no calibration values reached this tensor")
    used = hist > 0
    top = float(edges[1:][used][-1])
    if largest is not None:
        top = min(top, float(largest))
    if top <= 0:
        return 0.0  # an all-zero tensor: any range quantizes it exactly
    lo = edges[:-1][used]
    width = np.clip(np.minimum(np.diff(edges)[used], top - lo), 0.0, None)
    frac = (np.arange(subsamples) + 0.5) / subsamples
    x = (lo[:, None] + width[:, None] * frac[None, :]).ravel()
    w = np.repeat(hist[used] / subsamples, subsamples)
    candidates = top * np.geomspace(GRID_LOW, 1.0, points)
    best, best_err = top, np.inf
    for a in candidates:
        s = a / levels
        q = np.minimum(np.round(x / s), levels) * s
        err = float(np.dot(w, (x - q) ** 2))
        if err < best_err:
            best, best_err = float(a), err
    return best


# ---- small calibration sets ---------------------------------------------------------------------
#: Below this many calibration images the pooled percentile is widened (:func:`small_set_range`).
SMALL_SET_IMAGES = 100


def small_set_range(pooled: float, per_image: np.ndarray, images: int, *,
                    min_images: int = SMALL_SET_IMAGES) -> float:
    """The range of one tensor from a calibration set of ``images`` images: the pooled percentile
    ``pooled`` (every value of every image together), or, for a set smaller than ``min_images``,
    at least the largest *per-image* percentile ``per_image`` (one value per image).

    With few images the pooled tail is set by the few images that happen to be in the set, and
    the equalization's per-channel maxima by the same images: on the shipped model, at 16
    calibration images the median validation image reaches 0.962 of a tensor's range at its own
    99.99th percentile, 0.942 at 64 (0.945 / 0.940 for the calibration images themselves), and
    16% of validation images peak above 1.5x a range (11% at 64). Taking the largest per-image
    percentile covers the calibration image with the widest bulk, not only the pooled tail
    (benchmarks/INT8.md, section 14). From ``min_images`` on the percentile is kept as it is."""
    per_image = np.asarray(per_image, dtype=np.float64).ravel()
    if not np.isfinite(pooled) or pooled < 0:
        raise ValueError(f"pooled range must be finite and >= 0, got {pooled}")
    if images >= min_images or per_image.size == 0:
        return float(pooled)
    if not np.all(np.isfinite(per_image)):
        raise ValueError("per-image percentiles must be finite")
    return float(max(pooled, float(per_image.max())))


def max_of_percentiles(per_image_max: np.ndarray, per_image_pct: np.ndarray) -> float:
    """The largest per-image 99.99th percentile (the study's estimator: any set size)."""
    return float(np.max(per_image_pct))


#: Estimators over per-image statistics ``(per-image max, per-image 99.99th percentile) -> range``
#: compared by ``python -m resunetpp.bench.shift_study calib-count --estimator``.
ESTIMATORS = {"max_of_percentiles": max_of_percentiles}
