"""``with_parameters``: the FP32 graph given another set of weights of the same model (what the INT8
export does with the equalized, bias-corrected model instead of exporting it again) equals a fresh
export of that model where both have a weight -- BatchNorm folding included, bit for bit --, computes
that model, and refuses weights that do not map."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from resunetpp.export.onnx_graph import ShapeSpec, export_onnx, with_parameters
from resunetpp.model import ModelConfig, ResUNetPlusPlus, WithActivation

pytestmark = pytest.mark.usefixtures("torch_threads")


def _initializers(graph) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def _moved(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy with every parameter and BatchNorm statistic scaled by 0.8-1.2 (no weight stays at its
    initial 1 or 0 pattern, so the exporter has nothing value-specific to simplify)."""
    moved = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(moved.parameters()) + list(moved.buffers()):
            if t.is_floating_point():
                t.mul_(0.8 + 0.4 * torch.rand(t.shape, generator=gen)).add_(0.01)
    return moved


def test_new_weights_in_the_graph_equal_a_fresh_export(tiny_onnx) -> None:
    model, _graph, _path, images = tiny_onnx
    source = _moved(model, 3)
    target = _moved(source, 4)
    graph = export_onnx(WithActivation(source), ShapeSpec(3, 1, (32, 32)))
    patched = with_parameters(graph, source, target)
    assert patched is not None
    fresh = export_onnx(WithActivation(target), ShapeSpec(3, 1, (32, 32)))
    got, want = _initializers(patched.graph), _initializers(fresh.graph)
    common = got.keys() & want.keys()  # the exporter may lay a few BatchNorm constants out differently
    assert len(common) > 0.9 * len(got)
    for k in common:  # BatchNorm folding included, bit for bit
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert [n.name for n in patched.graph.node] == [n.name for n in graph.graph.node]  # nodes and their metadata kept
    assert [list(n.metadata_props) for n in patched.graph.node] == [list(n.metadata_props) for n in graph.graph.node]
    session = ort.InferenceSession(patched.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.concatenate(images[:2])
    with torch.no_grad():
        reference = WithActivation(target).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"images": x})[0], reference, atol=1e-5)


def test_a_graph_simplified_for_its_own_values_is_caught_by_the_check(tiny_onnx) -> None:
    """The fixture's graph comes from a model whose BatchNorm scales are all 1 (the exporter drops what
    they would multiply): its named initializers still match, so the weights map -- but the graph does
    not compute the moved model. The export's own check against PyTorch refuses it (it exports again)."""
    from types import SimpleNamespace

    from resunetpp.export.int8_source import _patched_graph
    from resunetpp.export.report import NullReporter

    model, graph, _path, images = tiny_onnx
    moved = _moved(model, 5)
    warnings: list[str] = []
    run = SimpleNamespace(fp32_model=graph, ckpt=SimpleNamespace(build_model=lambda: copy.deepcopy(model)),
                          vset=SimpleNamespace(inputs=[x[0] for x in images]), r=NullReporter(), warn=warnings.append)
    assert with_parameters(graph, model, moved) is not None
    assert _patched_graph(run, moved, "equalized") is None
    assert warnings and "exporting the model again" in warnings[0]
    assert _patched_graph(run, copy.deepcopy(model), "equalized") is not None and len(warnings) == 1


def test_weights_that_do_not_map_are_refused(tiny_onnx) -> None:
    model, graph, _path, _images = tiny_onnx
    other = ResUNetPlusPlus(ModelConfig(filters=(8, 8, 16, 32), bridge=16)).eval()  # another architecture
    assert with_parameters(graph, other, other) is None
    unrelated = copy.deepcopy(model)
    with torch.no_grad():
        unrelated.stem.body[0].weight.add_(1.0)  # not the weights the graph was exported from
    assert with_parameters(graph, unrelated, unrelated) is None
    assert with_parameters(graph, model, copy.deepcopy(model)) is not None
