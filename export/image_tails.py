"""Per-image activation tails for calibration sets too small to trust the pooled percentile.

:class:`ImageTails` hooks the convolutions whose inputs the Q/DQ ONNX quantizes (the same
``{module: ONNX tensor}`` map as :func:`resunetpp.export.fast_calibration.conv_input_tensors`)
and records, for every calibration image, the ``percentile`` of its own |x| at each input.
:func:`widen_ranges` then applies :func:`resunetpp.export.ranges.small_set_range` to ONNX Runtime's
ranges: below :data:`resunetpp.export.ranges.SMALL_SET_IMAGES` images, each range is at least the
largest per-image percentile (benchmarks/INT8.md, section 14).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from resunetpp.errors import ResUNetError


class ImageTails:
    """Forward pre-hooks recording each image's ``percentile`` of |x| at each convolution input;
    a context manager (hooks removed on exit). Several convolutions reading one tensor count it once
    per forward pass."""

    def __init__(self, model: nn.Module, tensors: dict[str, str], percentile: float) -> None:
        if not 0 < percentile <= 100:
            raise ResUNetError(f"percentile must be in (0, 100], got {percentile}")
        self.model, self.tensors, self.tail = model, dict(tensors), 1.0 - percentile / 100.0
        self.values: dict[str, list[float]] = {}
        self._seen: set[str] = set()
        self._handles: list = []

    def __enter__(self) -> ImageTails:
        modules = dict(self.model.named_modules())
        missing = [m for m in self.tensors if not isinstance(modules.get(m), nn.Conv2d | nn.ConvTranspose2d)]
        if missing:
            raise ResUNetError(f"module {missing[0]!r} is not a convolution of the PyTorch model")
        self._handles = [modules[m].register_forward_pre_hook(self._hook(t)) for m, t in self.tensors.items()]
        self._handles.append(self.model.register_forward_pre_hook(lambda *_: self._seen.clear()))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, tensor: str):
        def pre(_module, args):
            if tensor in self._seen:
                return
            self._seen.add(tensor)
            a = args[0].detach().abs().flatten(1).float()
            # the ceil(tail * n)-th largest value of each image (numpy's 'higher' percentile)
            k = max(1, math.ceil(round(self.tail * a.shape[1], 6)))
            top = torch.topk(a, min(k, a.shape[1]), dim=1).values[:, -1]
            self.values.setdefault(tensor, []).extend(top.tolist())
        return pre

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
