"""One-pass calibration on ONNX Runtime (export/fast_calibration.py) against ONNX Runtime's calibrator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resunetpp.export import fast_calibration as fc
from resunetpp.export.quantize import CALIB_CHUNK, QDQRecipe, _chunks, calibrate_ranges, quantize_qdq

pytestmark = pytest.mark.usefixtures("torch_threads")


def _absmax(tensor_data) -> float:
    lo, hi = tensor_data.range_value
    return max(abs(np.asarray(lo).item()), abs(np.asarray(hi).item()))


def _chunks_growing():
    rng = np.random.default_rng(3)
    return [rng.standard_normal((2, 4, 8, 8)).astype(np.float32) * s + o
            for s, o in ((1.0, 0.5), (3.0, 0.0), (0.5, 2.0), (6.0, -1.0))]


def test_histogram_is_onnx_runtimes() -> None:
    """Same data, same chunks: the edges and counts ORT's symmetric percentile collector builds,
    exactly (chunks that extend the range and values below the first chunk's smallest |x| included)."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    ort = HistogramCollector("percentile", True, 2048, 128, 99.99, "same")
    mine = fc.OrtAbsHistogram()
    for c in _chunks_growing():
        ort.collect({"t": [c]})
        mine.update(torch.from_numpy(c))
    hist, edges, lo, hi = ort.histogram_dict["t"]
    h2, e2, lo2, hi2 = mine.as_tuple()
    assert len(e2) > 2049  # the range grew
    np.testing.assert_array_equal(e2, edges)
    np.testing.assert_array_equal(h2, hist)
    assert (lo2, hi2) == (lo, hi)


def _ort_threshold(hist_tuple, percentile: float) -> float:
    from onnxruntime.quantization.calibrate import HistogramCollector
    import contextlib
    import io

    c = HistogramCollector("percentile", True, 2048, 128, percentile, "same")
    c.histogram_dict = {"t": hist_tuple}
    with contextlib.redirect_stdout(io.StringIO()):
        return float(c.compute_percentile()["t"][1])


@pytest.mark.parametrize("percentile", [99.99, 99.9])
def test_tail_mode_gives_onnx_runtimes_threshold(percentile: float) -> None:
    """Binning only the upper tail after the first chunk: the same edges, total, cumulative counts from
    the cut on, and so the same percentile threshold as ORT's full histogram."""
    full, tail = fc.OrtAbsHistogram(), fc.OrtAbsHistogram(percentile=percentile)
    rng = np.random.default_rng(5)
    chunks = _chunks_growing() + [rng.standard_normal((2, 4, 8, 8)).astype(np.float32) for _ in range(6)]
    for c in chunks:
        full.update(torch.from_numpy(c))
        tail.update(torch.from_numpy(c))
    (h1, e1, lo1, hi1), (h2, e2, lo2, hi2) = full.as_tuple(), tail.as_tuple()
    assert tail.cut > 0 and tail.exact
    np.testing.assert_array_equal(e1, e2)
    assert h1.sum() == h2.sum() and (lo1, hi1) == (lo2, hi2)
    np.testing.assert_array_equal(h2[tail.cut:], h1[tail.cut:])
    assert not np.array_equal(h2[:tail.cut], h1[:tail.cut])  # below the cut only the count is kept
    assert _ort_threshold(full.as_tuple(), percentile) == _ort_threshold(tail.as_tuple(), percentile)


def test_tail_mode_knows_when_the_threshold_is_below_its_cut() -> None:
    """A first chunk far larger than the rest puts the cut above the pooled percentile: ``exact`` is
    false, and collect_graph_histograms then collects again without the tail mode."""
    h = fc.OrtAbsHistogram(percentile=99.99)
    rng = np.random.default_rng(0)
    h.update(torch.from_numpy(rng.standard_normal(4000).astype(np.float32) * 100))
    for _ in range(50):  # 1e6 values more: the pooled top 0.01% (100 values) reaches below the cut (40 above it)
        h.update(torch.from_numpy(rng.standard_normal(20000).astype(np.float32)))
    assert not h.exact


@pytest.mark.parametrize("method,tail", [("percentile", False), ("percentile", True), ("minmax", False)])
def test_ranges_match_onnx_runtime(tiny_onnx, tmp_path, method: str, tail: bool) -> None:
    """Every convolution input's range equal to ORT's calibrator's on the same images, up to float32
    rounding (and so within one histogram bin, 1/2048 of its largest |x|)."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    model, graph, path, images = tiny_onnx
    calibrate_ranges(path, images, tmp_path / "ort.json", method=method)
    ort = load_tensors_data(tmp_path / "ort.json")
    tensors = fc.conv_input_tensors(graph)
    assert len(tensors) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    chunks = [np.concatenate(c) for c in _chunks(images, CALIB_CHUNK)]
    fast = fc.ranges_from_histograms(fc.collect_graph_histograms(graph, tensors.values(), chunks,
                                                                 percentile=99.99 if tail else None), method, 99.99)
    assert set(fast.keys()) == set(tensors.values())
    hists = fc.collect_graph_histograms(graph, tensors.values(), chunks)
    bins = {t: float(e[-1]) / fc.ORT_BINS for t, (_h, e, _lo, _hi) in hists.items()}
    diff = {t: abs(_absmax(fast[t]) - _absmax(ort[t])) for t in fast.keys()}
    assert all(diff[t] <= bins[t] * 1.001 + 1e-6 * _absmax(ort[t]) for t in diff), \
        sorted(((t, diff[t] / bins[t]) for t in diff), key=lambda kv: -kv[1])[:3]
    assert sum(diff[t] <= 1e-5 * _absmax(ort[t]) for t in diff) >= 0.8 * len(diff)
    # the same runtime on the same graph (its calibrator's augmented copy fuses differently): every
    # range equal to float32 rounding (measured: at most 1.8e-7 relative)
    assert all(diff[t] <= 1e-6 * _absmax(ort[t]) for t in diff), max(diff[t] / _absmax(ort[t]) for t in diff)


def test_qdq_graph_from_fast_ranges_matches(tiny_onnx, tmp_path) -> None:
    """quantize_static with only the convolution inputs' ranges writes the same Q/DQ graph, scales
    within float rounding, as with ORT's full calibration cache (every tensor)."""
    import onnx
    from onnx import numpy_helper

    model, graph, path, images = tiny_onnx
    recipe = QDQRecipe(keep_modules=("head",), equalize_alpha=None, bias_correction_images=0)
    calibrate_ranges(path, images, tmp_path / "ort.json", method="percentile")
    chunks = [np.concatenate(c) for c in _chunks(images, CALIB_CHUNK)]
    fc.save_ranges(fc.ranges_from_histograms(
        fc.collect_graph_histograms(graph, fc.conv_input_tensors(graph).values(), chunks), "percentile", 99.99),
        tmp_path / "fast.json")
    a = quantize_qdq(path, tmp_path / "ort.json", tmp_path / "a.onnx", recipe)
    b = quantize_qdq(path, tmp_path / "fast.json", tmp_path / "b.onnx", recipe)
    assert a.excluded_nodes == b.excluded_nodes
    ga, gb = onnx.load(str(a.path)).graph, onnx.load(str(b.path)).graph
    assert [n.op_type for n in ga.node] == [n.op_type for n in gb.node]
    ia = {t.name: numpy_helper.to_array(t) for t in ga.initializer}
    ib = {t.name: numpy_helper.to_array(t) for t in gb.initializer}
    assert ia.keys() == ib.keys()
    scales = [k for k in ia if k.endswith("_scale")]
    assert scales
    for k in ia:  # activation scales within one histogram bin (see above): relative 1e-2 at most
        if ia[k].dtype.kind == "f":
            np.testing.assert_allclose(ib[k], ia[k], rtol=1e-2, err_msg=k)
        elif k.endswith("_quantized") and "bias" in k:  # int32 biases scale with the input's range
            np.testing.assert_allclose(ib[k], ia[k], rtol=1e-2, atol=2, err_msg=k)
        else:
            np.testing.assert_array_equal(ib[k], ia[k], err_msg=k)


def test_unsupported_recipes_keep_onnx_runtime() -> None:
    assert fc.supports("percentile", conv_only=True, quantize_outputs=False)
    assert fc.supports("mse", conv_only=True, quantize_outputs=False)
    assert not fc.supports("entropy", conv_only=True, quantize_outputs=False)
    assert not fc.supports("percentile", conv_only=False, quantize_outputs=False)
    assert not fc.supports("percentile", conv_only=True, quantize_outputs=True)


def test_collect_falls_back_to_full_histograms(tiny_onnx) -> None:
    """When a tail-mode threshold would fall below its cut (one image of the first chunk 50 times
    larger: the pooled 99th percentile lies below that chunk's), the collected histograms are the
    full ones (without the fallback they would differ below the cut)."""
    model, graph, _path, images = tiny_onnx
    tensors = fc.conv_input_tensors(graph)
    scaled = [images[0] * 50] + images[1:]
    chunks = [np.concatenate(c) for c in _chunks(scaled, CALIB_CHUNK)]
    full = fc.collect_graph_histograms(graph, tensors.values(), chunks)
    tail = fc.collect_graph_histograms(graph, tensors.values(), chunks, percentile=99.0)
    assert full.keys() == tail.keys()
    for t in full:
        for a, b in zip(full[t], tail[t]):
            np.testing.assert_array_equal(a, b, err_msg=t)
