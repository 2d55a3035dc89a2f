"""Simulated INT8 (fake quantization) of a PyTorch model, as the export's Q/DQ ONNX quantizes it.

:class:`QuantSim` puts fake quantization where :func:`resunetpp.export.quantize.quantize_qdq` puts Q/DQ pairs
with the conv-only recipe: each convolution's input (signed INT8, symmetric, a per-tensor range
from the export's calibration method) and its weight (symmetric, per output channel); with
``outputs`` each convolution's output as well. Gradients pass the rounding with the
straight-through estimator (``torch.fake_quantize_*``). Its range observers reproduce the
calibration: :class:`_TopK` the exact upper percentile of ``|x|`` over a stream, and
:class:`_AbsHistogram` the ``|x|`` histogram :func:`resunetpp.export.ranges.mse_range` chooses a range from.

Used by quantization-aware fine-tuning (:mod:`resunetpp.export.qat`), bias correction
(:mod:`resunetpp.export.bias_correction`) and the INT8 study (``resunetpp.bench.int8_study``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from resunetpp.errors import ResUNetError

#: Signed INT8, symmetric: what ONNX Runtime's symmetric Q/DQ and TensorRT use (zero point 0).
QMIN, QMAX = -127, 127
#: Activation ranges the simulation reproduces: the export's ``percentile`` and ``mse`` methods
#: (``minmax`` is the 100th percentile).
SIM_METHODS = ("percentile", "mse")


def sim_ranges(method: str, percentile: float) -> dict:
    """:class:`QuantSim` range settings for the export's calibration ``method``: ``mse`` and
    ``percentile`` as they are, ``minmax`` as the 100th percentile, ``entropy`` (not simulated)
    approximated by the percentile."""
    if method == "mse":
        return {"method": "mse", "percentile": percentile}
    return {"method": "percentile", "percentile": 100.0 if method == "minmax" else percentile}


def fake_quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``torch.fake_quantize_per_tensor_affine(x, scale, 0, QMIN, QMAX)``, the same float32 values bit for
    bit, without its gradient: ``round(x * float32(1 / scale))``, clamped, times ``scale``, as its CPU kernel
    computes it (round half to even; a rounded -0 made +0 as the kernel's integer makes it). PyTorch's
    kernel takes about 2.5 times as long on a 256x256 feature map here (one pass per element,
    unvectorised): the bias correction's simulation spends a quarter of its time in it otherwise."""
    sc = np.float32(scale)
    y = torch.mul(x, float(np.float32(1.0) / sc))
    torch.round(y, out=y)
    torch.clamp(y, QMIN, QMAX, out=y)
    y.mul_(float(sc))
    return y.add_(0.0)


