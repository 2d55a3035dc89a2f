"""Unsigned INT8 for non-negative convolution inputs (resunetpp.export.unsigned): which Q/DQ pairs are
rewritten, and that the rewritten graph computes the same values where the signed one does not clip."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from resunetpp.export.unsigned import unsigned_nonnegative  # noqa: E402

SCALE = 0.05


def _qdq(graph_nodes, inits, tensor: str, tag: str, zp_name: str | None = None) -> str:
    """Q/DQ on ``tensor`` (signed, zero point 0); returns the dequantized tensor's name."""
    zp_name = zp_name or f"{tag}_zp"
    if not any(i.name == zp_name for i in inits):
        inits.append(helper.make_tensor(zp_name, TensorProto.INT8, [], [0]))
    inits.append(helper.make_tensor(f"{tag}_s", TensorProto.FLOAT, [], [SCALE]))
    graph_nodes.append(helper.make_node("QuantizeLinear", [tensor, f"{tag}_s", zp_name], [f"{tag}_q"]))
    graph_nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_s", zp_name], [f"{tag}_dq"]))
    return f"{tag}_dq"


def _conv(graph_nodes, inits, x: str, tag: str, rng) -> str:
    w = rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.05  # small: every tensor within 127 steps
    inits.append(numpy_helper.from_array(w, f"{tag}_w"))
    graph_nodes.append(helper.make_node("Conv", [x, f"{tag}_w"], [f"{tag}_y"], pads=[1, 1, 1, 1]))
    return f"{tag}_y"


def _model(shared_zero_point: bool = False):
    """x -> Relu -> MaxPool -> [Q/DQ] conv_a -> (signed) [Q/DQ] conv_b -> Relu, Concat(relu, relu) ... """
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    zp = "shared_zp" if shared_zero_point else None
    nodes.append(helper.make_node("Relu", ["x"], ["r"]))
    nodes.append(helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[1, 1]))
    a = _conv(nodes, inits, _qdq(nodes, inits, "p", "a", zp), "ca", rng)        # non-negative: rewritten
    b = _conv(nodes, inits, _qdq(nodes, inits, a, "b", zp), "cb", rng)          # a conv's output: signed
    nodes.append(helper.make_node("Relu", [b], ["rb"]))
    nodes.append(helper.make_node("Concat", ["rb", "p"], ["cat"], axis=1))       # concat of non-negatives
    c = _conv(nodes, inits, _qdq(nodes, inits, "cat", "c", zp), "cc", rng)
    w = numpy_helper.to_array(next(i for i in inits if i.name == "cc_w"))
    inits[[i.name for i in inits].index("cc_w")] = numpy_helper.from_array(
        np.concatenate([w, w], axis=1), "cc_w")  # 8 input channels
    nodes.append(helper.make_node("Sub", [c, "x"], ["d"]))                       # may be negative
    out = _conv(nodes, inits, _qdq(nodes, inits, "d", "e", zp), "ce", rng)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model, x):
    opts = ort.SessionOptions()  # the Q/DQ semantics themselves, no fused kernels
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("shared", [False, True])
def test_rewrites_only_nonnegative_tensors(shared):
    model = _model(shared)
    onnx.checker.check_model(model)
    done = unsigned_nonnegative(model)
    assert done == ["p", "cat"]
    onnx.checker.check_model(model)
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[node.input[2]].data_type
            tensor = node.input[0] if node.op_type == "QuantizeLinear" else None
            if tensor in ("p", "cat") or node.input[0] in ("a_q", "c_q"):
                assert zp == TensorProto.UINT8
            else:
                assert zp == TensorProto.INT8  # a conv output and a difference stay signed, even with a shared zp


def test_same_values_where_signed_does_not_clip_and_more_range_above():
    rng = np.random.default_rng(1)
    signed = _model()
    rewritten = _model()
    unsigned_nonnegative(rewritten)
    x = rng.random((1, 4, 8, 8), dtype=np.float32) * 2.0  # every quantized tensor within 127 steps (6.35)
    np.testing.assert_array_equal(_run(signed, x), _run(rewritten, x))
    big = x.copy()
    big[0, 0, 0, 0] = 200 * SCALE  # above 127 steps: the signed form clips it, the unsigned keeps it
    assert not np.array_equal(_run(signed, big), _run(rewritten, big))


def test_leaves_pairs_with_nonzero_zero_points_alone():
    model = _model()
    for init in model.graph.initializer:
        if init.data_type == TensorProto.INT8:
            init.CopyFrom(helper.make_tensor(init.name, TensorProto.INT8, [], [3]))
    before = model.SerializeToString()
    assert unsigned_nonnegative(model) == []
    assert model.SerializeToString() == before
