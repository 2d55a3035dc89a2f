"""Activation ranges for the Q/DQ ONNX in one pass (``quantize_qdq``'s ranges cache).

ONNX Runtime's ``HistogramCalibrater`` runs an augmented ONNX graph that returns *every*
intermediate tensor of every quantizable op, and histograms each with numpy: on the shipped model
about 3 s per 256x256 image on the 2-core box, 16 min for the default 300 calibration images. The
conv-only recipe reads the ranges of the convolutions' *inputs* only.

:func:`collect_graph_histograms` runs the same graph on ONNX Runtime with only those tensors as
extra outputs (:class:`resunetpp.engines.graph_taps.GraphTaps`) and updates an
:class:`OrtAbsHistogram` per input: the |x| histogram exactly as ONNX Runtime's symmetric
percentile collector (``HistogramCollector.collect_absolute_value``) builds it -- 2048 bins from
the first chunk's smallest to largest |x|, extended with bins of the same width when a later
chunk goes beyond, values counted by ``np.histogram`` on the same edges, one update per chunk of
:data:`resunetpp.export.quantize.CALIB_CHUNK` calibration batches (what one ``collect_data`` call sees),
signed min/max tracked alongside; for the percentile method only the upper tail is binned after the
first chunk (the thresholds are ORT's exactly, checked). :func:`ranges_from_histograms` hands them to
ONNX Runtime's own ``HistogramCollector.compute_collection_result`` (percentile),
:func:`resunetpp.export.ranges.mse_range` (mse) or the min/max (minmax), keyed by the ONNX tensor name
each convolution reads (:func:`conv_input_tensors`, from the exporter's node metadata). Tested against
ORT's calibrator: ``tests/test_fast_calibration.py``.

Recipes that need other tensors (``--int8-ops all``, ``--int8-outputs``) or the entropy method
keep ONNX Runtime's calibrator (:func:`supports`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from resunetpp.export.onnx_graph import node_scopes
from resunetpp.errors import ResUNetError

#: ONNX Runtime's percentile calibrator's bin count (``create_calibrator``'s default ``num_bins``).
ORT_BINS = 2048
#: Methods computed from these histograms.
FAST_METHODS = ("percentile", "mse", "minmax")


def supports(method: str, conv_only: bool, quantize_outputs: bool) -> bool:
    """Whether a recipe's ranges are all convolution inputs and its method one this module computes."""
    return method in FAST_METHODS and conv_only and not quantize_outputs


#: Tail mode: after the first chunk, values below the first chunk's ``1 - TAIL_SHARE`` quantile are only
#: counted, not binned (the percentile method needs the cumulative count there, not its shape).
TAIL_SHARE = 0.01


