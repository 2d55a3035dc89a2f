"""One-pass PyTorch calibration (export/fast_calibration.py) against ONNX Runtime's calibrator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resunetpp.export import fast_calibration as fc
from resunetpp.export.onnx_graph import ShapeSpec, export_onnx
from resunetpp.export.quantize import CALIB_CHUNK, QDQRecipe, _chunks, calibrate_ranges, quantize_qdq
from resunetpp.model import ModelConfig, ResUNetPlusPlus, WithActivation

pytestmark = pytest.mark.usefixtures("torch_threads")


def _absmax(tensor_data) -> float:
    lo, hi = tensor_data.range_value
    return max(abs(np.asarray(lo).item()), abs(np.asarray(hi).item()))


def test_histogram_is_onnx_runtimes() -> None:
    """Same data, same chunks: the edges ORT's symmetric percentile collector builds, exactly (chunks
    that extend the range and values below the first chunk's smallest |x| included), and its counts
    up to values on an edge moved to the neighbouring bin (torch.histc's float32 rounding)."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    rng = np.random.default_rng(3)
    chunks = [rng.standard_normal((2, 4, 8, 8)).astype(np.float32) * s + o
              for s, o in ((1.0, 0.5), (3.0, 0.0), (0.5, 2.0), (6.0, -1.0))]
    ort = HistogramCollector("percentile", True, 2048, 128, 99.99, "same")
    mine = fc.OrtAbsHistogram()
    for c in chunks:
        ort.collect({"t": [c]})
        mine.update(torch.from_numpy(c))
    hist, edges, lo, hi = ort.histogram_dict["t"]
    h2, e2, lo2, hi2 = mine.as_tuple()
    assert len(e2) > 2049  # the range grew
    np.testing.assert_array_equal(e2, edges)
    assert (lo2, hi2) == (lo, hi)
    assert h2.sum() == hist.sum()
    # values moved to a neighbouring bin change the cumulative counts (what a percentile reads) by little
    assert np.abs(np.cumsum(h2) - np.cumsum(hist)).max() <= 0.005 * hist.sum()
    # and never by more than one bin: the cumulative counts bracket each other one bin apart
    c1, c2 = np.cumsum(h2), np.cumsum(hist)
    assert (c1[1:] >= c2[:-1]).all() and (c2[1:] >= c1[:-1]).all()


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    import onnx

    torch.manual_seed(0)
    model = ResUNetPlusPlus(ModelConfig(filters=(8, 8, 16, 16), bridge=16)).eval()
    with torch.no_grad():  # BatchNorm statistics that make the activations unlike each other
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    graph = export_onnx(WithActivation(model), ShapeSpec(3, 1, (32, 32)))
    path = tmp_path_factory.mktemp("fastcal") / "fp32.onnx"
    onnx.save_model(graph, str(path))
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(10)]
    return model, graph, path, images


@pytest.mark.parametrize("method", ["percentile", "minmax"])
def test_ranges_match_onnx_runtime(tiny_onnx, tmp_path, method: str) -> None:
    """Every convolution input's range within one histogram bin (1/2048 of its largest |x|) of ORT's
    calibrator on the same images -- and most of them equal within float rounding."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    model, graph, path, images = tiny_onnx
    calibrate_ranges(path, images, tmp_path / "ort.json", method=method)
    ort = load_tensors_data(tmp_path / "ort.json")
    tensors = fc.conv_input_tensors(graph)
    assert len(tensors) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    chunks = [np.concatenate(c) for c in _chunks(images, CALIB_CHUNK)]
    fast = fc.ranges_from_histograms(fc.collect_conv_histograms(model, tensors, chunks), method, 99.99)
    assert set(fast.keys()) == set(tensors.values())
    hists = fc.collect_conv_histograms(model, tensors, chunks)
    bins = {t: float(e[-1]) / fc.ORT_BINS for t, (_h, e, _lo, _hi) in hists.items()}
    diff = {t: abs(_absmax(fast[t]) - _absmax(ort[t])) for t in fast.keys()}
    assert all(diff[t] <= bins[t] * 1.001 + 1e-6 * _absmax(ort[t]) for t in diff), \
        sorted(((t, diff[t] / bins[t]) for t in diff), key=lambda kv: -kv[1])[:3]
    assert sum(diff[t] <= 1e-5 * _absmax(ort[t]) for t in diff) >= 0.8 * len(diff)


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
        fc.collect_conv_histograms(model, fc.conv_input_tensors(graph), chunks), "percentile", 99.99),
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
