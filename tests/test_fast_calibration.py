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


def test_histogram_is_onnx_runtimes_exactly() -> None:
    """Same data, same chunks: bin for bin the histogram ORT's symmetric percentile collector builds,
    including chunks that extend the range and values below the first chunk's smallest |x|."""
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
    np.testing.assert_array_equal(h2, hist)
    assert (lo2, hi2) == (lo, hi)


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
    """Every convolution input's range within float rounding of ORT's calibrator on the same images."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    model, graph, path, images = tiny_onnx
    calibrate_ranges(path, images, tmp_path / "ort.json", method=method)
    ort = load_tensors_data(tmp_path / "ort.json")
    tensors = fc.conv_input_tensors(graph)
    assert len(tensors) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    chunks = [np.concatenate(c) for c in _chunks(images, CALIB_CHUNK)]
    fast = fc.ranges_from_histograms(fc.collect_conv_histograms(model, tensors, chunks), method, 99.99)
    assert set(fast.keys()) == set(tensors.values())
    rel = {t: abs(_absmax(fast[t]) - _absmax(ort[t])) / _absmax(ort[t]) for t in fast.keys()}
    assert max(rel.values()) < 1e-5, sorted(rel.items(), key=lambda kv: -kv[1])[:3]


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
    for k in ia:
        if ia[k].dtype.kind == "f":
            np.testing.assert_allclose(ib[k], ia[k], rtol=1e-5, err_msg=k)
        else:  # quantized weights and biases: at most one step apart where a scale rounds differently
            assert np.abs(ib[k].astype(np.int64) - ia[k].astype(np.int64)).max() <= 1, k


def test_unsupported_recipes_keep_onnx_runtime() -> None:
    assert fc.supports("percentile", conv_only=True, quantize_outputs=False)
    assert fc.supports("mse", conv_only=True, quantize_outputs=False)
    assert not fc.supports("entropy", conv_only=True, quantize_outputs=False)
    assert not fc.supports("percentile", conv_only=False, quantize_outputs=False)
    assert not fc.supports("percentile", conv_only=True, quantize_outputs=True)