class OrtAbsHistogram:
    """ONNX Runtime's ``HistogramCollector.collect_absolute_value`` for one tensor, on torch tensors.

    ``update(x)`` is one ``collect()`` of the data ``x`` (every image of one chunk): the first
    builds ``bins`` equal bins from min to max |x| (``np.histogram(|x|, bins)``); a later one
    whose max |x| passes the last edge appends edges of the first width (``np.arange``, as ORT
    does) and counts |x| in the edges (``np.histogram(|x|, bins=edges)``: bin ``k`` holds
    ``edges[k] <= v < edges[k+1]``, the last bin includes its right edge, values outside are not
    counted). Edges are float32, counts int64, as ORT keeps them.

    ``percentile`` (tail mode, for the percentile method): after the first chunk, only values at or
    above a cut are binned -- the edge where the first chunk's cumulative share reaches
    ``1 - TAIL_SHARE`` -- and the values between the first edge and the cut are counted into the bin
    just below it. Every cumulative count from that bin on is then ORT's exactly, and so is the
    ``percentile`` threshold as long as it lies at or above the cut: :attr:`exact` says whether it
    does (checked in :meth:`as_tuple`; the caller recomputes without the tail mode when not). Binning
    1% of the values instead of all of them is what makes the pass cost about what the model does.
    Only ``hist[:cut]`` differs from ORT's (it holds the count, not the shape, below the cut).
    """

    def __init__(self, bins: int = ORT_BINS, percentile: float | None = None) -> None:
        self.bins = bins
        self.percentile = percentile
        self.cut = 0  # bin index: values below edges[cut] are counted, not binned (tail mode)
        self.hist: np.ndarray | None = None
        self.edges: np.ndarray | None = None
        self.min = np.float32(0)
        self.max = np.float32(0)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if x.numel() == 0:
            return
        lo_t, hi_t = torch.aminmax(x)
        lo, hi = np.float32(lo_t.item()), np.float32(hi_t.item())
        a = x.abs().flatten()
        amax = np.float32(max(-lo, hi))
        if self.edges is None:
            amin = np.float32(a.min().item())
            edges = np.histogram_bin_edges(np.array([amin, amax], dtype=np.float32), bins=self.bins)
            edges = edges.astype(np.float32)
            self.min, self.max = lo, hi
            self.hist, self.edges = self._count(a, edges), edges
            if self.percentile is not None:
                share = np.cumsum(self.hist) / max(int(self.hist.sum()), 1)
                self.cut = int(min(np.searchsorted(share, 1.0 - TAIL_SHARE), self.bins - 1))
            return
        edges, old = self.edges, self.hist
        if amax > edges[-1]:
            width = edges[1] - edges[0]
            edges = np.hstack((edges, np.arange(edges[-1] + width, amax + width, width))).astype(np.float32)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if self.cut > 0:
            cut = float(edges[self.cut])
            tail = a[a >= cut]
            inside = a.numel() if edges[0] <= 0 else int((a >= float(edges[0])).sum())
            hist = self._count(tail, edges)
            hist[self.cut - 1] += inside - tail.numel()
        else:
            hist = self._count(a, edges)
        hist[:len(old)] += old
        self.hist, self.edges = hist, edges

    @property
    def exact(self) -> bool:
        """Whether the ``percentile`` threshold ORT computes from :meth:`as_tuple` is ORT's own (it lies
        at or above the tail mode's cut; always true outside the tail mode)."""
        if self.cut == 0 or self.hist is None:
            return True
        cdf = np.cumsum(self.hist / self.hist.sum())
        return int(np.searchsorted(cdf, self.percentile / 100.0)) >= self.cut

    @staticmethod
    def _count(a: torch.Tensor, edges: np.ndarray) -> np.ndarray:
        """Counts of ``a`` in ``edges``: ``np.histogram(a, bins=edges)`` itself, as ONNX Runtime counts
        them (bin ``k`` holds ``edges[k] <= v < edges[k+1]``, the last bin also its right edge, values
        outside not counted). numpy's search of equal-width float32 edges takes about 10 ns a value
        here, as fast as ``torch.histc`` and exact at the edges, where ``histc`` moves about one value
        in a thousand lying within float32 rounding of an edge into the neighbouring bin."""
        return np.histogram(a.contiguous().numpy(), bins=edges)[0].astype(np.int64)

    def as_tuple(self) -> tuple:
        """``(hist, edges, min, max)``: an entry of ORT's ``HistogramCollector.histogram_dict``."""
        if self.hist is None:
            raise ResUNetError("no calibration data reached this tensor")
        return self.hist, self.edges, self.min, self.max


def conv_input_tensors(onnx_model) -> dict[str, str]:
    """``{convolution module path: ONNX tensor its Conv node reads}`` of an exported graph."""
    scopes = node_scopes(onnx_model)
    out: dict[str, str] = {}
    for node in onnx_model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        module = scopes.get(node.name)
        if not module:
            raise ResUNetError(f"ONNX node {node.name!r} has no module metadata (cannot map its input range)")
        if module in out:
            raise ResUNetError(f"two ONNX convolutions map to module {module!r}")
        out[module] = node.input[0]
    return out


