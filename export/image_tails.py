"""Per-image activation tails for calibration sets too small to trust the pooled percentile.

:class:`ImageTails` records, for every calibration image, the ``percentile`` of its own |x| at
each convolution input the Q/DQ ONNX quantizes (fed by the calibration pass over the graph).
:func:`widen_ranges` then applies :func:`resunetpp.export.ranges.small_set_range` to ONNX Runtime's
ranges: below :data:`resunetpp.export.ranges.SMALL_SET_IMAGES` images, each range is at least the
largest per-image percentile (benchmarks/INT8.md, section 14).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from resunetpp.errors import ResUNetError


class ImageTails:
    """Each image's ``percentile`` of |x| at each tensor, from the batches :meth:`record` is given
    (the calibration pass's convolution inputs, :func:`resunetpp.export.fast_calibration.collect_graph_histograms`)."""

    def __init__(self, percentile: float) -> None:
        if not 0 < percentile <= 100:
            raise ResUNetError(f"percentile must be in (0, 100], got {percentile}")
        self.tail = 1.0 - percentile / 100.0
        self.values: dict[str, list[float]] = {}

    def record(self, tensor: str, x: torch.Tensor) -> None:
        """One batch ``(N, ...)`` of ``tensor``: appends each image's percentile."""
        a = x.detach().abs().flatten(1).float()
        # the ceil(tail * n)-th largest value of each image (numpy's 'higher' percentile)
        k = max(1, math.ceil(round(self.tail * a.shape[1], 6)))
        top = torch.topk(a, min(k, a.shape[1]), dim=1).values[:, -1]
        self.values.setdefault(tensor, []).extend(top.tolist())

    def per_image(self) -> dict[str, np.ndarray]:
        return {t: np.asarray(v, dtype=np.float64) for t, v in self.values.items()}


def widen_ranges(ranges, per_image: dict[str, np.ndarray], images: int):
    """ONNX Runtime ``TensorsData`` with each symmetric range ``[-a, a]`` replaced by
    ``[-b, b]``, ``b =`` :func:`~resunetpp.export.ranges.small_set_range` of ``a`` (unchanged from
    :data:`~resunetpp.export.ranges.SMALL_SET_IMAGES` images on); returns ``(ranges, widened)``,
    ``widened`` the tensors whose range grew, with their factor."""
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    from resunetpp.export.ranges import small_set_range

    data, widened = {}, {}
    for name, td in ranges.data.items():
        lo, hi = (float(np.asarray(v).reshape(-1)[0]) for v in td.range_value)
        a = max(abs(lo), abs(hi))
        b = small_set_range(a, per_image.get(name, np.empty(0)), images)
        if b > a:
            widened[name] = round(b / a, 4) if a > 0 else None
            data[name] = TensorData(lowest=np.float32(-b), highest=np.float32(b))
        else:
            data[name] = td
    return TensorsData(ranges.calibration_method, data), widened


__all__ = ["ImageTails", "widen_ranges"]
