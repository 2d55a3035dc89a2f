"""Ranges from small calibration sets: export.ranges.small_set_range and export.image_tails."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resunetpp.export.image_tails import ImageTails, widen_ranges
from resunetpp.export.ranges import SMALL_SET_IMAGES, small_set_range

pytestmark = pytest.mark.usefixtures("torch_threads")


def test_small_set_range_widens_only_small_sets():
    per_image = np.array([0.5, 1.4, 0.9])
    assert small_set_range(1.0, per_image, 3) == 1.4  # few images: the widest image's own percentile
    assert small_set_range(2.0, per_image, 3) == 2.0  # never narrower than the pooled percentile
    assert small_set_range(1.0, per_image, SMALL_SET_IMAGES) == 1.0  # enough images: unchanged
    assert small_set_range(1.0, np.empty(0), 3) == 1.0
    assert small_set_range(1.0, per_image, 50, min_images=20) == 1.0
    for bad in (float("nan"), -1.0):
        with pytest.raises(ValueError):
            small_set_range(bad, per_image, 3)
    with pytest.raises(ValueError):
        small_set_range(1.0, np.array([np.inf]), 3)


def test_image_tails_records_each_images_own_percentile():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16) * torch.tensor([1.0, 5.0, 0.2]).view(3, 1, 1, 1)
    tails = ImageTails(99.0)
    tails.record("in_a", x[:2])
    tails.record("in_a", x[2:])
    tails.record("y", torch.relu(x))
    got = tails.per_image()
    assert set(got) == {"in_a", "y"} and len(got["in_a"]) == 3 and len(got["y"]) == 3
    want = [np.percentile(np.abs(x[i].numpy()), 99.0, method="higher") for i in range(3)]
    np.testing.assert_allclose(got["in_a"], want, rtol=1e-6)
    assert got["in_a"][1] > got["in_a"][0] > got["in_a"][2]
    with pytest.raises(Exception):
        ImageTails(0.0)


def test_widen_ranges_replaces_narrower_symmetric_ranges():
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    f = np.float32
    ranges = TensorsData(CalibrationMethod.Percentile, {
        "t1": TensorData(lowest=f(-1.0), highest=f(1.0)), "t2": TensorData(lowest=f(-3.0), highest=f(3.0)),
        "t3": TensorData(lowest=f(-2.0), highest=f(2.0))})
    per_image = {"t1": np.array([0.5, 1.5]), "t2": np.array([2.0, 2.5])}
    out, widened = widen_ranges(ranges, per_image, 2)
    assert float(out["t1"].highest) == 1.5 and float(out["t1"].lowest) == -1.5
    assert float(out["t2"].highest) == 3.0 and float(out["t3"].highest) == 2.0  # wider already / no data
    assert widened == {"t1": 1.5}
    same, none = widen_ranges(ranges, per_image, SMALL_SET_IMAGES)
    assert none == {} and float(same["t1"].highest) == 1.0