def conv_inputs(graph, convs: Iterable[str]) -> dict[str, str]:
    """``{convolution module path: ONNX tensor it reads}`` for ``convs`` in ``graph``
    (:func:`conv_input_tensors`); a convolution the graph does not have is an error."""
    tensors = conv_input_tensors(graph)
    missing = [c for c in convs if c not in tensors]
    if missing:
        raise ResUNetError(f"convolution {missing[0]!r} is not in the graph")
    return {c: tensors[c] for c in convs}


def collect_graph_histograms(model, tensors: Iterable[str], chunks: Sequence[np.ndarray], *,
                             progress: Callable[[int], None] | None = None, percentile: float | None = None,
                             image_tails=None) -> dict[str, tuple]:
    """|x| histograms of ``tensors`` (ONNX tensor names, e.g. the values of :func:`conv_input_tensors`)
    of the graph ``model`` (an ``onnx.ModelProto``) over ``chunks`` (each chunk one ``(N, C, H, W)``
    float32 array: what one ONNX Runtime ``collect_data`` call sees), run by ONNX Runtime with the
    tensors as extra outputs (:class:`resunetpp.engines.graph_taps.GraphTaps`: the values ORT's own
    calibrator would see). ``percentile``: the tail mode of :class:`OrtAbsHistogram`; when a threshold
    falls below its cut (never seen on real data) the histograms are collected again without it.
    ``image_tails``: an :class:`resunetpp.export.image_tails.ImageTails` fed every chunk as well."""
    from resunetpp.engines.graph_taps import GraphTaps

    taps = GraphTaps(model, tensors)
    names = taps.tensors
    hists = {t: OrtAbsHistogram(percentile=percentile) for t in names}

    def update(tensor: str, x: torch.Tensor) -> None:
        hists[tensor].update(x)
        if image_tails is not None:
            image_tails.record(tensor, x)

    taps.observe(chunks, update, progress)
    if percentile is not None and not all(h.exact for h in hists.values()):
        return collect_graph_histograms(model, names, chunks)
    return {t: h.as_tuple() for t, h in hists.items()}


def ranges_from_histograms(histograms: dict[str, tuple], method: str, percentile: float):
    """ONNX Runtime ``TensorsData`` (what ``quantize_static`` reads from a calibration cache) from
    :func:`collect_conv_histograms`' histograms: ``percentile`` by ONNX Runtime's own
    ``HistogramCollector.compute_collection_result`` (symmetric), ``mse`` by
    :func:`resunetpp.export.ranges.mse_range`, ``minmax`` the signed min and max."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import HistogramCollector, TensorData, TensorsData

    if method == "percentile":
        collector = HistogramCollector(method="percentile", symmetric=True, num_bins=ORT_BINS,
                                       num_quantized_bins=128, percentile=percentile, scenario="same")
        collector.histogram_dict = dict(histograms)
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # the collector prints its settings
            result = collector.compute_collection_result()
        return TensorsData(CalibrationMethod.Percentile, result)
    if method == "mse":
        from resunetpp.export.ranges import mse_range

        data = {}
        for name, (hist, edges, lo, hi) in histograms.items():
            a = np.float32(mse_range(hist, edges, max(abs(float(lo)), abs(float(hi)))))
            data[name] = TensorData(lowest=-a, highest=a)
        return TensorsData(CalibrationMethod.Percentile, data)
    if method == "minmax":
        return TensorsData(CalibrationMethod.MinMax, {name: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
                                                      for name, (_h, _e, lo, hi) in histograms.items()})
    raise ResUNetError(f"fast calibration computes {', '.join(FAST_METHODS)}, not {method!r}")




def save_ranges(ranges, path) -> None:
    """Write ``ranges`` as the calibration cache :func:`resunetpp.export.quantize.quantize_qdq` reads."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    save_tensors_data(ranges, path)


__all__ = ["FAST_METHODS", "ORT_BINS", "TAIL_SHARE", "OrtAbsHistogram", "collect_graph_histograms", "conv_input_tensors", "conv_inputs",
           "ranges_from_histograms", "save_ranges", "supports"]