class _WeightFQ(nn.Module):
    """Per-output-channel symmetric INT8 fake quantization of a convolution weight."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        amax = w.detach().abs().amax(dim=tuple(range(1, w.dim()))).clamp_min(1e-8)
        scale = (amax / QMAX).float()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, QMIN, QMAX)


class _TopK:
    """Exact upper percentile of |x| over a stream of ``images`` images: keeps only the largest
    values the percentile can need (``ceil(tail * total) + 1``, the total known from the first
    batch's size per image)."""

    def __init__(self, percentile: float, images: int) -> None:
        self.tail = 1.0 - percentile / 100.0
        self.images = images
        self.seen = 0
        self.k = 0
        self.kept = torch.empty(0)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().abs().flatten().float()
        if not self.k:
            per_image = flat.numel() // max(1, x.shape[0])
            self.k = math.ceil(round(self.tail * per_image * self.images, 6)) + 1
        self.seen += flat.numel()
        if self.kept.numel() >= self.k:  # only values above the k-th largest so far can enter: a cheap filter
            flat = flat[flat > self.kept[-1]]
        both = torch.cat([self.kept, torch.topk(flat, min(self.k, flat.numel())).values])
        self.kept = torch.topk(both, min(self.k, both.numel())).values

    def value(self) -> float:
        if self.seen == 0:
            raise ResUNetError("no calibration data reached this quantization point")
        # the value at the percentile: the ceil(tail * n)-th largest, like numpy's 'higher' method
        k = max(1, math.ceil(round(self.tail * self.seen, 6)))  # 0.01 * 10000 is 100, not 100.0000001
        return float(self.kept[min(k, self.kept.numel()) - 1])


class _AbsHistogram:
    """Histogram of |x| over a stream, for :func:`resunetpp.export.ranges.mse_range`: ``BINS`` bins up to the
    first nonzero batch's largest value, extended with bins of the same width as larger values
    come (as ONNX Runtime's percentile calibrator collects it)."""

    BINS = 2048

    def __init__(self) -> None:
        self.hist = torch.zeros(0, dtype=torch.float64)
        self.width = 0.0
        self.largest = 0.0
        self.zeros = 0  # values seen before any nonzero one (they belong to the first bin)

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().abs().flatten().float()
        m = float(a.max()) if a.numel() else 0.0
        if m <= 0.0 and not self.width:
            self.zeros += a.numel()
            return
        if not self.width:
            self.width = m / self.BINS
            self.hist = torch.zeros(self.BINS, dtype=torch.float64)
            self.hist[0] += self.zeros
        n = max(self.hist.numel(), math.ceil(m / self.width))
        if n > self.hist.numel():
            self.hist = torch.cat([self.hist, torch.zeros(n - self.hist.numel(), dtype=torch.float64)])
        idx = (a / self.width).long().clamp_(max=n - 1)
        self.hist += torch.bincount(idx, minlength=n).double()
        self.largest = max(self.largest, m)

    def value(self) -> float:
        from resunetpp.export.ranges import mse_range

        if not self.width:
            if self.zeros:
                return 0.0
            raise ResUNetError("no calibration data reached this quantization point")
        edges = np.arange(self.hist.numel() + 1, dtype=np.float64) * self.width
        return mse_range(self.hist.numpy(), edges, self.largest)


def graph_sim_ranges(graph, convs: Sequence[str], batches, *, images: int, percentile: float = 99.99,
                     method: str = "percentile", progress=None) -> dict[str, float]:
    """The ranges :meth:`QuantSim.observe` / :meth:`QuantSim.freeze` collect at the inputs of the
    convolutions ``convs`` (module paths), measured by ONNX Runtime on ``graph`` (an ``onnx.ModelProto``
    exported from the same model; :class:`resunetpp.engines.graph_taps.GraphTaps`, about twice as fast
    as PyTorch on the 2-core box; the same observers, values equal to float32 rounding). ``batches``:
    ``(N, C, H, W)`` arrays, ``images`` images in all. Returns ``{"<conv>:in": range}``."""
    from resunetpp.engines.graph_taps import GraphTaps
    from resunetpp.export.fast_calibration import conv_inputs

    if method not in SIM_METHODS:
        raise ResUNetError(f"simulated range method must be one of {', '.join(SIM_METHODS)}, got {method!r}")
    tensors = conv_inputs(graph, convs)
    taps = GraphTaps(graph, list(tensors.values()))
    observers = {t: _AbsHistogram() if method == "mse" else _TopK(percentile, images) for t in taps.tensors}
    taps.observe(batches, lambda t, x: observers[t].update(x), progress)
    values = {t: o.value() for t, o in observers.items()}
    return {f"{c}:in": values[tensors[c]] for c in convs}


class QuantSim:
    """Fake quantization at every convolution of ``model`` outside ``keep_modules``.

    ``observe()`` collects activation ranges (the ``percentile`` of |x|, or with ``method="mse"``
    the range of :func:`resunetpp.export.ranges.mse_range`); ``freeze()`` turns them into fixed scales;
    ``remove()`` takes every hook and parametrization away, leaving the plain latent weights.
    """

    def __init__(self, model: nn.Module, keep_modules: Sequence[str] = (), percentile: float = 99.99,
                 outputs: bool = False, method: str = "percentile") -> None:
        if method not in SIM_METHODS:
            raise ResUNetError(f"simulated range method must be one of {', '.join(SIM_METHODS)}, got {method!r}")
        self.model = model
        self.method = method
        self.percentile = percentile
        self.convs: dict[str, nn.Conv2d] = {}
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and not any(name == k or name.startswith(k + ".") for k in keep_modules):
                self.convs[name] = m
        unknown = [k for k in keep_modules if not any(n == k or n.startswith(k + ".")
                                                      for n, _ in model.named_modules())]
        if unknown:
            raise ResUNetError(f"module {unknown[0]!r} (kept in float) is not in the model")
        if not self.convs:
            raise ResUNetError("nothing to quantize: every convolution is kept in float")
        self.observers: dict[str, _TopK] | None = None
        self.amax: dict[str, float] = {}
        self.handles = []
        self.weight_fq: list[_WeightFQ] = []
        for name, conv in self.convs.items():
            self.weight_fq.append(_WeightFQ())
            parametrize.register_parametrization(conv, "weight", self.weight_fq[-1])
            self.handles.append(conv.register_forward_pre_hook(self._pre(name + ":in")))
            if outputs:
                self.handles.append(conv.register_forward_hook(self._post(name + ":out")))

    # -- activation points --
    def _fq(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if self.observers is not None:
            if key not in self.observers:
                self.observers[key] = (_AbsHistogram() if self.method == "mse"
                                       else _TopK(self.percentile, self.observe_images))
            self.observers[key].update(x)
            return x
        if key not in self.amax:
            return x  # not calibrated (yet): float
        scale = max(self.amax[key], 1e-8) / QMAX
        if torch.is_grad_enabled() and x.requires_grad:  # training: the straight-through gradient
            return torch.fake_quantize_per_tensor_affine(x, scale, 0, QMIN, QMAX)
        return fake_quantize(x, scale)

    def _pre(self, key: str):
        def hook(module, args):
            return (self._fq(key, args[0]),) + tuple(args[1:])
        return hook

    def _post(self, key: str):
        def hook(module, args, output):
            return self._fq(key, output)
        return hook

    def observe(self, images: int) -> None:
        """Collect ranges over the next forward passes (``images`` images in all) of the float
        model, as ONNX Runtime's calibration sees it: weights and activations unquantized."""
        self.observers = {}
        self.observe_images = images
        for fq in self.weight_fq:
            fq.enabled = False

    def freeze(self) -> dict[str, float]:
        if self.observers is None:
            raise ResUNetError("freeze() without observe() first")
        self.amax = {k: o.value() for k, o in self.observers.items()}
        self.observers = None
        for fq in self.weight_fq:
            fq.enabled = True
        return self.amax

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for conv in self.convs.values():
            if parametrize.is_parametrized(conv, "weight"):
                parametrize.remove_parametrizations(conv, "weight", leave_parametrized=False)


__all__ = ["QMAX", "QMIN", "SIM_METHODS", "QuantSim", "fake_quantize", "graph_sim_ranges", "sim_ranges"]
