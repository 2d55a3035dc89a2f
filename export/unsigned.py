"""Unsigned INT8 for non-negative convolution inputs in the OpenVINO IR (no saturation on non-VNNI CPUs).

The Q/DQ ONNX quantizes every convolution input as *signed* INT8 with zero point 0, the one form
TensorRT's explicit quantization takes. On x86 CPUs, INT8 convolutions multiply unsigned 8-bit
activations by signed 8-bit weights. With VNNI (``vpdpbusd``) the products go straight into 32-bit
sums. Without it (AVX2, AVX-512F/BW: ``vpmaddubsw``), each *pair* of products is first added into a
16-bit integer that saturates at 32767. A signed activation is shifted by +128 to make it unsigned,
so even a zero activation enters as 128::

    signed input, AVX2:   (a1 + 128)·w1 + (a2 + 128)·w2  ->  int16, saturates when > 32767
                          (a1 = a2 = 1, w1 = w2 = 127:  129·127 + 129·127 = 32766 ... one step more overflows)
    unsigned input:        a1·w1 + a2·w2                  ->  a ≤ 127 where s8 would not clip: ≤ 127·254 = 32258

OpenVINO's documentation calls this the saturation (overflow) issue and offers 7-bit weights as the
workaround (NNCF's ``OverflowFix``; docs.openvino.ai, "Saturation (overflow) Issue Workaround"). That
costs one bit of every weight. For a tensor that cannot be negative (a ReLU's output, its max-pooling,
upsampling or concatenation), the signed form wastes its negative half anyway: the same tensor quantized
as *unsigned* INT8 with the *same* step and zero point 0 gives every value the signed form represents
exactly the same integer (``round(x / s)`` for ``0 ≤ x ≤ 127·s``), needs no shift, and keeps values up
to ``255·s`` that the signed form clips at ``127·s``. Only those (above the calibrated range, about one
value in 10⁴) can still reach the 16-bit limit.

:func:`unsigned_nonnegative` rewrites exactly those Q/DQ pairs (a new ``uint8`` zero point, the scale
unchanged) in the graph the OpenVINO IR is converted from; the ONNX artifact itself keeps TensorRT's
signed form. Measured on the shipped model, 120 validation images, this 2-core AVX2 box (no VNNI):
the IR from the signed graph 0.9945 / 0.8602 (mean / worst Dice vs FP32; ONNX Runtime on the same graph
0.9957 / 0.9496), from the rewritten one 0.9965 / 0.9525 (benchmarks/INT8.md, section 16).
"""

from __future__ import annotations

import numpy as np

#: Ops whose output is never negative.
NONNEGATIVE_OPS = frozenset({"Relu", "Sigmoid", "Softmax"})
#: Ops whose output is non-negative when every data input is (shape inputs aside).
PASS_THROUGH_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Resize", "Upsample",
                              "Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat",
                              "Add", "Mul"})
#: How far back through pass-through ops a tensor is followed.
MAX_DEPTH = 16


def _is_nonnegative(tensor: str, producers: dict, constants: dict, depth: int = 0) -> bool:
    """Whether ``tensor`` is non-negative by construction of the graph (not by what data showed)."""
    if tensor in constants:
        return bool(np.all(constants[tensor] >= 0))
    node = producers.get(tensor)
    if node is None or depth > MAX_DEPTH:
        return False
    if node.op_type in NONNEGATIVE_OPS:
        return True
    if node.op_type not in PASS_THROUGH_OPS:
        return False
    data = node.input[:1] if node.op_type in ("Reshape", "Resize", "Upsample", "Squeeze", "Unsqueeze") \
        else [t for t in node.input if t]
    return bool(data) and all(_is_nonnegative(t, producers, constants, depth + 1) for t in data)


def unsigned_nonnegative(model) -> list[str]:
    """Turn every activation Q/DQ pair of ``model`` (an ``onnx.ModelProto``, changed in place) whose
    tensor is non-negative by construction from signed INT8 (zero point 0) into unsigned INT8 with
    the same scale and zero point 0. Returns the tensors rewritten, in graph order. Weight Q/DQ
    (initializer inputs), pairs with a non-zero or non-int8 zero point, and tensors that may be
    negative are left as they are."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    constants = {name: numpy_helper.to_array(i) for name, i in inits.items()
                 if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE) and len(i.dims) <= 1}
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node)
    done: list[str] = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits or len(node.input) < 3:
            continue
        zp = inits.get(node.input[2])
        if zp is None or zp.data_type != TensorProto.INT8 or np.any(numpy_helper.to_array(zp)):
            continue
        dqs = readers.get(node.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" or len(d.input) < 3 or d.input[1] != node.input[1]
                          or d.input[2] != node.input[2] for d in dqs):
            continue  # read by something other than its own DequantizeLinear (same scale, same zero point)
        if not _is_nonnegative(node.input[0], producers, constants):
            continue
        name = f"{node.output[0]}_zero_point_uint8"
        if name not in inits:
            new = helper.make_tensor(name, TensorProto.UINT8, list(zp.dims), np.zeros(int(np.prod(zp.dims)), np.uint8))
            graph.initializer.append(new)
            inits[name] = new
        node.input[2] = name
        for d in dqs:
            d.input[2] = name
        done.append(node.input[0])
    used = {t for n in graph.node for t in n.input}
    for init in list(graph.initializer):  # signed zero points no Q/DQ pair reads any more
        if init.name not in used and init.data_type == TensorProto.INT8 and len(init.dims) == 0:
            graph.initializer.remove(init)
    return done


__all__ = ["NONNEGATIVE_OPS", "PASS_THROUGH_OPS", "unsigned_nonnegative"]
